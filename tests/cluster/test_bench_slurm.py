"""`launcher bench --slurm --submit` on the real lab cluster: the matrix becomes a job array (a task per
setup and per baseline), every task trains through the same code as `launcher bench` does locally, and
`launcher bench collect` merges the tasks into complete rows, a CSV and the plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRICE = 0.5


def launcher(lab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                              "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_bench_matrix_as_a_job_array_then_collect(slurm_lab, tmp_path):
    out = tmp_path / "bench"
    cp = launcher(slurm_lab, "bench", "--model", "tiny", "--gpus-per-node", "0", "--nproc", "1", "--precision", "fp32",
                  "--seq-len", "64", "--attn", "sdpa", "--method", "lora", "--zero", "2,3", "--steps", "2",
                  "--warmup", "1", "--baseline", "--usd-per-device-hour", str(PRICE), "--set", "cluster.time=10",
                  "--set", "cluster.partition=debug", "--slurm", "--submit", "--out", str(out))
    assert cp.returncode == 0, cp.stderr
    job = cp.stdout.strip().splitlines()[-1]
    [record] = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    # LoRA at ZeRO-2 and ZeRO-3, and one baseline (the setups differ only in ZeRO stage): 3 tasks
    assert record["job_id"] == job and record["kind"] == "bench" and record["array_tasks"] == 3

    for task in range(3):
        state = slurm_lab.wait_job(f"{job}_{task}", timeout=600)
        logs = "\n".join(p.read_text(errors="replace") for p in (out / "logs").glob(f"*{job}_{task}*"))
        assert state == "COMPLETED", logs[-3000:]

    cp = launcher(slurm_lab, "bench", "collect", str(out))
    assert cp.returncode == 0, cp.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["method"], r.get("zero")) for r in rows if r["kind"] == "launcher") == [
        ("launcher", "lora", 2), ("launcher", "lora", 3)]
    assert [r["kind"] for r in rows].count("baseline") == 1
    assert len(rows) == 3 and not [r for r in rows if r.get("error")], rows
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
        expected = PRICE * r["devices"] / 3600 / r["tokens_per_s"] * 1e6
        assert abs(r["usd_per_mtok"] - expected) <= 1e-9 * expected
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    for plot in ("tokens_per_s.png", "usd_per_mtok.png", "memory.png"):
        assert (out / plot).stat().st_size > 1000, plot
