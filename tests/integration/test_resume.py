"""Exact resume through the real path, on CPU in fp32 with dropout on.

Each case runs `launcher run` from the same spec through to max_steps (the reference), and again
interrupted by a real SIGUSR1 sent to `launcher run` mid-run, which passes it to the rank; the rank agrees
with the others (all_reduce) to stop at the end of the current optimizer step, saves a checkpoint through
the Trainer and DeepSpeed, writes the requeue marker and exits 3; `launcher run` exits 3 and prints the
resume command, which the test then runs (the run dir's own spec.yaml, --out the same dir, --force). That
resumed run is stopped once more late in the run (the rank's own SIGUSR1 at step LATE_STOP) and resumed
again; LoRA at ZeRO-3 is stopped and resumed at every step after the first stop. The resumed runs must
print exactly the remaining steps, log the reference's loss, lr and grad norm at every step (full
precision, metrics.jsonl) and end with the reference's weights, bitwise. The weights
come from the test-only hook LAUNCHER_TEST_DUMP_FINAL_WEIGHTS (every trainable parameter, gathered under
ZeRO-3).

Dropout: the model is the embedded tiny Llama saved with attention_dropout=0.1, and LoRA's own
dropout is 0.05, so a resume that did not restore the RNG states would differ.

Further tests resume a one-rank checkpoint on two ranks (DeepSpeed's universal checkpoint) at ZeRO-2
and ZeRO-3, and each keeps its attempts in manifest.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.rundir.checkpoints import COMPLETE_MARKER
from launcher.rundir.metrics import parse_step_lines
from launcher.testing.faults import FAULT_ENV, TEST_DUMP_ENV, TEST_DUMP_START_ENV

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 10
LR, WARMUP = 3e-3, 3
SIGNAL_AFTER = 2  # send USR1 once this step's line is printed


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    """The embedded tiny Llama with attention dropout 0.1, as a local model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher import assets

    d = tmp_path_factory.mktemp("model") / "tiny-dropout"
    cfg = AutoConfig.from_pretrained(assets.tiny_dir())
    cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    AutoTokenizer.from_pretrained(assets.tiny_dir()).save_pretrained(d)
    return d


def flags(model, method, zero, nproc=1):
    return ["--model", model, "--task", "pretrain", "--method", method, "--zero", zero, "--nproc", nproc,
            "--precision", "fp32", "--max-steps", MAX_STEPS, "--seq-len", 64, "--micro-batch", 2, "--lr", LR,
            "--set", f"optim.warmup_steps={WARMUP}", "--set", "optim.scheduler=cosine", "--set", "output.log_every=1"]


def interrupted_run(args, env, after=SIGNAL_AFTER, timeout=900, **extra):
    """`launcher run ARGS`, sent SIGUSR1 twice once step `after` is printed; returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *map(str, args)], cwd=ROOT, env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    out, sent = [], False
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if not sent and line.startswith(f"step {after}/"):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)  # twice, as with `scancel --full` plus the batch shell's relay
            sent = True
        if time.monotonic() > deadline:
            proc.kill()
            break
    err = proc.stderr.read() if proc.stderr else ""
    code = proc.wait(timeout=60)
    assert sent, "".join(out)[-4000:] + err[-4000:]
    return code, "".join(out), err


def load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    """Bitwise equal (README's claim); the message says by how much they differ where they do."""
    import torch

    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    differing = sum(not torch.equal(a[k], b[k]) for k in a)
    assert bitwise, f"max |difference| {worst:.3e} in {differing} of {len(a)} tensors"
    return bitwise, worst


def weights_digest(weights):
    """sha256 over every tensor's name and bytes: two uninterrupted runs with one digest ended bitwise equal."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode() + weights[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_lr_is_transformers_schedule(run):
    """The lr a real run logged with each step, the one that step ran at (DeepSpeed stepping the scheduler),
    is what transformers' get_scheduler gives for the same warmup, cosine and length: lr x lambda(step - 1),
    full precision."""
    import torch
    from transformers import get_scheduler

    logged = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in logged if "loss" in r}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    hf = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=WARMUP, num_training_steps=MAX_STEPS,
                       scheduler_specific_kwargs={"min_lr_rate": 0.1})  # the spec's default optim.min_lr_ratio
    for step in range(1, MAX_STEPS + 1):
        assert logged[step] == pytest.approx(hf.get_last_lr()[0], rel=1e-9), (step, logged[step], hf.get_last_lr())
        opt.step()
        hf.step()


RESULTS = Path(os.environ.get("LAUNCHER_RESUME_RESULTS", "")) if os.environ.get("LAUNCHER_RESUME_RESULTS") else None


LATE_STOP = 6  # the second stop, late enough that beta2**t multiplied up step by step and pow(beta2, t) differ in fp32


def logged_steps(run):
    """{step: (loss, lr, grad_norm)} at full precision from the run dir's metrics.jsonl, every attempt; a step
    logged twice (trained twice) fails."""
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: (r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.mark.parametrize("method,zero", [("full", 2), ("full", 3), ("lora", 2), ("lora", 3)])
def test_signal_save_exit3_resume_ends_with_the_uninterrupted_weights(tmp_path, env, launcher, dropout_model, method, zero):
    """Stopped twice: by a real SIGUSR1 sent to `launcher run` (the step it stops at depends on timing), then
    by the rank's own SIGUSR1 at step LATE_STOP (test-only fault); resumed each time with the command launcher
    printed. LoRA at ZeRO-3 (where a resume was seen to differ now and then) is stopped at every later step
    instead: every run of the suite resumes it about 7 times (once per step from the first stop on), each in a
    fresh process at another step. Every step's loss, lr and grad norm (full precision, metrics.jsonl) and the
    final weights are bitwise the uninterrupted run's."""
    base = flags(dropout_model, method, zero)
    ref = launcher(["run", *base, "--out", tmp_path / "ref"], env, expect=0, **{TEST_DUMP_ENV: str(tmp_path / "ref.pt")})
    ref_steps = {s["step"]: s for s in parse_step_lines(ref.stdout)}
    assert sorted(ref_steps) == list(range(1, MAX_STEPS + 1))
    assert_lr_is_transformers_schedule(tmp_path / "ref")

    run = tmp_path / "run"
    code, out, err = interrupted_run(["run", *base, "--out", run], env)
    assert code == 3, f"exit {code}\n{out[-4000:]}\n{err[-4000:]}"
    stopped = int(re.search(r"ranks agreed to stop at step (\d+)/", out).group(1))
    assert SIGNAL_AFTER <= stopped < MAX_STEPS
    # both signals reached the launcher and were passed on; the second changes nothing. Whether a rank still
    # ran its handler ("again; already stopping") or had already saved and begun to exit depends on timing.
    assert err.count("launcher: got SIGUSR1; passing it to") == 2, err[-3000:]
    ckpt = run / "checkpoints" / f"checkpoint-{stopped}"
    assert json.loads((ckpt / COMPLETE_MARKER).read_text())["step"] == stopped
    assert not list((run / "checkpoints").glob(".staging-*"))
    hint = re.search(r"Resume with: launcher (run \S+ --out \S+ --force)", err)
    assert hint, err[-3000:]
    [marker] = (run / "markers").glob("requeue-*.json")
    assert json.loads(marker.read_text())["step"] == stopped
    assert [s["step"] for s in parse_step_lines(out)] == list(range(1, stopped + 1))
    assert not (run / "final").exists()  # stopped, not finished

    # the resume command launcher printed, as a user would paste it; stopped again late unless already past it
    if (method, zero) == ("lora", 3):
        stops = list(range(stopped, MAX_STEPS))
    else:
        stops = [stopped] + ([LATE_STOP] if stopped < LATE_STOP else [])
    resumed_out = ""
    for n, at in enumerate(stops):
        last = n == len(stops) - 1
        ends = MAX_STEPS if last else stops[n + 1]
        extra = {TEST_DUMP_ENV: str(tmp_path / "run.pt")} if last else {FAULT_ENV: f"signal:rank=0:step={ends}"}
        resumed = launcher(hint.group(1).split(), env, expect=0 if last else 3, **extra)
        assert f"resuming from {run / 'checkpoints' / f'checkpoint-{at}'}" in resumed.stdout
        # nothing seen twice, nothing skipped: exactly the remaining steps
        assert [s["step"] for s in parse_step_lines(resumed.stdout)] == list(range(at + 1, ends + 1))
        resumed_out += resumed.stdout
    # every step of every attempt, at full precision (the step line rounds the loss to 4 decimals)
    assert logged_steps(run) == logged_steps(tmp_path / "ref")
    for s in parse_step_lines(resumed_out):
        assert s["loss"] == ref_steps[s["step"]]["loss"] and s["lr"] == ref_steps[s["step"]]["lr"], (s, ref_steps[s["step"]])
    bitwise, worst = assert_same_weights(load(tmp_path / "ref.pt"), load(tmp_path / "run.pt"))
    # the manifest keeps every attempt: the ones stopped for a requeue, and the one that completed
    *requeued, done = json.loads((run / "manifest.json").read_text())["attempts"]
    assert [(a["exit_reason"], a["end_step"]) for a in requeued] == [("requeue", at) for at in stops]
    assert (done["exit_reason"], done["start_step"]) == ("completed", stops[-1])
    assert done["resumed_from"] == str(run / "checkpoints" / f"checkpoint-{stops[-1]}")
    assert json.loads((run / "manifest.json").read_text())["final"]["tokens"] == MAX_STEPS * 2 * 64
    if RESULTS is not None:
        with RESULTS.open("a") as f:
            f.write(json.dumps({"case": f"{method}-zero{zero}", "stopped_at": stops, "max_steps": MAX_STEPS,
                                "reference_weights_sha256": weights_digest(load(tmp_path / "ref.pt")),
                                "steps_lost": 0, "bitwise": bitwise, "max_abs_diff": worst,
                                "seconds": {"reference": round(ref.seconds, 1), "resume": round(resumed.seconds, 1)}}) + "\n")


def test_checkpoint_cut_off_mid_save_is_skipped_on_resume(tmp_path, env, launcher):
    """A rank SIGKILLed inside the save at step 4 (after its data, before the completion marker): the
    run fails, the half-written checkpoint stays in its staging folder, and the next start resumes from
    checkpoint-2 (saved every 2 steps), saying what it skipped, and completes."""
    run = tmp_path / "run"
    args = ["run", *flags("tiny", "full", 2), "--max-steps", 6, "--save-every", 2, "--out", run]
    failed = launcher(args, env, LAUNCHER_TEST_FAULT="kill-in-save:rank=0:step=4")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "ended without an exit record" in failed.stderr  # the rank killed, named
    cps = run / "checkpoints"
    assert (cps / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert not (cps / "checkpoint-4").exists() and (cps / ".staging-checkpoint-4").is_dir()
    resumed = launcher(["run", run / "spec.yaml", "--out", run, "--force"], env, expect=0)
    assert "skipping .staging-checkpoint-4: cut off mid-save" in resumed.stdout
    assert f"resuming from {cps / 'checkpoint-2'}" in resumed.stdout
    assert [s["step"] for s in parse_step_lines(resumed.stdout)] == [3, 4, 5, 6]
    assert not (cps / ".staging-checkpoint-4").exists()  # cleaned once a complete checkpoint exists
    # keep_last=2: the newest two complete checkpoints remain
    assert sorted(p.name for p in cps.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    # the killed attempt has a start and no end; the final model holds steps 1-2 of it and 3-6 of the next
    killed, done = json.loads((run / "manifest.json").read_text())["attempts"]
    assert killed["start"] and killed["end"] is None and killed["exit_reason"] is None
    assert (done["start_step"], done["end_step"], done["exit_reason"]) == (2, 6, "completed")
    assert json.loads((run / "manifest.json").read_text())["final"]["tokens"] == 6 * 2 * 64


@pytest.mark.parametrize("zero", [2, 3])
def test_one_rank_checkpoint_resumes_on_two_ranks_through_a_universal_checkpoint(tmp_path, env, launcher, zero):
    """The run dir re-made for 2 ranks after a 1-rank run stopped: the checkpoint is converted with
    ds_to_universal --inject_missing_state and loaded with checkpoint.load_universal, at ZeRO-2 and at
    ZeRO-3. Both ranks start from exactly the weights the checkpoint holds (test-only dump after the
    load) and training continues from the saved step to max_steps (data order differs: samples are
    sharded over the new world). Measured by hand once at ZeRO-3: the Adam moments are restored too (the
    sum of squares of exp_avg over the 2 ranks' partitions equals the 1-rank checkpoint's)."""
    run = tmp_path / "run"
    base = flags("tiny", "full", zero)
    code, out, err = interrupted_run(["run", *base, "--out", run], env)
    assert code == 3, out[-3000:] + err[-3000:]
    stopped = int(re.search(r"ranks agreed to stop at step (\d+)/", out).group(1))
    start = tmp_path / "start.pt"
    resumed = launcher(["run", *base, "--nproc", 2, "--out", run, "--force"], env, expect=0,
                       **{TEST_DUMP_START_ENV: str(start)})
    assert "through DeepSpeed's universal checkpoint" in resumed.stdout and f"ZeRO-{zero}" in resumed.stdout
    ckpt = run / "checkpoints" / f"checkpoint-{stopped}"
    assert (ckpt / "latest_universal").read_text().strip().endswith("_universal")
    import torch
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")  # the 1-rank checkpoint's full weights
    loaded = load(start)  # every parameter once: the tied lm_head is the embedding
    assert set(saved) - set(loaded) <= {"lm_head.weight"} and set(loaded) <= set(saved)
    assert all(torch.equal(saved[k], loaded[k]) for k in loaded)
    assert [s["step"] for s in parse_step_lines(resumed.stdout)] == list(range(stopped + 1, MAX_STEPS + 1))
    assert "world size 2" in resumed.stdout and (run / "final" / "config.json").is_file()
    assert_lr_is_transformers_schedule(run)  # both attempts: the schedule's position came through the conversion
    # tokens in the final model: the first attempt's steps at 1 rank, the rest at 2
    first, second = json.loads((run / "manifest.json").read_text())["attempts"]
    assert (first["world_size"], second["world_size"], second["devices"][0]["ranks"]) == (1, 2, [0, 1])
    tokens = json.loads((run / "manifest.json").read_text())["final"]["tokens"]
    assert tokens == stopped * 2 * 64 + (MAX_STEPS - stopped) * 4 * 64


def test_hung_rank_makes_the_other_leave_within_the_collective_timeout(tmp_path, env, launcher):
    """Rank 1 stops (SIGSTOP) after step 2; rank 0 waits in the next collective for cluster.nccl.timeout_s,
    then leaves with a message naming itself, its node and the cause; launcher run exits non-zero and names
    the silent rank."""
    run = tmp_path / "run"
    timeout_s = 20
    proc = launcher(["run", *flags("tiny", "full", 2, nproc=2), "--max-steps", 6, "--set",
                     f"cluster.nccl.timeout_s={timeout_s}", "--out", run], env, LAUNCHER_TEST_FAULT="hang:rank=1:step=2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    markers = run / "markers"
    [fault] = [json.loads(p.read_text()) for p in markers.glob("fault-*-rank1.json")]
    [survivor] = [json.loads(p.read_text()) for p in markers.glob("exit-*-rank0.json")]
    assert survivor["reason"] == "collective_timeout" and "rank 0 on" in survivor["message"]
    waited = survivor["time"] - fault["time"]
    assert timeout_s - 1 <= waited < timeout_s + 30, waited
    assert "rank 1 on" in proc.stderr and "ended without an exit record" in proc.stderr
    assert not list(markers.glob("exit-*-rank1.json"))


def test_out_of_memory_on_a_rank_exits_5_and_is_recorded(tmp_path, env, launcher):
    run = tmp_path / "run"
    proc = launcher(["run", *flags("tiny", "full", 2), "--max-steps", 4, "--out", run], env,
                    LAUNCHER_TEST_FAULT="oom:rank=0:step=2")
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    [rec] = [json.loads(p.read_text()) for p in (run / "markers").glob("exit-*-rank0.json")]
    assert rec["reason"] == "oom" and rec["exit_code"] == 5
    assert "out of memory" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- checkpoint bookkeeping (no ranks)

def test_only_complete_checkpoints_count_and_keep_last_prunes_the_rest(tmp_path):
    from launcher.rank.checkpoint import prune
    from launcher.rundir.checkpoints import complete_checkpoints, incomplete_checkpoints

    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / ".staging-checkpoint-10" / "checkpoint-10").mkdir(parents=True)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 4, 6]
    assert [p.name for p in incomplete_checkpoints(tmp_path)] == [".staging-checkpoint-10", "checkpoint-8"]
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_free_disk_is_checked_against_the_checkpoint_size(tmp_path, monkeypatch):
    import shutil as sh

    from launcher.rank import checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-2" / "weights").write_bytes(b"x" * 10_000)
    need = checkpoint.estimate_checkpoint_bytes(None, tmp_path)  # the newest complete one's size
    assert need >= 10_000
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    msg = checkpoint.disk_shortfall(need, tmp_path)
    assert msg and "MiB free" in msg and "keep_last" in msg
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 0, 10**9))
    assert checkpoint.disk_shortfall(need, tmp_path) is None


def test_fault_spec_parses_and_refuses_unknown_kinds():
    from launcher.testing.faults import Fault, parse_faults

    assert parse_faults("kill:rank=1:step=3,oom:step=2:attempt=1") == [Fault("kill", 1, 3), Fault("oom", 0, 2, 1)]
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("explode:rank=0")
