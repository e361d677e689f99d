"""The hostile-input corpus (issue 16): every hostile or broken input gets one clear exit 2 (or is accepted
and proved safe, exit 0), with no traceback, no hang, no leaked secret and nothing overwritten.

Each case runs the real command line in this process (launcher.cli.main, as `python -m launcher` does) in a
fresh folder that holds a sentinel file in an existing run dir, with secrets planted in the environment
(and, for the secrets class, in the spec), and asserts:
  - the exit code (2 for bad input, 0 where the input is legitimately accepted);
  - no traceback in the output;
  - for exit 2: exactly one error message, naming the field or file (the case's needle);
  - for exit 2: nothing written or changed anywhere in the folder;
  - the sentinel file unchanged;
  - no planted secret in any file written.
Slurm's tools are stubs that answer nothing (no cluster is needed), and the hub is unreachable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from launcher.cli import main

SECRETS = {"HF_TOKEN": "sekret-hf-70351", "AWS_SESSION_TOKEN": "sekret-aws-70352", "GITHUB_TOKEN": "sekret-gh-70353",
           "WANDB_API_KEY": "sekret-wandb-70354", "MY_DB_PASSWORD": "sekret-db-70355"}
# token-shaped values planted in specs (refused, so never written anywhere)
TOKENS = {"hf": "hf_" + "A1b2C3d4E5f6G7h8J9k0L1m2", "ghp": "ghp_" + "Z9y8X7w6V5u4T3s2R1q0P9o8",
          "sk": "sk-" + "proj0123456789abcdefghij", "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
          "gho": "gho_" + "abcdefghijklmnopqrstuvwx", "pat": "github_pat_" + "11ABCDEFG0123456789abcdef"}
SENTINEL = "the user's own notes: keep me\n"
BUDGET_S = 20.0  # no case may hang: each must answer well within this


@dataclass
class Case:
    cid: str
    argv: list[str]  # {d}: the case's folder
    code: int = 2
    needle: str | None = None  # what the one error (or, for exit 0, the warning) must name
    files: dict[str, bytes | str] = field(default_factory=dict)  # planted before the run, relative to {d}
    setup: Callable[[Path], None] | None = None  # more planting (symlinks, run dirs)
    check: Callable[[Path, str, str], None] | None = None  # extra assertions after the run

    def __str__(self) -> str:
        return self.cid


# --------------------------------------------------------------------------- the harness

def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under root: a file's content hash, a folder's mode, a link's target."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _stub_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for tool in ("squeue", "sacct", "scontrol", "scancel", "sbatch", "sinfo", "sacctmgr"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # a bug: shown as the interpreter would show it
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    d = tmp_path / "case"
    d.mkdir()
    _stub_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub cannot be reached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LAUNCHER_CLUSTERS", raising=False)
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(d)
    existing = d / "existing"  # an existing --out with the user's own file in it
    existing.mkdir()
    (existing / "sentinel.txt").write_text(SENTINEL)
    return d


def run_case(case: Case, d: Path) -> None:
    for rel, content in case.files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    if case.setup:
        case.setup(d)
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    before = _snapshot(d.parent)
    t0 = time.monotonic()
    code, out, err = invoke(argv)
    took = time.monotonic() - t0
    after = _snapshot(d.parent)
    text = out + err
    assert "Traceback" not in text, f"{case}: traceback\n{text[-3000:]}"
    assert code == case.code, f"{case}: exit {code}, expected {case.code}\n{text[-3000:]}"
    assert took < BUDGET_S, f"{case}: took {took:.1f} s"
    errors = [ln for ln in err.splitlines() if ln.startswith(("error:", "Error:"))]
    if case.code == 2:
        assert len(errors) == 1, f"{case}: expected one error message, got {errors}\n{err[-3000:]}"
        assert len(err) < 20_000, f"{case}: error output of {len(err)} characters"
        if case.needle:
            assert case.needle in err, f"{case}: the error does not name {case.needle!r}\n{err[-3000:]}"
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"{case}: refused, but wrote or changed {changed}"
    else:
        assert not errors, f"{case}: exit 0 with an error message\n{err[-3000:]}"
        if case.needle:
            assert case.needle in err, f"{case}: the warning does not name {case.needle!r}\n{err[-3000:]}"
    assert (d / "existing" / "sentinel.txt").read_text() == SENTINEL, f"{case}: sentinel changed"
    for rel, (kind, *_) in after.items():
        if kind != "file" or before.get(rel) == after.get(rel):
            continue
        data = (d.parent / rel).read_bytes()
        leaked = [k for k, v in {**SECRETS, **TOKENS}.items() if v.encode() in data]
        assert not leaked, f"{case}: {rel} holds the secret(s) {leaked}"
    if case.check:
        case.check(d, out, err)


# --------------------------------------------------------------------------- helpers for planting

def spec(text: str) -> dict[str, str]:
    return {"s.yaml": text}


def loop(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).symlink_to(d / name)
    return make


def run_dir(*corrupt: tuple[str, bytes | str], jobs: bool = True, adapter: bool = False) -> Callable[[Path], None]:
    """A run dir made by `launcher slurm --out {d}/rd` (with a recorded job), then files overwritten by hand."""
    def make(d: Path) -> None:
        code, out, err = invoke(["slurm", "--out", str(d / "rd")])
        assert code == 0, err
        rd = d / "rd"
        if jobs:
            from launcher.rundir.jobs import record_job
            from launcher.rundir.metrics import append, step_record

            record_job(rd, "4242", "train")
            append(rd / "logs" / "metrics.jsonl", step_record(3, 2.5, 1e-4, 1000.0, 0.5, time.time()))
            (rd / "logs" / "run-4242.out").write_text("step 3/100 loss 2.5 lr 1.000e-04 tokens/s 1,000\n")
        if adapter:
            (rd / "final").mkdir()
            (rd / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        for rel, content in corrupt:
            p = rd / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
    return make


def model_dir(cfg: Any) -> dict[str, bytes | str]:
    text = cfg if isinstance(cfg, (str, bytes)) else json.dumps(cfg)
    return {"m/config.json": text, "m/model.safetensors": b"\0"}


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 1024}
DEEP = b"[" * 50_000 + b"]" * 50_000


def bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\noptim: {{micro_batch: *a{levels - 1}}}\n"


CASES: dict[str, list[Case]] = {}


def add(cls: str, *cases: Case) -> None:
    CASES.setdefault(cls, []).extend(cases)


# --------------------------------------------------------------------------- 1. output paths

def _file(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).write_text("a regular file\n")
    return make


def _both(*fns: Callable[[Path], None] | None) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        for fn in fns:
            if fn:
                fn(d)
    return make


_TARGETS: dict[str, tuple[str, Callable[[Path], None] | None, str]] = {
    "under-a-file": ("{d}/afile/out", _file("afile"), "afile"),
    "under-a-file-deeper": ("{d}/afile/a/b/out", _file("afile"), "afile"),
    "in-proc": ("/proc/launcher-hostile/out", None, "/proc/launcher-hostile"),
    "in-sys": ("/sys/launcher-hostile", None, "/sys/launcher-hostile"),
    "under-dev-null": ("/dev/null/out", None, "/dev/null"),
    "name-over-255-bytes": ("{d}/" + "n" * 300, None, "too long"),
    "utf8-name-over-255-bytes": ("{d}/" + "é" * 140, None, "too long"),
    "symlink-loop": ("{d}/loopy", loop("loopy"), "loopy"),
    "under-a-symlink-loop": ("{d}/loopy/out", loop("loopy"), "loopy"),
}
for _name, (_path, _setup, _needle) in _TARGETS.items():
    add("1-output-paths",
        Case(f"slurm-out-{_name}", ["slurm", "--out", _path], needle=_needle, setup=_setup),
        Case(f"slurm-out-force-{_name}", ["slurm", "--out", _path, "--force"], needle=_needle, setup=_setup),
        Case(f"config-o-{_name}", ["config", "-o", _path if "loop" in _name or "255" in _name else _path + ".json"],
             needle=_needle, setup=_setup),
        Case(f"write-presets-{_name}", ["config", "--write-presets", _path], needle=_needle, setup=_setup))


def _shared(d: Path) -> None:
    (d / "shared").mkdir()
    (d / "shared").chmod(0o1777)


def _mode_kept(d: Path, out: str, err: str) -> None:
    assert stat.S_IMODE((d / "shared").stat().st_mode) == 0o1777, "launcher changed the mode of a folder it did not make"


def _made_private(d: Path, out: str, err: str) -> None:
    assert stat.S_IMODE((d / "new").stat().st_mode) == 0o700


add("1-output-paths",
    Case("slurm-force-into-a-shared-empty-dir-keeps-its-mode", ["slurm", "--out", "{d}/shared", "--force"], code=0,
         setup=_shared, check=_mode_kept),
    Case("slurm-into-a-shared-empty-dir-keeps-its-mode", ["slurm", "--out", "{d}/shared"], code=0, setup=_shared,
         check=_mode_kept),
    Case("slurm-new-dir-is-made-private", ["slurm", "--out", "{d}/new"], code=0, check=_made_private),
    Case("slurm-out-existing-non-empty", ["slurm", "--out", "{d}/existing"], needle="not empty"),
    Case("slurm-out-force-existing-keeps-the-users-file", ["slurm", "--out", "{d}/existing", "--force"], code=0),
    Case("slurm-out-is-a-file", ["slurm", "--out", "{d}/existing/sentinel.txt"], needle="sentinel.txt"),
    Case("config-o-existing-other-content", ["config", "-o", "{d}/existing/sentinel.txt"], needle="--force"),
    Case("config-o-is-a-folder", ["config", "-o", "{d}/existing"], needle="existing"),
    Case("write-presets-onto-a-file", ["config", "--write-presets", "{d}/existing/sentinel.txt"],
         needle="sentinel.txt"),
)


# --------------------------------------------------------------------------- 2. run-dir files

_RUN_DIR_FILES: dict[str, tuple[str, bytes | str]] = {
    "jobs-not-json": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n{"job_id": "43", "kind\n'),
    "jobs-a-list": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n[1, 2, 3]\n'),
    "jobs-binary": ("jobs.jsonl", b'{"job_id": "4242", "kind": "train"}\n\xff\xfe\x00\x81binary\n'),
    "jobs-a-number": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n42\n'),
    "jobs-no-job-id": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n{"kind": "train"}\n'),
    "jobs-job-id-a-list": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n{"job_id": [1], "kind": "x"}\n'),
    "jobs-deep-nesting": ("jobs.jsonl", b'{"job_id": "4242", "kind": "train"}\n' + DEEP + b"\n"),
    "jobs-cut-off": ("jobs.jsonl", '{"job_id": "4242", "kind": "train"}\n{"job_id": "99'),
    "manifest-not-json": ("manifest.json", "{not json"),
    "manifest-a-list": ("manifest.json", "[1, 2]"),
    "manifest-binary": ("manifest.json", b"\xff\xfe\x00\x81"),
    "manifest-empty": ("manifest.json", ""),
    "manifest-deep-nesting": ("manifest.json", DEEP),
    "manifest-wrong-types": ("manifest.json", json.dumps({"attempts": [{"start_step": "x", "end_step": [1],
                                                                         "tokens_per_step": "many"}],
                                                           "final": [1], "plan": 5, "created": "yesterday"})),
    "manifest-huge-created": ("manifest.json", json.dumps({"created": 1e300, "plan": {"world_size": "two"}})),
    "spec-not-yaml": ("spec.yaml", "optim: {lr: [\n"),
    "spec-a-list": ("spec.yaml", "- 1\n- 2\n"),
    "spec-binary": ("spec.yaml", b"\xff\xfe\x00\x81"),
    "spec-alias-bomb": ("spec.yaml", bomb()),
    "spec-duplicate-key": ("spec.yaml", "name: a\nname: b\n"),
    "spec-sections-wrong-type": ("spec.yaml", "optim: 5\nmethod: [1]\nmodel: 7\nname: [x]\n"),
    "spec-empty": ("spec.yaml", ""),
    "metrics-not-json": ("logs/metrics.jsonl", '{"step": 3, "loss": 2.5}\n{"step": 4, "lo\n'),
    "metrics-a-list": ("logs/metrics.jsonl", '{"step": 3, "loss": 2.5}\n[1, 2]\n'),
    "metrics-binary": ("logs/metrics.jsonl", b'{"step": 3, "loss": 2.5}\n\xff\xfe\x00\n'),
    "metrics-wrong-types": ("logs/metrics.jsonl", '{"step": 3, "loss": 2.5}\n{"step": "four", "loss": "low"}\n'),
    "metrics-bool-step": ("logs/metrics.jsonl", '{"step": true, "loss": 2.5}\n'),
    "metrics-deep-nesting": ("logs/metrics.jsonl", b'{"step": 3, "loss": 2.5}\n' + DEEP + b"\n"),
}
_READERS = {"status": ["status", "{d}/rd"], "status-json": ["status", "--json", "{d}/rd"],
            "cost": ["cost", "{d}/rd"], "cancel": ["cancel", "{d}/rd"], "logs": ["logs", "{d}/rd"],
            "runs": ["runs", "{d}"], "runs-json": ["runs", "--json", "{d}"]}
_UNPARSABLE_MANIFEST = ("manifest-not-json", "manifest-a-list", "manifest-binary", "manifest-empty",
                        "manifest-deep-nesting")
_UNREADABLE_SPEC = ("spec-not-yaml", "spec-binary", "spec-alias-bomb", "spec-duplicate-key")


def _expect(variant: str, reader: str) -> tuple[int, str | None]:
    """(exit code, what stderr names) of a reader meeting one damaged file: readers go on with the rest."""
    if variant.startswith("jobs-"):
        return 0, "jobs.jsonl:2"
    if variant.startswith("metrics-"):
        return 0, "metrics.jsonl" if reader in ("cost", "runs", "runs-json") else None
    if variant.startswith("manifest-"):
        return 0, "manifest.json" if variant in _UNPARSABLE_MANIFEST and reader.startswith("runs") else None
    # spec.yaml: cost needs the spec's prices (exit 2 naming it); the others answer without it
    if reader == "cost" and variant != "spec-empty":
        return 2, "optim" if variant == "spec-sections-wrong-type" else "spec.yaml"
    return 0, "spec.yaml" if variant in _UNREADABLE_SPEC and reader.startswith("runs") else None


for _variant, (_rel, _content) in _RUN_DIR_FILES.items():
    for _reader, _argv in _READERS.items():
        _code, _needle = _expect(_variant, _reader)
        add("2-run-dir-files", Case(f"{_reader}-{_variant}", _argv, code=_code, needle=_needle,
                                    setup=run_dir((_rel, _content))))
for _variant in _UNPARSABLE_MANIFEST:
    add("2-run-dir-files", Case(f"slurm-force-over-{_variant}", ["slurm", "--out", "{d}/rd", "--force"],
                                needle="manifest.json", setup=run_dir(_RUN_DIR_FILES[_variant])))
add("2-run-dir-files", Case("slurm-force-over-manifest-wrong-types", ["slurm", "--out", "{d}/rd", "--force"], code=0,
                            setup=run_dir(_RUN_DIR_FILES["manifest-wrong-types"])))
for _name, _content in {"corrupt": "{peft_type: LORA", "a-list": '["LORA"]', "binary": b"\xff\xfe\x00",
                        "empty": "", "a-string": '"LORA"', "deep-nesting": DEEP}.items():
    add("2-run-dir-files", Case(f"merge-adapter-config-{_name}", ["merge", "{d}/rd", "--out", "{d}/merged"],
                                needle="adapter_config.json",
                                setup=run_dir(("final/adapter_config.json", _content))))


def _loop_run_dir(d: Path) -> None:
    (d / "rd").symlink_to(d / "rd")


for _reader, _argv in {**_READERS, "merge": ["merge", "{d}/rd", "--out", "{d}/merged"],
                       "eval": ["eval", "{d}/rd"], "from": ["slurm", "--from", "{d}/rd", "--out", "{d}/new"]}.items():
    add("2-run-dir-files", Case(f"{_reader}-run-dir-is-a-symlink-loop", _argv,
                                code=0 if _reader.startswith("runs") else 2,
                                needle=None if _reader.startswith("runs") else "rd", setup=_loop_run_dir))


def _good_and_bad(d: Path) -> None:
    run_dir(("manifest.json", "[1]"), ("spec.yaml", "- x\n"), ("jobs.jsonl", b"\xff\n"),
            ("logs/metrics.jsonl", "[]\n"))(d)
    code, _, err = invoke(["slurm", "--out", str(d / "good"), "--name", "goodrun"])
    assert code == 0, err


def _lists_the_good_one(d: Path, out: str, err: str) -> None:
    assert "goodrun" in out and str(d / "rd") in out


add("2-run-dir-files", Case("runs-one-bad-run-dir-does-not-hide-the-others", ["runs", "{d}"], code=0,
                            needle="jobs.jsonl:1", setup=_good_and_bad, check=_lists_the_good_one))


# --------------------------------------------------------------------------- 3. model configs, cluster profiles

_CONFIGS: dict[str, tuple[Any, str]] = {
    "a-list": ([LLAMA], "config.json"),
    "a-string": ('"llama"', "config.json"),
    "a-number": ("42", "config.json"),
    "null": ("null", "config.json"),
    "not-json": ("{model_type: llama", "config.json"),
    "binary": (b"\xff\xfe\x00\x81", "config.json"),
    "empty": ("", "config.json"),
    "deep-nesting": (DEEP, "config.json"),
    "heads-zero": ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads"),
    "heads-negative": ({**LLAMA, "num_attention_heads": -4}, "num_attention_heads"),
    "hidden-a-string": ({**LLAMA, "hidden_size": "64"}, "hidden_size"),
    "layers-a-string": ({**LLAMA, "num_hidden_layers": "2"}, "num_hidden_layers"),
    "vocab-a-float": ({**LLAMA, "vocab_size": 256.5}, "vocab_size"),
    "vocab-true": ({**LLAMA, "vocab_size": True}, "vocab_size"),
    "intermediate-a-list": ({**LLAMA, "intermediate_size": [128]}, "intermediate_size"),
    "kv-heads-zero": ({**LLAMA, "num_key_value_heads": 0}, "num_key_value_heads"),
    "kv-heads-not-dividing": ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads"),
    "head-dim-a-string": ({**LLAMA, "head_dim": "16"}, "head_dim"),
    "max-positions-a-string": ({**LLAMA, "max_position_embeddings": "1024"}, "max_position_embeddings"),
    "missing-hidden-size": ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
    "text-config-a-list": ({"model_type": "llava", "text_config": [LLAMA]}, "text_config"),
    "text-config-a-string": ({"model_type": "llava", "text_config": "llama"}, "text_config"),
    "text-config-bad-size": ({"model_type": "llava", "text_config": {**LLAMA, "hidden_size": "x"}}, "hidden_size"),
}
for _name, (_cfg, _needle) in _CONFIGS.items():
    add("3-model-configs",
        Case(f"estimate-config-{_name}", ["estimate", "--model", "{d}/m"], needle=_needle, files=model_dir(_cfg)),
        Case(f"config-config-{_name}", ["config", "--model", "{d}/m"], needle=_needle, files=model_dir(_cfg)),
        Case(f"slurm-config-{_name}", ["slurm", "--model", "{d}/m", "--out", "{d}/new"], needle=_needle,
             files=model_dir(_cfg)))
for _name in ("a-list", "not-json", "binary", "empty", "null", "deep-nesting"):
    add("3-model-configs", Case(f"eval-config-{_name}", ["eval", "{d}/m"], needle="config.json",
                                files=model_dir(_CONFIGS[_name][0])))
add("3-model-configs",
    Case("estimate-good-config-is-accepted", ["estimate", "--model", "{d}/m"], code=0, files=model_dir(LLAMA)))

_PROFILES: dict[str, tuple[str, str]] = {
    "entry-a-list": ("lab: [1, 2]\n", "lab"),
    "entry-a-string": ("lab: gpu-cluster\n", "lab"),
    "entry-a-number": ("lab: 7\n", "lab"),
    "file-a-list": ("- lab\n", "c.yaml"),
    "file-a-string": ("lab\n", "c.yaml"),
    "file-not-yaml": ("lab: {partitions: [\n", "c.yaml"),
    "file-binary": ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "c.yaml"),
    "partitions-a-list": ("lab: {partitions: [gpu, cpu]}\n", "partitions"),
    "partition-a-list": ("lab: {partitions: {gpu: [8, h100]}}\n", "partitions.gpu"),
    "partition-a-string": ("lab: {partitions: {gpu: h100}}\n", "partitions.gpu"),
    "partition-names-mixed": ("lab: {default_partition: gpu, partitions: {1: {gpus_per_node: 0}, "
                              "gpu: {gpus_per_node: 8}}}\n", "partitions"),
    "cluster-names-mixed": ("1: {}\n2.5: {}\nlab2: {}\n", "lab"),
    "max-time-negative": ("lab: {partitions: {gpu: {max_time: -5}}}\n", "partitions.gpu.max_time"),
    "max-time-zero": ("lab: {partitions: {gpu: {max_time: 0}}}\n", "partitions.gpu.max_time"),
    "max-time-junk": ("lab: {partitions: {gpu: {max_time: soon}}}\n", "partitions.gpu.max_time"),
    "max-time-true": ("lab: {partitions: {gpu: {max_time: true}}}\n", "partitions.gpu.max_time"),
    "gpus-true": ("lab: {partitions: {gpu: {gpus_per_node: true}}}\n", "partitions.gpu.gpus_per_node"),
    "gpus-a-string": ("lab: {partitions: {gpu: {gpus_per_node: '8'}}}\n", "partitions.gpu.gpus_per_node"),
    "price-cheap": ("lab: {partitions: {gpu: {usd_per_gpu_hour: cheap}}}\n", "usd_per_gpu_hour"),
    "price-negative": ("lab: {partitions: {gpu: {usd_per_gpu_hour: -2}}}\n", "usd_per_gpu_hour"),
    "price-nan": ("lab: {partitions: {gpu: {usd_per_gpu_hour: .nan}}}\n", "usd_per_gpu_hour"),
    "max-nodes-zero": ("lab: {partitions: {gpu: {max_nodes: 0}}}\n", "max_nodes"),
    "mem-junk": ("lab: {partitions: {gpu: {mem_per_node: lots}}}\n", "mem_per_node"),
    "duplicate-key": ("lab: {account: a}\nlab: {account: b}\n", "lab"),
    "unknown-key": ("lab: {acount: ml}\n", "acount"),
    "env-a-list": ("lab: {env: [A, B]}\n", "env"),
    "secret-env-name": ("lab: {env: {AWS_SESSION_TOKEN: x}}\n", "AWS_SESSION_TOKEN"),
    "alias-bomb": (bomb().replace("optim: {micro_batch:", "lab: {setup:"), "c.yaml"),
}
for _name, (_text, _needle) in _PROFILES.items():
    _files = {"c.yaml": _text.encode("latin-1") if _name == "file-binary" else _text}
    add("3-cluster-profiles",
        Case(f"spec-profile-{_name}", ["spec", "--cluster", "lab", "--clusters", "{d}/c.yaml"], needle=_needle,
             files=_files),
        Case(f"slurm-profile-{_name}", ["slurm", "--cluster", "lab", "--clusters", "{d}/c.yaml", "--out", "{d}/new"],
             needle=_needle, files=_files))


# --------------------------------------------------------------------------- 4. YAML edge cases

_YAML: dict[str, tuple[str | bytes, str]] = {
    "duplicate-top-level": ("name: a\noptim: {lr: 0.1}\nname: b\n", "'name'"),
    "duplicate-section": ("optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "'optim'"),
    "duplicate-nested": ("optim:\n  lr: 0.1\n  max_steps: 5\n  lr: 0.2\n", "'lr'"),
    "duplicate-in-zero-extra": ("zero:\n  extra:\n    a: {b: 1, b: 2}\n", "'b'"),
    "duplicate-in-env": ("cluster:\n  env:\n    FOO: '1'\n    FOO: '2'\n", "'FOO'"),
    "alias-bomb": (bomb(), "expands to more than"),
    "alias-bomb-in-extra": (bomb().replace("optim: {micro_batch:", "zero: {extra: {x:") .replace("}\n", "}}\n"),
                            "expands to more than"),
    "alias-bomb-in-name": (bomb().replace("optim: {micro_batch:", "name: [{x:").replace("}\n", "}]\n"),
                           "expands to more than"),
    "recursive-alias": ("a: &a [*a]\n", "nested more than"),
    "deep-flow-nesting": ("zero: {extra: {x: " + "[" * 5000 + "]" * 5000 + "}}\n", "nested"),
    "deep-block-nesting": ("zero:\n  extra:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(200))
                           + "  " * 202 + "v: 1\n", "nested more than"),
    "not-a-mapping": ("- optim\n- zero\n", "s.yaml"),
    "a-scalar": ("hello\n", "s.yaml"),
    "two-documents": ("name: a\n---\nname: b\n", "s.yaml"),
    "tab-indent": ("optim:\n\tlr: 0.1\n", "s.yaml"),
    "control-character": ("name: a\x01b\n", "s.yaml"),
    "not-utf8": (b"name: \xff\xfe\n", "s.yaml"),
    "unclosed-flow": ("optim: {lr: 0.1\n", "s.yaml"),
    "unknown-tag": ("optim: !!python/object:os.system {lr: 1}\n", "s.yaml"),
    "huge-unknown-key": ("optim:\n  " + "x" * 1000 + ": 1\n", "optim."),
    "huge-key-beyond-yaml-limit": ("optim: {" + "x" * 100_000 + ": 1}\n", "s.yaml"),
    "huge-string-number": ("optim: {micro_batch: '" + "9" * 100_000 + "'}\n", "optim.micro_batch"),
}
_BOOLS = ["optim.micro_batch", "optim.lr", "optim.max_steps", "optim.warmup_steps", "optim.seed",
          "optim.weight_decay", "optim.grad_clip", "optim.global_batch", "data.seq_len", "data.eval_fraction",
          "data.num_proc", "method.lora.r", "method.lora.alpha", "method.lora.dropout", "zero.stage",
          "zero.reduce_bucket_size", "precision.initial_scale_power", "cluster.nodes", "cluster.gpus_per_node",
          "cluster.nproc_per_node", "cluster.signal_grace_s", "cluster.max_requeues", "cluster.usd_per_gpu_hour",
          "cluster.hang_timeout_s", "cluster.nccl.timeout_s", "output.save_every", "output.keep_last"]
_STRINGS = ["optim.micro_batch", "optim.lr", "optim.max_steps", "data.seq_len", "cluster.nodes",
            "method.lora.alpha", "zero.stage"]


def _nested(dotted: str, value: str) -> str:
    keys = dotted.split(".")
    return "".join("  " * i + f"{k}:\n" for i, k in enumerate(keys[:-1])) + "  " * (len(keys) - 1) + \
        f"{keys[-1]}: {value}\n"


for _f in _BOOLS:
    _YAML[f"bool-for-{_f}"] = (_nested(_f, "true"), _f)
for _f in _STRINGS:
    _YAML[f"quoted-number-for-{_f}"] = (_nested(_f, "'4'"), _f)
for _f in ("optim.lr", "optim.weight_decay", "method.lora.alpha", "cluster.usd_per_gpu_hour"):
    _YAML[f"inf-for-{_f}"] = (_nested(_f, ".inf"), _f)
    _YAML[f"nan-for-{_f}"] = (_nested(_f, ".nan"), _f)
for _name, (_text, _needle) in _YAML.items():
    add("4-yaml", Case(f"spec-{_name}", ["spec", "{d}/s.yaml"], needle=_needle, files=spec(_text)))
    if not _name.startswith(("bool-", "quoted-", "inf-", "nan-")):
        add("4-yaml", Case(f"slurm-{_name}", ["slurm", "{d}/s.yaml", "--out", "{d}/existing", "--force"],
                           needle=_needle, files=spec(_text)))
for _name, _text in {"bool-via-set": "optim.micro_batch=true", "bool-lr-via-set": "optim.lr=true",
                     "duplicate-via-set": "zero.extra={a: 1, a: 2}", "bomb-via-set": "name=" + "[" * 3000}.items():
    add("4-yaml", Case(f"config-{_name}", ["config", "--set", _text], needle=_text.split("=")[0]))

_ACCEPTED_YAML = {"exponent-float": "optim: {lr: 1e-4}\n", "base60-time": "cluster: {time: 24:00:00}\n",
                  "int-for-float": "optim: {lr: 1, weight_decay: 0}\n", "empty-file": "",
                  "comments-only": "# nothing\n"}
for _name, _text in _ACCEPTED_YAML.items():
    add("4-yaml", Case(f"spec-accepts-{_name}", ["spec", "{d}/s.yaml"], code=0, files=spec(_text)))


def _lr_is(value: float) -> Callable[[Path, str, str], None]:
    def check(d: Path, out: str, err: str) -> None:
        import yaml

        assert yaml.safe_load(out)["optim"]["lr"] == value
    return check


add("4-yaml",
    Case("spec-exponent-float-keeps-its-meaning", ["spec", "{d}/s.yaml"], code=0, files=spec("optim: {lr: 3e-4}\n"),
         check=_lr_is(3e-4)),
    Case("spec-small-alias-use-is-accepted", ["spec", "{d}/s.yaml"], code=0,
         files=spec("cluster: {setup: &s [module load cuda]}\n"), check=None))


# --------------------------------------------------------------------------- 5. values checked where they enter

_VALUES: dict[str, tuple[list[str], str]] = {
    "cluster-time-negative": (["--set", "cluster.time=-5"], "cluster.time"),
    "cluster-time-zero": (["--set", "cluster.time=0"], "cluster.time"),
    "cluster-time-negative-string": (["--set", "cluster.time='-5'"], "cluster.time"),
    "cluster-time-junk": (["--set", "cluster.time=soon"], "cluster.time"),
    "cluster-time-zero-clock": (["--set", "cluster.time='00:00:00'"], "cluster.time"),
    "prep-time-negative": (["--set", "cluster.prep.time=-5"], "cluster.prep.time"),
    "prep-time-zero": (["--set", "cluster.prep.time=0"], "cluster.prep.time"),
    "prep-time-junk": (["--set", "cluster.prep.time=later"], "cluster.prep.time"),
    "seed-2-to-the-32": (["--set", f"optim.seed={2**32}"], "optim.seed"),
    "seed-huge": (["--set", f"optim.seed={10**30}"], "optim.seed"),
    "seed-negative": (["--set", "optim.seed=-1"], "optim.seed"),
    "micro-batch-huge": (["--set", f"optim.micro_batch={10**12}"], "optim.micro_batch"),
    "lr-negative": (["--lr", "-0.1"], "optim.lr"),
    "lr-nan-flag": (["--lr", "nan"], "optim.lr"),
    "lr-inf-flag": (["--lr", "inf"], "optim.lr"),
    "nodes-zero": (["--set", "cluster.nodes=0"], "cluster.nodes"),
    "gpus-negative": (["--set", "cluster.gpus_per_node=-1"], "cluster.gpus_per_node"),
    "price-negative": (["--set", "cluster.usd_per_gpu_hour=-1"], "cluster.usd_per_gpu_hour"),
    "price-a-word": (["--set", "cluster.usd_per_gpu_hour=cheap"], "cluster.usd_per_gpu_hour"),
    "betas-out-of-range": (["--set", "optim.betas=[0.9, 1.5]"], "optim.betas"),
    "betas-nan": (["--set", "optim.betas=[.nan, 0.9]"], "optim.betas"),
    "eval-fraction-one": (["--set", "data.eval_fraction=1"], "data.eval_fraction"),
    "clusters-file-missing": (["--clusters", "{d}/no-such-clusters.yaml"], "no-such-clusters.yaml"),
    "tracker-unknown": (["--set", "output.trackers=[comet]"], "output.trackers"),
    "tracker-twice": (["--set", "output.trackers=[wandb, wandb]"], "output.trackers"),
    "tracker-a-word": (["--set", "output.trackers=wandb"], "output.trackers"),
    "wandb-mode-junk": (["--set", "output.wandb.mode=cloud"], "output.wandb.mode"),
    "mlflow-uri-scheme": (["--set", "output.mlflow.tracking_uri=ftp://host/x"], "output.mlflow.tracking_uri"),
    "mlflow-uri-no-host": (["--set", "output.mlflow.tracking_uri=http://"], "output.mlflow.tracking_uri"),
    "mlflow-uri-spaces": (["--set", "output.mlflow.tracking_uri='http://a b:5000'"], "output.mlflow.tracking_uri"),
}
def _no_mlflow_env(d: Path) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the fixture's monkeypatch restores it


add("5-values",
    Case("slurm-mlflow-without-a-server", ["slurm", "--set", "output.trackers=[mlflow]", "--out", "{d}/new"],
         needle="output.mlflow.tracking_uri", setup=_no_mlflow_env),
    Case("slurm-profile-mlflow-uri-junk", ["slurm", "--cluster", "lab", "--clusters", "{d}/c.yaml", "--out", "{d}/new"],
         needle="mlflow_tracking_uri", files={"c.yaml": "lab: {mlflow_tracking_uri: 'not a uri'}\n"}),
    Case("sync-not-a-run-dir", ["sync", "{d}/nowhere"], needle="not a run dir"),
    Case("sync-run-without-wandb", ["sync", "{d}/rd"], needle="no wandb run", setup=run_dir()),
    Case("sync-damaged-trackers-file", ["sync", "{d}/rd"], needle="no wandb run",
         setup=run_dir(("trackers.json", "{cut off"))))
for _name, (_args, _needle) in _VALUES.items():
    add("5-values",
        Case(f"spec-{_name}", ["spec", *_args], needle=_needle),
        Case(f"slurm-{_name}", ["slurm", *_args, "--out", "{d}/existing", "--force"], needle=_needle))
add("5-values",
    Case("slurm-time-flag-negative", ["slurm", "--time", "-5", "--out", "{d}/new"], needle="cluster.time"),
    Case("slurm-time-flag-zero", ["slurm", "--time", "0:00", "--out", "{d}/new"], needle="cluster.time"),
    Case("estimate-clusters-file-missing", ["estimate", "--clusters", "{d}/nope.yaml"], needle="nope.yaml"),
    Case("bench-clusters-file-missing", ["bench", "--clusters", "{d}/nope.yaml", "--out", "{d}/b"], needle="nope.yaml"),
    Case("cost-clusters-file-missing", ["cost", "--clusters", "{d}/nope.yaml", "{d}/rd"], needle="nope.yaml",
         setup=run_dir()))
for _name, _args, _needle in [
        ("train-tokens-inf", ["--train-tokens", "inf"], "--train-tokens"),
        ("train-tokens-nan", ["--train-tokens", "nan"], "--train-tokens"),
        ("train-tokens-negative", ["--train-tokens", "-5"], "--train-tokens"),
        ("train-tokens-zero", ["--train-tokens", "0"], "--train-tokens"),
        ("train-tokens-huge", ["--train-tokens", "1e300"], "--train-tokens"),
        ("usd-negative", ["--usd-per-device-hour", "-1"], "--usd-per-device-hour"),
        ("usd-nan", ["--usd-per-device-hour", "nan"], "--usd-per-device-hour"),
        ("usd-inf", ["--usd-per-device-hour", "inf"], "--usd-per-device-hour"),
        ("device-memory-zero", ["--device-memory", "0"], "--device-memory"),
        ("device-memory-zero-gib", ["--device-memory", "0GiB"], "--device-memory"),
        ("device-memory-junk", ["--device-memory", "lots"], "--device-memory"),
        ("device-memory-negative", ["--device-memory", "-80GiB"], "--device-memory"),
        ("mfu-zero", ["--mfu", "0"], "--mfu"),
        ("gpu-unknown", ["--gpu", "H9000"], "H9000")]:
    add("5-values", Case(f"estimate-{_name}", ["estimate", "--gpus-per-node", "1", *_args], needle=_needle))
add("5-values", Case("estimate-sane-numbers-are-accepted", ["estimate", "--gpus-per-node", "1", "--train-tokens",
                                                            "1e9", "--usd-per-device-hour", "2.5", "--device-memory",
                                                            "80GiB"], code=0))
for _name, _text, _needle in [
        ("price-cheap", "usd_per_device_hour: cheap\n", "usd_per_device_hour"),
        ("price-negative", "usd_per_device_hour: -1\n", "usd_per_device_hour"),
        ("price-nan", "usd_per_device_hour: .nan\n", "usd_per_device_hour"),
        ("price-true", "usd_per_device_hour: true\n", "usd_per_device_hour"),
        ("tflops-zero", "device_tflops: 0\n", "device_tflops"),
        ("tflops-a-word", "device_tflops: fast\n", "device_tflops"),
        ("steps-true", "steps: true\n", "steps"),
        ("steps-zero", "steps: 0\n", "steps"),
        ("axes-a-list", "axes: [zero, method]\n", "axes"),
        ("axis-bad-value", "axes: {zero: [2, three]}\n", "three"),
        ("matrix-a-list", "- zero\n", "matrix.yaml"),
        ("matrix-duplicate-key", "steps: 2\nsteps: 3\n", "'steps'"),
        ("matrix-alias-bomb", bomb().replace("optim: {micro_batch:", "base: {name:"), "expands"),
        ("base-bool-micro-batch", "base: {optim: {micro_batch: true}}\n", "optim.micro_batch")]:
    add("5-values", Case(f"bench-matrix-{_name}", ["bench", "--matrix", "{d}/matrix.yaml", "--out", "{d}/b"],
                         needle=_needle, files={"matrix.yaml": _text}))
for _name, _opt in [("usd-nan", ["--usd-per-device-hour", "nan"]), ("usd-negative", ["--usd-per-device-hour", "-1"]),
                    ("tflops-inf", ["--device-tflops", "inf"]), ("tflops-zero", ["--device-tflops", "0"])]:
    add("5-values", Case(f"bench-flag-{_name}", ["bench", *_opt, "--out", "{d}/b"], needle=_opt[0]))


# --------------------------------------------------------------------------- 6. raw DeepSpeed keys

_EXTRA: dict[str, tuple[list[str], str]] = {
    "prefix-stage3-via-extra": (["--method", "prefix", "--set", "zero.extra.zero_optimization.stage=3"],
                                "zero.extra.zero_optimization.stage"),
    "prompt-stage3-via-extra": (["--method", "prompt", "--set", "zero.extra.zero_optimization.stage=3"],
                                "zero.extra.zero_optimization.stage"),
    "param-offload-at-stage2-via-extra": (["--zero", "2", "--set", "zero.extra.zero_optimization.offload_param.device=cpu"],
                                          "offload_param"),
    "param-offload-at-stage1-via-extra": (["--zero", "1", "--set",
                                           "zero.extra.zero_optimization.offload_param={device: cpu}"],
                                          "offload_param"),
    "optimizer-offload-at-stage0-via-extra": (["--zero", "0", "--set",
                                               "zero.extra.zero_optimization.offload_optimizer.device=cpu"],
                                              "offload_optimizer"),
    "nvme-without-path-via-extra": (["--zero", "3", "--set",
                                     "zero.extra.zero_optimization.offload_param.device=nvme"], "nvme"),
    "stage-differs-via-extra": (["--zero", "2", "--set", "zero.extra.zero_optimization.stage=1"],
                                "zero.extra.zero_optimization.stage"),
    "stage-junk-via-extra": (["--set", "zero.extra.zero_optimization.stage=three"],
                             "zero.extra.zero_optimization.stage"),
    "stage-true-via-extra": (["--set", "zero.extra.zero_optimization.stage=true"],
                             "zero.extra.zero_optimization.stage"),
    "offload-device-junk-via-extra": (["--zero", "3", "--set",
                                       "zero.extra.zero_optimization.offload_param.device=gpu"], "offload_param"),
    "zero-optimization-a-list": (["--set", "zero.extra.zero_optimization=[1]"], "zero.extra.zero_optimization"),
    "batch-size-via-extra": (["--set", "zero.extra.train_batch_size=64"], "zero.extra.train_batch_size"),
    "fp16-and-bf16-via-extra": (["--precision", "bf16", "--set", "zero.extra.fp16.enabled=true"], "zero.extra"),
}
for _name, (_args, _needle) in _EXTRA.items():
    add("6-deepspeed-extra",
        Case(f"config-{_name}", ["config", *_args], needle=_needle),
        Case(f"slurm-{_name}", ["slurm", *_args, "--out", "{d}/new"], needle=_needle))
add("6-deepspeed-extra",
    Case("config-param-offload-at-stage3-via-extra-is-accepted",
         ["config", "--zero", "3", "--set", "zero.extra.zero_optimization.offload_param.device=cpu"], code=0),
    Case("config-same-stage-via-extra-is-accepted",
         ["config", "--zero", "2", "--set", "zero.extra.zero_optimization.stage=2"], code=0))


# --------------------------------------------------------------------------- 7. data files

_GOOD = b'{"text": "the quick brown fox jumps over the lazy dog"}\n' * 50
_GZ = gzip.compress(_GOOD * 40)
_DATA: dict[str, tuple[str, bytes, str, list[str]]] = {
    "deep-json-line": ("d.jsonl", _GOOD[:60] + b'{"text": ' + DEEP + b"}\n", "line 2", []),
    "deep-json-first-line": ("d.jsonl", DEEP + b"\n", "line 1", []),
    "deep-json-array": ("d.json", b'[{"text": "a"}, ' + DEEP + b"]", "d.json", []),
    "deep-json-columns": ("d.json", b'{"text": ' + DEEP + b"}", "d.json", []),
    "csv-field-over-128k": ("d.csv", b'text\n"' + b"a" * 200_000 + b'"\n', "line", []),
    "csv-field-over-128k-later": ("d.csv", b"text\nhello\nworld\n\"" + b"b" * 140_000 + b'"\n', "line", []),
    "gz-not-gzip": ("d.jsonl.gz", _GOOD, "d.jsonl.gz", []),
    "gz-truncated": ("d.jsonl.gz", _GZ[: len(_GZ) // 2], "d.jsonl.gz", []),
    "gz-truncated-early": ("d.jsonl.gz", _GZ[:40], "d.jsonl.gz", []),
    "gz-corrupt-middle": ("d.jsonl.gz", _GZ[:200] + b"\0" * 64 + _GZ[264:], "d.jsonl.gz", []),
    "gz-empty-member": ("d.jsonl.gz", gzip.compress(b""), "d.jsonl.gz", []),
    "gz-csv-truncated": ("d.csv.gz", gzip.compress(b"text\n" + b"hello world\n" * 20000)[:300], "d.csv.gz", []),
    "gz-txt-not-gzip": ("d.txt.gz", b"plain text", "d.txt.gz", []),
    "jsonl-not-json": ("d.jsonl", b'{"text": "a"}\n{"text": \n', "line 2", []),
    "jsonl-binary": ("d.jsonl", b"\xff\xfe\x00\x81\n", "d.jsonl", []),
    "jsonl-a-list-line": ("d.jsonl", b"[1, 2]\n", "line 1", []),
    "jsonl-text-a-number": ("d.jsonl", b'{"text": 5}\n', "line 1", []),
    "jsonl-empty": ("d.jsonl", b"", "d.jsonl", []),
    "jsonl-only-blank-lines": ("d.jsonl", b"\n\n\n", "d.jsonl", []),
    "sft-messages-a-string": ("d.jsonl", b'{"messages": "hi"}\n', "line 1", ["--task", "sft"]),
    "sft-deep-messages": ("d.jsonl", b'{"messages": ' + DEEP + b"}\n", "line 1", ["--task", "sft"]),
    "parquet-not-parquet": ("d.parquet", b"PAR1 not really", "d.parquet", []),
}
for _name, (_file, _content, _needle, _extra) in _DATA.items():
    add("7-data-files",
        Case(f"slurm-{_name}", ["slurm", "--data", "{d}/" + _file, *_extra, "--out", "{d}/new"], needle=_needle,
             files={_file: _content}),
        Case(f"slurm-force-{_name}", ["slurm", "--data", "{d}/" + _file, *_extra, "--out", "{d}/existing", "--force"],
             needle=_needle, files={_file: _content}))
add("7-data-files",
    Case("slurm-csv-with-a-nul-byte-is-accepted", ["slurm", "--data", "{d}/d.csv", "--out", "{d}/new"], code=0,
         files={"d.csv": b'text\n"a\x00b"\n'}),
    Case("slurm-good-gz-is-accepted", ["slurm", "--data", "{d}/ok.jsonl.gz", "--out", "{d}/new"], code=0,
         files={"ok.jsonl.gz": _GZ}),
    Case("slurm-missing-data-file", ["slurm", "--data", "{d}/nope.jsonl", "--out", "{d}/new"], needle="nope.jsonl"))


# --------------------------------------------------------------------------- 8. hub ids

_HUB: dict[str, tuple[list[str], str]] = {
    "model-typo": (["--model", "acme/llama-mnii"], "acme/llama-mnii"),
    "model-single-name": (["--model", "gpt3-nonexistent"], "gpt3-nonexistent"),
    "model-with-revision": (["--model", "acme/llama-mini", "--set", "model.revision=v9"], "acme/llama-mini"),
    "dataset-typo": (["--data", "acme/corpuss"], "acme/corpuss"),
    "model-and-dataset": (["--model", "acme/m", "--data", "acme/d"], "acme/m"),
}
for _name, (_args, _needle) in _HUB.items():
    add("8-hub-ids",
        Case(f"slurm-{_name}-hub-unreachable", ["slurm", *_args, "--out", "{d}/new"], needle=_needle),
        Case(f"slurm-force-{_name}-hub-unreachable", ["slurm", *_args, "--out", "{d}/existing", "--force"],
             needle=_needle),
        Case(f"slurm-dry-run-{_name}-hub-unreachable", ["slurm", *_args, "--out", "{d}/new", "--dry-run"],
             needle=_needle),
        Case(f"slurm-{_name}-names-the-fix", ["slurm", *_args, "--out", "{d}/new"], needle="launcher stage"))


def _offline(d: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the fixture's monkeypatch restores it


add("8-hub-ids",
    Case("slurm-model-hub-offline", ["slurm", "--model", "acme/x", "--out", "{d}/new"], needle="HF_HUB_OFFLINE",
         setup=_offline),
    Case("slurm-unstaged-model-with-shared-cache", ["slurm", "--model", "acme/x", "--set",
                                                    "cluster.hf_home={d}/hf", "--out", "{d}/new"],
         needle="launcher stage SPEC"))


# --------------------------------------------------------------------------- 9. secrets

_CREDENTIAL_NAMES = ["HF_TOKEN", "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "my_api_token", "CLIENT_SECRET",
                     "DB_PASSWORD", "db_passwd", "OPENAI_API_KEY", "MyApiKey", "AWS_SECRET_ACCESS_KEY",
                     "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "SSH_PRIVATE_KEY", "wandb_api_key"]
for _k in _CREDENTIAL_NAMES:
    add("9-secrets",
        Case(f"slurm-env-name-{_k}", ["slurm", "--set", f"cluster.env.{_k}=sekret-in-spec-70399", "--out",
                                      "{d}/new"], needle=_k),
        Case(f"spec-file-env-name-{_k}", ["slurm", "{d}/s.yaml", "--out", "{d}/existing", "--force"], needle=_k,
             files=spec(f"cluster:\n  env:\n    {_k}: sekret-in-spec-70399\n")))
_TOKEN_FIELDS = ["name", "cluster.job_name", "cluster.env.SAFE_NAME", "cluster.account", "cluster.constraint",
                 "output.dir", "data.path"]
for _t, _v in TOKENS.items():
    for _f in _TOKEN_FIELDS:
        add("9-secrets", Case(f"slurm-{_t}-token-in-{_f}", ["slurm", "--set", f"{_f}={_v}", "--out", "{d}/new"],
                              needle=_f))
    add("9-secrets",
        Case(f"slurm-{_t}-token-in-setup", ["slurm", "{d}/s.yaml", "--out", "{d}/new"], needle="cluster.setup",
             files=spec(f"cluster:\n  setup: ['export X={_v}']\n")),
        Case(f"slurm-{_t}-token-in-profile-env", ["slurm", "--cluster", "lab", "--clusters", "{d}/c.yaml", "--out",
                                                   "{d}/new"], needle="cluster.env.X",
             files={"c.yaml": f"lab: {{env: {{X: '{_v}'}}}}\n"}))
def _password_not_echoed(d: Path, out: str, err: str) -> None:
    assert "sekret-in-spec-70399" not in out + err


add("9-secrets",
    Case("slurm-password-in-mlflow-uri", ["slurm", "--set", "output.mlflow.tracking_uri=http://me:sekret-in-spec-70399"
                                          "@mlflow:5000", "--out", "{d}/new"], needle="output.mlflow.tracking_uri",
         check=_password_not_echoed),
    Case("slurm-password-in-profile-mlflow-uri", ["slurm", "--cluster", "lab", "--clusters", "{d}/c.yaml", "--out",
                                                  "{d}/new"], needle="mlflow_tracking_uri", check=_password_not_echoed,
         files={"c.yaml": "lab: {mlflow_tracking_uri: 'https://me:sekret-in-spec-70399@mlflow:5000'}\n"}),
    Case("slurm-env-secrets-never-written", ["slurm", "--out", "{d}/new"], code=0),
    Case("slurm-harmless-env-is-accepted", ["slurm", "--set", "cluster.env.OMP_NUM_THREADS='4'", "--out", "{d}/new"],
         code=0))


# --------------------------------------------------------------------------- 10. nothing overwritten, nothing half-written

def _user_merge_script(d: Path) -> None:
    run_dir(jobs=False)(d)
    (d / "rd" / "merge.sbatch").write_text("#!/bin/bash\necho my own merge\n")


def _kept_merge_script(d: Path, out: str, err: str) -> None:
    assert (d / "rd" / "merge.sbatch").read_text() == "#!/bin/bash\necho my own merge\n"


def _no_half_run_dir(d: Path, out: str, err: str) -> None:
    assert not (d / "new").exists()


add("10-nothing-overwritten",
    Case("eval-out-existing-file", ["eval", "{d}/m", "--out", "{d}/existing/sentinel.txt"], needle="--force",
         files=model_dir(LLAMA)),
    Case("eval-plot-existing-file", ["eval", "{d}/rd", "--plot", "{d}/existing/sentinel.txt"], needle="--force",
         setup=run_dir()),
    Case("eval-out-under-a-file", ["eval", "{d}/m", "--out", "{d}/existing/sentinel.txt/x.json"],
         needle="sentinel.txt", files=model_dir(LLAMA)),
    Case("slurm-non-utf8-name", ["slurm", "--name", "run\udcff", "--out", "{d}/new"], needle="UTF-8",
         check=_no_half_run_dir),
    Case("slurm-non-utf8-out", ["slurm", "--out", "{d}/new\udcfe"], needle="UTF-8"),
    Case("spec-non-utf8-set", ["spec", "--set", "name=x\udcff"], needle="UTF-8"),
    Case("config-non-utf8-o", ["config", "-o", "{d}/x\udcff.json"], needle="UTF-8"),
    Case("slurm-force-keeps-a-users-merge-script", ["slurm", "--out", "{d}/rd", "--force"], code=0,
         setup=_user_merge_script, check=_kept_merge_script),
    Case("slurm-refused-after-checks-leaves-no-run-dir", ["slurm", "--model", "acme/nope", "--out", "{d}/new"],
         needle="acme/nope", check=_no_half_run_dir),
    Case("slurm-sweep-bad-value-leaves-nothing", ["slurm", "--sweep", "optim.lr=0.1,true", "--out", "{d}/new"],
         needle="optim.lr"),
    Case("slurm-then-merge-for-full-leaves-nothing", ["slurm", "--then", "merge", "--out", "{d}/new"],
         needle="--then merge"),
)


# --------------------------------------------------------------------------- the corpus

ALL = [(cls, c) for cls, cases in CASES.items() for c in cases]


@pytest.mark.parametrize("case", [c for _, c in ALL], ids=[c.cid for _, c in ALL])
def test_hostile_input(case, folder):
    run_case(case, folder)


def test_case_ids_are_unique_and_every_class_is_covered():
    ids = [c.cid for _, c in ALL]
    assert len(ids) == len(set(ids))
    classes = {cls.split("-")[0] for cls in CASES}
    assert classes >= {str(i) for i in range(1, 11)}
    assert len(ids) >= 300


def test_logs_follow_says_so_while_squeue_does_not_answer(tmp_path, capsys):
    from launcher.ops import logs

    answers = iter([None, None, None, []])
    ended = logs.follow(tmp_path, lambda line: None, poll=0.01, check_every=0.0, timeout=5,
                        is_live=lambda _: next(answers))
    err = capsys.readouterr().err
    assert ended
    assert err.count("squeue does not answer") == 1 and "squeue answers again" in err
