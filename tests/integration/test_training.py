"""Real multi-rank DeepSpeed training on CPU (gloo), through `launcher run` as a user runs it.

Runs (each once per module, shared by the tests below):
- pretrain / full / ZeRO-2 on 2 ranks
- sft / LoRA / ZeRO-3 on 2 ranks, with gradient checkpointing (LoRA + checkpointing must train)
- full / ZeRO-3 on 2 ranks (the saved full model must be the gathered weights, not empty shards)
- sft / QLoRA (nf4, bf16) with gradient checkpointing on 1 rank

"The weights the run ended with" come from the test-only hook LAUNCHER_TEST_DUMP_FINAL_WEIGHTS: after
training, rank 0 writes every (trainable, for LoRA) parameter gathered from all ranks with
deepspeed.zero.GatheredParameters, a path independent of the Trainer's save_model, which the saved
files are compared with exactly.

Tolerances, merged vs adapter logits on the same input: LoRA in fp32, 1e-4 absolute (measured ~1e-6).
QLoRA in bf16: max 0.15 and mean 0.01 absolute, and the mean error under a tenth of the adapter's own
mean effect on the logits. The two compute in a different order and rounding (x.W + x.A.B with the
4-bit base vs x.(W + A.B) with W dequantized and the sum rounded to bf16); measured max 0.06-0.09,
mean 0.004 on logits up to 2.4, while the adapter moves the logits by 0.16 on average (max 2.6).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from launcher.rundir.metrics import parse_step, parse_step_lines
from launcher.testing.faults import TEST_DUMP_ENV

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- helpers

def assert_loss_falls(proc, max_steps, drop=0.3):
    steps = parse_step_lines(proc.stdout)
    assert [s["step"] for s in steps][-1] == max_steps, proc.stdout[-3000:]
    losses = [s["loss"] for s in steps]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - drop, f"loss did not fall: {losses}"
    assert all(s["tokens_per_s"] > 0 for s in steps)
    return losses


def generate(model, tok, prompt="The function returns", n=8):
    import torch

    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + n or int(out[0, -1]) == tok.eos_token_id
    return tok.decode(out[0])


COMMON = ["--seq-len", 64, "--micro-batch", 4, "--set", "output.log_every=1"]


@pytest.fixture(scope="module")
def run_training(env, launcher):
    def run(out, *args, dump=None):
        extra = {TEST_DUMP_ENV: str(dump)} if dump else {}
        return launcher(["run", *args, *COMMON, "--out", out], env, expect=0, **extra)

    return run


# --------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def pretrain_z2(tmp_path_factory, run_training):
    out = tmp_path_factory.mktemp("pretrain_z2") / "run"
    shm_before = set(SHM.glob(SHM_BUFFERS))
    proc = run_training(out, "--nproc", 2, "--zero", 2, "--task", "pretrain", "--method", "full",
                        "--precision", "fp32", "--max-steps", 12, "--lr", 2e-3)
    pretrain_z2_shm_left = set(SHM.glob(SHM_BUFFERS)) - shm_before
    return proc, out, pretrain_z2_shm_left


SHM, SHM_BUFFERS = Path("/dev/shm"), f"deepspeed_allreduce_buffer_{os.getuid()}_*"


def test_two_cpu_ranks_leave_no_shared_memory_behind(pretrain_z2):
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm file per rank and never removes it; the ranks
    unlink their names once the group is set up, so a finished run leaves none (RAM, not disk)."""
    proc, out, left = pretrain_z2
    assert not left, sorted(map(str, left))


@pytest.fixture(scope="module")
def lora_z3(tmp_path_factory, run_training):
    d = tmp_path_factory.mktemp("lora_z3")
    out = d / "run"
    proc = run_training(out, "--nproc", 2, "--zero", 3, "--task", "sft", "--method", "lora", "--grad-ckpt",
                        "--precision", "fp32", "--max-steps", 12, "--lr", 3e-3, "--seq-len", 128,
                        dump=d / "final_weights.pt")
    return proc, out, d / "final_weights.pt"


@pytest.fixture(scope="module")
def full_z3(tmp_path_factory, run_training):
    d = tmp_path_factory.mktemp("full_z3")
    out = d / "run"
    proc = run_training(out, "--nproc", 2, "--zero", 3, "--task", "pretrain", "--method", "full",
                        "--precision", "fp32", "--max-steps", 3, "--lr", 2e-3, dump=d / "final_weights.pt")
    return proc, out, d / "final_weights.pt"


@pytest.fixture(scope="module")
def qlora_gc(tmp_path_factory, run_training):
    out = tmp_path_factory.mktemp("qlora") / "run"
    proc = run_training(out, "--nproc", 1, "--task", "sft", "--method", "qlora", "--grad-ckpt",
                        "--precision", "bf16", "--max-steps", 10, "--lr", 3e-3, "--seq-len", 128)
    return proc, out


# --------------------------------------------------------------------------- pretrain / full / ZeRO-2

def test_pretrain_full_zero2_two_ranks(pretrain_z2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, out, _ = pretrain_z2
    assert "world size 2" in proc.stdout and "ZeRO-2" in proc.stdout
    assert_loss_falls(proc, 12)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    # logs: the launch log, metrics, TensorBoard events
    assert "step 12/12" in (out / "logs" / "launch.log").read_text()
    assert len((out / "logs" / "metrics.jsonl").read_text().splitlines()) >= 12
    assert list((out / "logs" / "tb").rglob("events.out.tfevents.*"))
    # output: a plain HF model that differs from the base it started from, and generates
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    w, w0 = model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, w0)
    generate(model, AutoTokenizer.from_pretrained(out / "final"))


def test_rank_zero_records_the_attempt_in_the_manifest(pretrain_z2):
    """Devices of every rank, versions seen on the node, start and end, why it ended, and the final numbers."""
    proc, out, _ = pretrain_z2
    m = json.loads((out / "manifest.json").read_text())
    [a] = m["attempts"]
    assert a["exit_reason"] == "completed" and a["start"] < a["end"] and a["attempt"] == 0
    assert a["job_id"].startswith("local-") and a["slurm_job_id"] is None  # not in a Slurm job here
    assert a["devices"] == [{"node": a["host"], "device": "cpu", "ranks": [0, 1]}]
    assert a["environment"]["device"] == "cpu" and a["environment"]["packages"]["torch"]
    assert (a["start_step"], a["end_step"], a["steps"], a["world_size"]) == (0, 12, 12, 2)
    logged = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "loss" in r][-1]
    assert m["final"]["loss"] == a["metrics"]["loss"] == last["loss"] and m["final"]["steps"] == 12
    assert m["final"]["tokens"] == 12 * m["plan"]["tokens_per_step"] == 12 * 8 * 64
    assert m["launcher_version"] and m["data"]  # the launch record is kept beside


def test_run_from_reproduces_spec_and_deepspeed_config(tmp_path, env, launcher):
    """`launcher run --from A --out B`: B's resolved spec and DeepSpeed JSON equal A's but for output paths
    (and B records its own job ids)."""
    import yaml

    a, b = tmp_path / "a", tmp_path / "b"
    launcher(["run", "--precision", "fp32", "--max-steps", 2, "--zero", 3, "--lr", 1e-3, "--set", "optim.warmup_steps=1",
              "--set", "optim.seed=7", *COMMON, "--out", a], env, expect=0)
    launcher(["run", "--from", a, "--out", b], env, expect=0)

    def without_paths(run):
        tree = yaml.safe_load((run / "spec.yaml").read_text())
        assert tree["output"].pop("dir") == str(run)
        return tree

    assert without_paths(a) == without_paths(b)
    assert (a / "ds_config.json").read_text() == (b / "ds_config.json").read_text()
    assert (a / "plan.txt").read_text() == (b / "plan.txt").read_text()
    jobs = [json.loads((r / "jobs.jsonl").read_text().splitlines()[0])["job_id"] for r in (a, b)]
    assert jobs[0] != jobs[1] and json.loads((b / "manifest.json").read_text())["attempts"][0]["job_id"] == jobs[1]
    la, lb = (parse_step_lines((r / "logs" / "launch.log").read_text()) for r in (a, b))
    assert la == [{**x, "tokens_per_s": y["tokens_per_s"]} for x, y in zip(lb, la)]  # the same run again


# --------------------------------------------------------------------------- sft / LoRA / ZeRO-3

def test_lora_zero3_with_grad_ckpt_trains(lora_z3):
    proc, out, _ = lora_z3
    assert "world size 2" in proc.stdout and "ZeRO-3" in proc.stdout
    assert "gradient checkpointing on" in proc.stdout
    assert_loss_falls(proc, 12)


def test_lora_zero3_adapter_holds_the_trained_weights(lora_z3):
    import torch
    from safetensors.torch import load_file

    proc, out, dump = lora_z3
    saved = load_file(out / "final" / "adapter_model.safetensors")
    ended = {k.replace(".default.", "."): v for k, v in torch.load(dump).items()}
    assert set(saved) == set(ended) and len(saved) == 4 * 7 * 2  # 4 layers x 7 linear x (A, B)
    for k, v in saved.items():
        assert torch.equal(v, ended[k]), k
        r = 16
        assert (v.shape[0] == r) if "lora_A" in k else (v.shape[1] == r), (k, v.shape)
        assert v.norm() > 0, k  # lora_B starts at zero: nonzero means trained, not an empty shard
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and Path(cfg["base_model_name_or_path"]) == out / "base"


def test_lora_adapter_reloads_generates_and_merges(lora_z3, env, launcher, merge_errors, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = lora_z3
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template
    adapted = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    msgs = [{"role": "user", "content": "Write 'silver' in capital letters."}]
    generate(adapted, tok, tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

    merged_dir = tmp_path / "merged"
    launcher(["merge", out, "--out", merged_dir], env, expect=0)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    err, effect = merge_errors(adapted, merged)
    assert err.max() < 1e-4
    assert effect.max() > 1e-3  # the adapter changes the logits: the comparison means something
    generate(merged, tok)


# --------------------------------------------------------------------------- full / ZeRO-3

def test_full_zero3_saves_the_gathered_weights(full_z3):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, out, dump = full_z3
    assert "ZeRO-3" in proc.stdout
    saved = load_file(out / "final" / "model.safetensors")
    ended = torch.load(dump)
    base = load_file(out / "base" / "model.safetensors")
    assert set(saved) == set(ended) == set(base)
    for k, v in saved.items():
        assert v.shape == base[k].shape and torch.equal(v, ended[k]), k
    assert any(not torch.equal(saved[k], base[k]) for k in saved)
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    generate(model, AutoTokenizer.from_pretrained(out / "final"))


# --------------------------------------------------------------------------- sft / QLoRA / 1 rank

def test_qlora_grad_ckpt_one_rank(qlora_gc, env, launcher, merge_errors, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.model.load import fix_bnb_cpu_inference, quantization_config
    from launcher.rundir.layout import open_run_dir

    proc, out = qlora_gc
    assert "world size 1" in proc.stdout and "(qlora)" in proc.stdout
    assert "gradient checkpointing on" in proc.stdout
    # ZeRO auto is stage 0 on one rank: the rank tuned DeepSpeed's engine (rank/engine.py), and the loss still falls
    assert "engine       one rank: no gradient all-reduce; bf16 stage 0: launcher's update step" in proc.stdout
    assert_loss_falls(proc, 10)
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert saved and all(v.norm() > 0 for k, v in saved.items() if "lora_B" in k)

    # reload on the 4-bit base, as trained, and generate
    spec = open_run_dir(out).load_spec()
    q = quantization_config(spec)
    base4 = AutoModelForCausalLM.from_pretrained(out / "base", quantization_config=q, device_map={"": "cpu"},
                                                 dtype=torch.bfloat16)
    fix_bnb_cpu_inference(base4)
    adapted = PeftModel.from_pretrained(base4, out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    generate(adapted, tok)

    # merge dequantizes the base: the merged model's logits equal the adapter model's (bf16 tolerance)
    merged_dir = tmp_path / "merged"
    launcher(["merge", out, "--out", merged_dir], env, expect=0)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    err, effect = merge_errors(adapted, merged)
    assert err.max() < 0.15 and err.mean() < 0.01, (err.max(), err.mean())
    assert err.mean() < 0.1 * effect.mean(), (err.mean(), effect.mean())  # the adapter's effect is kept
    generate(merged, tok)


# --------------------------------------------------------------------------- bad data: exit 2, no rank

def _bad_data_cases(tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    return [(tmp / "missing.jsonl", "does not exist"), (empty, "is empty"), (bad, "line 3: malformed JSON")]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["missing", "empty", "malformed"])
def test_bad_data_exits_2_before_any_rank(case, env, launcher, tmp_path):
    path, words = _bad_data_cases(tmp_path)[case]
    out = tmp_path / "run"
    proc = launcher(["run", "--data", path, "--nproc", 2, "--precision", "fp32", "--out", out], env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert words in proc.stderr, proc.stderr
    assert str(path.name) in proc.stderr
    assert not out.exists()  # refused before the run dir, let alone a rank
    assert "deepspeed" not in proc.stdout.lower()


# --------------------------------------------------------------------------- quickstart

# The labels of launcher's own report lines: the plan (Plan.summary and its choices), the rank's model /
# loss / data / output lines, `launcher run`'s run dir, the quickstart's sample and done.
REPORT_LABELS = ("ranks", "batch", "tokens", "model", "config", "trainable", "precision", "ZeRO stage", "loss",
                 "optimizer", "run dir", "data", "output", "sample", "done")
_REPORT = re.compile(r"^(?:%s) +\S" % "|".join(map(re.escape, REPORT_LABELS)))
_EVAL = re.compile(r"^eval step \d+/\d+ loss [\d.]+ perplexity [\d.]+$")


def is_launcher_line(line: str) -> bool:
    """A line in one of launcher's own formats (a report line, a step or eval line, the quickstart's
    header)."""
    step = parse_step(line)
    return (line.startswith("quickstart: ") or bool(_REPORT.match(line)) or bool(_EVAL.match(line))
            or (step is not None and step.complete() and line.startswith("step ")))


def test_quickstart(env, launcher, tmp_path):
    out = tmp_path / "qs"
    proc = launcher(["quickstart", "--out", out], env, timeout=600, expect=0)
    text = proc.stdout
    assert "world size 1" in text and "tokens/step" in text  # the plan
    assert_loss_falls(proc, parse_step_lines(text)[-1]["max_steps"], drop=1.0)
    sample = [line for line in text.splitlines() if line.startswith("sample")]
    assert sample and len(sample[0]) > len("sample       'The function returns'") + 10
    assert str(out / "final") in text
    assert (out / "final" / "model.safetensors").is_file()
    # a quiet first run: every line, on stdout and stderr, is one of launcher's own (no library warnings,
    # no bitsandbytes kernel notice in a full fine-tune, no DeepSpeed accelerator guess or runner chatter)
    foreign = [line for line in (proc.stdout + proc.stderr).splitlines() if not is_launcher_line(line)]
    assert not foreign, "lines that are not launcher's own:\n" + "\n".join(foreign[:20])
    assert "bitsandbytes" not in (out / "logs" / "launch.log").read_text()  # not even imported: nothing to say
    # the claim: under two minutes on 2 CPU cores (cold data cache included)
    assert proc.seconds < 120, f"quickstart took {proc.seconds:.0f} s"
    # refuses a non-empty folder without --force
    again = launcher(["quickstart", "--out", out], env, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_deepspeeds_launcher_gives_each_rank_the_visible_gpus_as_written(tmp_path):
    """The real per-node launcher, started with launch_command's argv for a 2-GPU run whose user listed MIG
    devices: each rank gets its RANK and LOCAL_RANK and exactly the first two entries, as written, as its
    CUDA_VISIBLE_DEVICES. (DeepSpeed's CPU accelerator sets the same variable the same way as its CUDA one;
    this machine has no GPU.)"""
    import subprocess

    from launcher.config.resolve import resolve
    from launcher.plan.plan import make_plan
    from launcher.submit.local import free_port, launch_command

    (tmp_path / "show_env.py").write_text(
        "import json, os, sys\n"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'CUDA_VISIBLE_DEVICES')\n"
        "out = os.path.join(os.path.dirname(sys.argv[1]), 'rank' + os.environ['RANK'] + '.json')\n"
        "open(out, 'w').write(json.dumps({k: os.environ.get(k) for k in keys}))\n")
    plan = make_plan(resolve(None, flags={"precision": "bf16", "nproc_per_node": 2, "gpus_per_node": 2,
                                          "output_dir": str(tmp_path / "run")}, sets=[]))
    mig = "MIG-4f1c2d3e-aaaa,MIG-4f1c2d3e-bbbb,MIG-4f1c2d3e-cccc"
    argv, env = launch_command(tmp_path / "run", plan, 2, master_port=free_port(), quiet=True, entry=("show_env",),
                               base_env={**os.environ, "CUDA_VISIBLE_DEVICES": mig, "PYTHONPATH": str(tmp_path)})
    env["DS_ACCELERATOR"] = "cpu"  # no GPU here; the launcher's device handling is the same
    (tmp_path / "run").mkdir()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                      "CUDA_VISIBLE_DEVICES": "MIG-4f1c2d3e-aaaa,MIG-4f1c2d3e-bbbb"} for r in (0, 1)]
