"""Pre-flight: each way a run would fail after it started is caught before any rank starts (`launcher
run`) and before submission (`launcher slurm`): exit 2, one message naming the field or file and the fix,
no traceback, nothing written."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from launcher import assets
from launcher.cli import main
from launcher.submit import preflight
from launcher.config.resolve import resolve
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "head_dim": 128}


def run_cli(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def model_dir(tmp_path: Path, cfg: dict | None = None, weights: bool = True) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg or json.loads((assets.tiny_dir() / "config.json").read_text())))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


def profiles(tmp_path: Path, gpu_type: str) -> Path:
    p = tmp_path / "clusters.yaml"
    p.write_text(yaml.safe_dump({"lab": {"default_partition": "gpu", "partitions": {
        "gpu": {"gpu_type": gpu_type, "gpus_per_node": 8}}}}))
    return p


def bad_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "a", "answer": "b"}\n')
    return {
        "missing data file": (["--data", tmp_path / "nope.jsonl"], "nope.jsonl"),
        "empty data file": (["--data", empty], "empty.jsonl"),
        "malformed line": (["--data", data], "broken.jsonl line 3"),
        "field absent": (["--data", sft, "--task", "sft"], "response"),
        "seq_len beyond positions": (["--seq-len", 4096], "data.seq_len"),
        "model without config": (["--model", tmp_path / "no-model"], "model.name"),
        "model without weights": (["--model", model_dir(tmp_path, weights=False)], "no weights"),
        "lora target absent": (["--method", "lora", "--set", "method.lora.target_modules=[q_proj,qkv]"],
                               "method.lora.target_modules"),
        "fp16 on cpu": (["--precision", "fp16"], "precision.dtype"),
        "grace beyond time": (["--time", "1", "--set", "cluster.signal_grace_s=90"], "cluster.signal_grace_s"),
        "retries without requeue": (["--set", "cluster.max_retries=2", "--set", "cluster.requeue=false"],
                                    "cluster.max_retries"),
        "resume from nothing": (["--set", f"output.resume={tmp_path}"], "output.resume"),
        "liger on cpu ranks": (["--loss", "liger"], "optim.loss=liger"),
        "liger not installed": (["--loss", "liger", "--gpus-per-node", "8"], "liger-kernel"),
        "compile with zero-3": (["--compile", "--zero", "3"], "model.compile"),
    }


def test_each_bad_input_is_refused_before_submission_with_one_message(tmp_path, capsys):
    for name, (flags, needle) in bad_cases(tmp_path).items():
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        code, stdout, err = run_cli(["slurm", "--out", out, "--dry-run", *flags], capsys)
        assert code == 2, (name, err)
        assert needle in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, (name, err)
        assert not out.exists() and stdout == "", name


def test_launcher_run_refuses_before_any_rank_or_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--data", tmp_path / "nope.jsonl", "--out", out], capsys)
    assert code == 2 and "nope.jsonl" in err and not out.exists()
    code, _, err = run_cli(["run", "--method", "lora", "--set", "method.lora.target_modules=[q_projj]", "--out", out],
                           capsys)
    assert code == 2 and "q_projj" in err and not out.exists()


def test_a_run_that_does_not_fit_the_gpu_is_refused_unless_ignore_fit(tmp_path, capsys, monkeypatch):
    model = model_dir(tmp_path, LLAMA_8B)
    monkeypatch.setenv("LAUNCHER_CLUSTERS", str(profiles(tmp_path, "l4")))
    flags = ["--cluster", "lab", "--model", model, "--zero", "0", "--precision", "bf16", "--seq-len", 2048,
             "--micro-batch", 4]
    code, _, err = run_cli(["slurm", "--out", tmp_path / "a", "--dry-run", *flags], capsys)
    assert code == 2 and "does not fit" in err and "--ignore-fit" in err and "L4" in err, err
    code, stdout, err = run_cli(["slurm", "--out", tmp_path / "b", "--dry-run", "--ignore-fit", *flags], capsys)
    assert code == 0 and stdout.startswith("#!/bin/bash") and "trying anyway" in err, err


def test_a_run_that_fits_passes_and_cpu_runs_skip_the_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CLUSTERS", str(profiles(tmp_path, "h100")))
    fits = resolve(None, flags={"model": str(model_dir(tmp_path)), "gpus_per_node": 8, "precision": "bf16"},
                   sets=[f"output.dir={tmp_path / 'r'}", "cluster.profile=lab"])
    assert preflight.check(fits, slurm=True) == []
    big = tmp_path / "big"
    big.mkdir()
    cpu = resolve(None, flags={"model": str(model_dir(big, LLAMA_8B))}, sets=[])
    assert preflight.check(cpu) == []  # CPU ranks: no GPU memory to fit, even for 8B


class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub's model API: 200 for acme/llama-mini, 404 (as the hub answers) for anything else."""

    def do_GET(self) -> None:  # noqa: N802
        found = self.path.startswith("/api/models/acme/llama-mini")
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"id": "acme/llama-mini"}' if found else b'{"error": "Repository not found"}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    server.shutdown()


def test_hub_models_the_hub_knows_are_noted_not_refused(hub):
    spec = resolve(None, flags={"model": "acme/llama-mini", "method": "lora", "gpus_per_node": 8,
                                "precision": "bf16"}, sets=[])
    notes = preflight.check(spec, slurm=True)
    assert any("hub id" in n for n in notes)


def test_hub_ids_the_hub_does_not_know_or_cannot_be_asked_are_refused(hub, monkeypatch):
    spec = resolve(None, flags={"model": "acme/llama-mnii"}, sets=[])
    with pytest.raises(UserError, match="acme/llama-mnii.*no such model repository.*launcher stage SPEC"):
        preflight.check(spec, slurm=True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match="acme/llama-mnii.*cannot be reached.*local path"):
        preflight.check(spec, slurm=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        preflight.check(spec, slurm=True)


def test_resume_from_a_complete_checkpoint_passes(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    spec = resolve(None, flags={}, sets=[f"output.resume={ckpt}"])
    with pytest.raises(UserError, match="output.resume"):
        preflight.check(spec)
    (ckpt / "launcher-complete.json").write_text("{}")
    assert preflight.check(spec) == []


def test_slurm_dry_run_with_preflight_imports_no_heavy_library(tmp_path):
    code = ("import sys\nfrom launcher.cli import main\n"
            "try:\n    main(['slurm', '--dry-run', '--method', 'lora', '--out', sys.argv[1]])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = {'torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes', 'datasets'} & set(sys.modules)\n"
            "print('HEAVY', sorted(heavy), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in proc.stderr, proc.stderr


def test_every_problem_is_reported_at_once_in_one_error(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["slurm", "--out", out, "--dry-run", "--precision", "fp16",
                                 "--data", tmp_path / "nope.jsonl", "--set", "cluster.max_retries=2",
                                 "--set", "cluster.requeue=false"], capsys)
    assert code == 2 and "pre-flight found 3 problems" in err, err
    for needle in ("precision.dtype=fp16", "nope.jsonl", "cluster.max_retries"):
        assert needle in err, (needle, err)
    assert "Traceback" not in err and not out.exists() and stdout == ""


def test_fp16_on_cpu_is_refused_with_one_text_by_pre_flight_and_by_the_ranks(tmp_path):
    from launcher.plan.plan import make_plan, unsupported_precision
    from launcher.rank.loop import check_environment

    spec = resolve(None, flags={"precision": "fp16"}, sets=[])
    refusal = unsupported_precision(spec, make_plan(spec))
    with pytest.raises(UserError) as pre:
        preflight.check(spec)
    with pytest.raises(UserError) as rank:
        check_environment(spec, make_plan(spec))
    assert refusal and str(pre.value) == str(rank.value) == refusal and pre.value.field == "precision.dtype"


def test_preflight_and_the_ranks_refuse_an_incomplete_resume_with_one_text(tmp_path):
    from launcher.rank.loop import resume_point

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    spec = resolve(None, flags={}, sets=[f"output.resume={ckpt}", f"output.dir={tmp_path}"])
    with pytest.raises(UserError) as before:
        preflight.check(spec)
    with pytest.raises(UserError) as on_rank:
        resume_point(spec)
    assert str(on_rank.value) in str(before.value) and "launcher-complete.json" in str(on_rank.value)
