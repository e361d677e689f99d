"""`launcher bench` on CPU with the tiny model, for real: two setups (full, LoRA; ZeRO-2, bf16,
seq 64) trained through the launcher's loop with DeepSpeed, each beside the plain-Trainer baseline.

One bench run is shared by the tests below (about a minute and a half on two cores). The ranks get
one thread each (OMP_NUM_THREADS=1), ours and the baseline alike: on a shared two-core machine two
threads per process made step times swing 5-10x with other load.

Estimator vs measured memory on CPU: model states vs the tensors the engine holds at their peak,
inside the optimizer step of the last, untimed step, where DeepSpeed holds the fp32 gradient partition
it made for the update beside the gradients it came from. Measured here: full bf16 ZeRO-2 20 B/param
(error 0.0%), LoRA 0.0%; full fp32 ZeRO-2 (the DPO test) 24 B/param.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.bench import report
from launcher.rundir.layout import RunDir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PRICE = 0.5
TINY_PARAMS = 3_950_848  # tied embeddings; checked against the loaded model in the training tests


def launcher(args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["LAUNCHER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), e.get("PYTHONPATH", "")) if x)
    e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module")
def run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("bench") / "a"
    proc = ok(launcher(["bench", "--model", "tiny", "--gpus-per-node", "0", "--nproc", "1", "--precision", "bf16",
                        "--seq-len", "64", "--attn", "sdpa", "--method", "full,lora", "--zero", "2",
                        "--steps", "2", "--warmup", "1", "--baseline", "--usd-per-device-hour", str(PRICE),
                        "--out", out], env))
    return out, proc, report.read_results(out / report.RESULTS_JSONL)


def test_every_setup_gives_a_complete_row(run):
    out, proc, rows = run
    ours = [r for r in rows if r["kind"] == "launcher"]
    assert [r["setup"] for r in ours] == ["full z2 sdpa nockpt mb1 s64 bf16 auto", "lora z2 sdpa nockpt mb1 s64 bf16 auto"]
    assert all((r["zero"], r["precision"], r["loss"], r["compile"]) == (2, "bf16", "standard", False) for r in ours)
    for r in ours:
        assert r["error"] is None, r["error"]
        assert r["devices"] == 1 and r["device"].startswith("cpu") and r["tokens_per_step"] == 64
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_device"] == r["tokens_per_s"]
        assert r["step_time_s"] == pytest.approx(64 / r["tokens_per_s"])
        assert r["model_tflops_per_device"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"] / 1e12)
        # CPU without --device-tflops: MFU against the bf16 matmul peak the rank measured on this machine
        assert r["peak_basis"].startswith("bf16 2048^3 matmul") and r["peak_tflops_per_device"] > 0.01
        assert r["mfu"] == pytest.approx(r["model_tflops_per_device"] / r["peak_tflops_per_device"])
        assert r["first_step_s"] > 0
        assert r["peak_mem_bytes"] == r["rss_peak_bytes"] > 100 * 2**20  # RSS of a process with torch loaded
        assert r["peak_mem_reserved_bytes"] is None
    csv_lines = (out / report.RESULTS_CSV).read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["bench", "kind", "setup"] and len(csv_lines) == 1 + len(rows)
    assert "full z2 sdpa nockpt mb1 s64" in proc.stdout  # the table
    for i in ("000", "001"):
        assert (out / "setups" / i / "ds_config.json").is_file()  # each setup ran from its own run dir


def test_cost_per_million_tokens_is_price_times_devices_over_throughput(run):
    _, _, rows = run
    for r in rows:
        assert r["usd_per_mtok"] == pytest.approx(PRICE * r["devices"] / 3600 / r["tokens_per_s"] * 1e6, rel=1e-12)


def test_plots_are_written_as_png(run):
    out, _, _ = run
    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200 and len(data) > 5000, name


def test_baseline_runs_in_the_same_call_and_gives_our_ratio(run):
    _, _, rows = run
    base = {r["method"]: r for r in rows if r["kind"] == "baseline"}
    assert set(base) == {"full", "lora"}
    for r in rows:
        if r["kind"] != "launcher":
            continue
        b = base[r["method"]]
        assert b["error"] is None and b["tokens_per_s"] > 0 and b["zero"] is None
        assert r["baseline_tokens_per_s"] == b["tokens_per_s"]
        assert r["speedup_vs_baseline"] == pytest.approx(r["tokens_per_s"] / b["tokens_per_s"])
        assert r["mem_vs_baseline"] == pytest.approx(r["measured_mem_bytes"] / b["measured_mem_bytes"])


def test_estimator_memory_error_is_reported_against_the_engines_tensor_bytes(run):
    _, _, rows = run
    ours = {r["method"]: r for r in rows if r["kind"] == "launcher"}
    for r in ours.values():
        assert r["est_mem_basis"] == "model states vs engine tensor bytes"
        assert r["est_mem_bytes"] == r["est_model_states_bytes"]
        assert r["measured_mem_bytes"] == r["engine_tensor_bytes"]
        assert r["mem_error"] == pytest.approx(r["est_mem_bytes"] / r["measured_mem_bytes"] - 1)
    # The measurement itself, against the parameter count: inside the update DeepSpeed's bf16 ZeRO-2
    # holds bf16 weights and gradients (2 + 2 B per parameter), the fp32 gradient made from them (4),
    # the fp32 master (4) and Adam's two moments (8): 20 B, plus the rotary buffer.
    full = ours["full"]["engine_tensor_bytes"]
    assert 20 * TINY_PARAMS <= full <= 20 * TINY_PARAMS + 4096, full
    assert ours["lora"]["engine_tensor_bytes"] < full / 2  # frozen base: no gradients or moments for it
    # Measured when written: full 0.0%, LoRA 0.0% (see the module docstring).
    assert abs(ours["full"]["mem_error"]) < 0.01 and abs(ours["lora"]["mem_error"]) < 0.01


def test_dpo_rows_count_both_sequences_and_precomputed_log_probs_hold_no_reference_copy(tmp_path, env):
    """Full DPO on the embedded pairs, benched twice: with the reference log-probs precomputed (the default)
    and with TRL's in-memory reference. Each row counts a pair's two sequences in its tokens (so tokens/s
    and $ per 1M tokens do); the in-memory run's trainer holds a whole second copy of the weights, the
    precomputed one none: their measured tensor bytes differ by the tiny model's fp32 weights (an
    independent count: its parameters x 4 bytes, plus the rotary buffer), and the estimator says the same.
    The first call also runs the plain-TRL baseline (DPOTrainer with TRL's defaults: its reference is a
    frozen copy in memory)."""
    rows = {}
    for ref in ("precomputed", "in_memory"):
        out = tmp_path / ref
        ok(launcher(["bench", "--task", "dpo", "--model", "tiny", "--gpus-per-node", "0", "--nproc", "1",
                     "--method", "full", "--zero", "2", "--precision", "fp32", "--seq-len", "64", "--micro-batch", "2",
                     "--steps", "2", "--warmup", "1", "--usd-per-device-hour", str(PRICE), "--set",
                     f"pref.reference={ref}", *(["--baseline"] if ref == "precomputed" else []), "--out", out], env))
        for r in report.read_results(out / report.RESULTS_JSONL):
            rows[ref if r["kind"] == "launcher" else "baseline"] = r
    assert set(rows) == {"precomputed", "in_memory", "baseline"}
    base = rows["baseline"]
    assert base["error"] is None and base["tokens_per_step"] == 2 * 2 * 64 and base["tokens_per_s"] > 0
    assert rows["precomputed"]["speedup_vs_baseline"] == pytest.approx(rows["precomputed"]["tokens_per_s"] / base["tokens_per_s"])
    # the plain script holds fp32 weights, gradients and Adam's two moments (16 B/param) and TRL's reference (4)
    assert 20 * TINY_PARAMS <= base["engine_tensor_bytes"] <= 21 * TINY_PARAMS, base["engine_tensor_bytes"]
    for r in (rows["precomputed"], rows["in_memory"]):
        assert r["error"] is None and r["tokens_per_step"] == 2 * 2 * 64  # micro batch x (chosen, rejected) x seq
        assert r["step_time_s"] == pytest.approx(r["tokens_per_step"] / r["tokens_per_s"])
        assert r["usd_per_mtok"] == pytest.approx(PRICE / 3600 / r["tokens_per_s"] * 1e6, rel=1e-12)
    # fp32 ZeRO-2 inside the update: weights, gradients, the flat copy of the gradient partition, the
    # master partition (4 B each) and Adam's moments (8): 24 B per parameter
    assert 24 * TINY_PARAMS <= rows["precomputed"]["engine_tensor_bytes"] <= 24 * TINY_PARAMS + 4096
    held = rows["in_memory"]["engine_tensor_bytes"] - rows["precomputed"]["engine_tensor_bytes"]
    assert 4 * TINY_PARAMS <= held <= 4 * TINY_PARAMS + 4096, held
    assert rows["in_memory"]["est_mem_bytes"] - rows["precomputed"]["est_mem_bytes"] == 4 * TINY_PARAMS


def test_collect_merges_two_result_dirs(run, tmp_path, env):
    out, _, rows = run
    other = tmp_path / "b"
    other.mkdir()
    (other / report.RESULTS_JSONL).write_text("".join(json.dumps({**r, "bench": "b"}) + "\n" for r in rows))
    merged = tmp_path / "merged"
    proc = ok(launcher(["bench", "collect", out, other, "--out", merged], env))
    got = report.read_results(merged / report.RESULTS_JSONL)
    assert len(got) == 2 * len(rows) and {r["bench"] for r in got} == {rows[0]["bench"], "b"}
    assert all(r["speedup_vs_baseline"] for r in got if r["kind"] == "launcher")  # paired within each bench
    for name in report.PLOTS:
        assert (merged / name).read_bytes()[:4] == b"\x89PNG"
    assert f"{len(got)} row(s) from 2 folder(s)" in proc.stdout


def test_collect_makes_rows_from_a_slurm_bench_dir(tmp_path, env):
    """A --slurm bench dir: the array's tasks, each with the records its ranks write, become rows."""
    out = tmp_path / "arr"
    ok(launcher(["bench", "--model", "tiny", "--gpus-per-node", "0", "--precision", "fp32", "--seq-len", "64",
                 "--method", "full,lora", "--steps", "3", "--warmup", "1", "--baseline", "--slurm", "--out", out], env))
    tasks = json.loads(RunDir(out).bench_settings.read_text())["tasks"]
    assert [t["kind"] for t in tasks] == ["launcher", "launcher", "baseline", "baseline"]
    for t, step in zip(tasks[:3], (0.5, 0.25, 1.0)):  # the last baseline has not run yet
        rd = RunDir(out / t["dir"])
        rd.bench.mkdir(parents=True, exist_ok=True)
        rec = {"rank": 0, "world_size": 1, "device": "cpu", "t_begin": 0.0,
               "step_ends": [step * (i + 1) for i in range(5)], "rss_peak_bytes": 1, "error": None,
               "tensor_bytes": {"total": 50_000_000}}
        if t["kind"] == "baseline":
            rd.bench_baseline.write_text(json.dumps({"record": rec}))
        else:
            rd.bench_rank(0).write_text(json.dumps(rec))
    ok(launcher(["bench", "collect", out], env))
    rows = report.read_results(out / report.RESULTS_JSONL)
    assert [r["tokens_per_s"] for r in rows[:3]] == [pytest.approx(128), pytest.approx(256), pytest.approx(64)]
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert rows[1]["speedup_vs_baseline"] is None and rows[3]["error"].startswith("no measurement yet")


def test_a_failed_setup_is_a_row_with_its_error(tmp_path, env):
    out = tmp_path / "f"
    proc = launcher(["bench", "--model", "tiny", "--gpus-per-node", "0", "--precision", "bf16", "--seq-len", "64",
                     "--attn", "flash2", "--steps", "1", "--warmup", "0", "--out", out], env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every setup failed
    rows = report.read_results(out / report.RESULTS_JSONL)
    assert len(rows) == 1 and "flash2" in rows[0]["error"] and rows[0]["tokens_per_s"] is None
    assert (out / report.PLOTS[0]).is_file()


def test_help_and_bad_input(env, tmp_path):
    assert "collect DIR" in ok(launcher(["bench", "--help"], env)).stdout
    bad = launcher(["bench", "--zero", "2,x", "--out", tmp_path / "x"], env)
    assert bad.returncode == 2 and "--zero" in bad.stderr
    assert launcher(["bench", "collect", tmp_path / "nothing-here"], env).returncode == 2
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
