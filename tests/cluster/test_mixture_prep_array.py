"""A mixture's preparation as a Slurm job array on the lab cluster: 4 tasks over the 2 nodes write the token
shards, one task's step is SIGKILLed mid-way (test-only LAUNCHER_TEST_PREP_KILL_ONCE) and run again by the
task's retry loop, the shard set ends complete and verified, and the training job starts after the whole
array (afterok) and completes, reading the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from launcher.data.shardprep import TEST_KILL_AFTER
from launcher.data.shards import read_manifest, verify
from mixdata import mixture_files

ROOT = Path(__file__).resolve().parents[2]


def test_prep_array_of_4_tasks_over_2_nodes_retries_a_killed_task_then_training_runs(slurm_lab, tmp_path):
    p = mixture_files(tmp_path / "data")
    cache = tmp_path / "cache"
    spec = {"name": "mixprep", "precision": "fp32", "zero": {"stage": 2},
            "optim": {"max_steps": 3, "micro_batch": 2},
            "data": {"seq_len": 32, "shard_mb": 0.002, "cache_dir": str(cache), "sources": [
                {"name": "web", "path": str(p["web"]), "weight": 0.6},
                {"name": "code", "path": str(p["code"]), "weight": 0.3},
                {"name": "replay", "path": str(p["replay"]), "weight": 0.1, "text_field": "body"}]},
            "cluster": {"gpus_per_node": 0, "time": "10", "partition": "debug", "net_ifname": "eth0",
                        "prep": {"cpus": 1, "time": "10", "tasks": 4, "retries": 1}}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    marker = tmp_path / "killed-once"
    env = slurm_lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                    TEST_KILL_AFTER: str(marker)})
    run_dir = tmp_path / "run"
    cp = subprocess.run([sys.executable, "-m", "launcher", "slurm", str(tmp_path / "mix.yaml"), "--out", str(run_dir),
                         "--submit"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    prep, train = cp.stdout.split()
    assert slurm_lab.wait_job(train, timeout=600) == "COMPLETED", sorted((run_dir / "logs").iterdir())
    rows = slurm_lab.sacct(prep, ["JobID", "State", "NodeList", "Start", "End"])
    tasks = [r for r in rows if "_" in r["JobID"]]
    assert sorted(r["JobID"].split("_")[1] for r in tasks) == ["0", "1", "2", "3"], rows
    assert {r["State"] for r in tasks} == {"COMPLETED"}, rows
    assert {r["NodeList"] for r in tasks} == {"node1", "node2"}, rows  # spread over both nodes
    [train_row] = slurm_lab.sacct(train, ["JobID", "Start"])
    assert train_row["Start"] >= max(r["End"] for r in tasks)  # afterok on the whole array
    # one task's step was killed after writing a shard, and its second try finished the task's share
    assert marker.is_file()
    logs = {f.name: f.read_text(errors="replace") for f in (run_dir / "logs").glob("mixprep-prep-*_*.out")}
    retried = [n for n, text in logs.items() if "preparation step exited" in text]
    assert len(retried) == 1 and "(try 1 of 2)" in logs[retried[0]], logs
    dirs = sorted(cache.glob("shards-*"))
    assert len(dirs) == 3 and all(verify(d, deep=True) == [] for d in dirs)
    assert sum(read_manifest(d)["docs"] for d in dirs) == 360
    train_log = next((run_dir / "logs").glob(f"mixprep-{train}.out")).read_text(errors="replace")
    assert "step 3/3" in train_log
    final = json.loads((run_dir / "manifest.json").read_text())["final"]
    assert sum(final["tokens_by_source"].values()) == 3 * 2 * 32
    # status and logs know the array: each prep task on its own line with its log, then the training job
    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout
    [run] = json.loads(cli("status", "--json", str(run_dir)))
    jobs = {j["job_id"]: j for j in run["jobs"]}
    assert set(jobs) == {f"{prep}_{k}" for k in range(4)} | {train}, jobs.keys()
    assert {j["kind"] for j in jobs.values()} == {"prep", "train"}
    assert all(j["state"] == "COMPLETED" and j["logs"] for j in jobs.values()), jobs
    printed = cli("logs", str(run_dir))
    assert all(text.strip().splitlines()[-1] in printed for text in logs.values()) and "step 3/3" in printed
