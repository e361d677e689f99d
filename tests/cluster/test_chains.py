"""The chain of jobs `launcher slurm --submit` queues, on the real lab cluster: a CPU job that prepares
the data before a 2-node training job that only reads the cache, and `--then merge --then eval` after
a LoRA run, each job waiting for the one before (afterok), each with its own log and record."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Small enough for the lab's 2-CPU nodes (the chained jobs take 1 CPU each); fp32: CPU ranks.
TINY = {"data": {"seq_len": 64}, "optim": {"max_steps": 2, "micro_batch": 2}, "precision": "fp32",
        "zero": {"stage": 2}, "cluster": {"gpus_per_node": 0, "time": "10", "partition": "debug", "net_ifname": "eth0",
                                          "prep": {"cpus": 1, "time": "10"}}}
STEP = re.compile(r"^(?:\[rank0\]:|\s*0: )?step (\d+)/(\d+) loss ([0-9.]+) ", re.M)  # rank 0's step lines
# What `launcher prepare` prints while it tokenizes (datasets' progress bar, on stderr), and on a cache hit.
TOKENIZING = "tokenizing:"


def launcher(lab, *args: str, cache: Path) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` against the lab; the jobs inherit this environment (a cache of the test's own)."""
    env = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                              "LAUNCHER_CACHE": str(cache)})
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


def submit(lab, tmp_path: Path, name: str, *args: str) -> tuple[Path, list[str]]:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / name
    cp = launcher(lab, "slurm", str(spec), "--name", name, "--out", str(run_dir), "--submit", *args,
                  cache=tmp_path / "cache")
    assert cp.returncode == 0, cp.stderr
    return run_dir, cp.stdout.split()


def log_of(run_dir: Path, job_name: str, job: str) -> str:
    return (run_dir / "logs" / f"{job_name}-{job}.out").read_text(errors="replace")


def status_of(lab, run_dir: Path, cache: Path) -> dict[str, dict]:
    cp = launcher(lab, "status", "--json", str(run_dir), cache=cache)
    assert cp.returncode == 0, cp.stderr
    [run] = json.loads(cp.stdout)
    return {j["job_id"]: j for j in run["jobs"]}


def ran_in_order(lab, jobs: list[str]) -> None:
    """Each job started after the one before ended (sacct's own times)."""
    rows = [lab.sacct(j, ["JobID", "Start", "End", "State"])[-1] for j in jobs]
    for before, after in zip(rows, rows[1:]):
        assert after["Start"] >= before["End"], rows  # ISO times: string order is time order


def test_prep_job_tokenizes_before_a_two_node_job_whose_ranks_only_read_the_cache(slurm_lab, tmp_path):
    run_dir, (prep, train) = submit(slurm_lab, tmp_path, "chain2x1", "--nodes", "2", "--nproc", "1")
    recorded = [(j["job_id"], j["kind"], j.get("after")) for j in
                map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines())]
    assert recorded == [(prep, "prep", None), (train, "train", prep)]

    assert slurm_lab.wait_job(train, timeout=600) == "COMPLETED", log_of(run_dir, "chain2x1", train)[-3000:]
    assert slurm_lab.wait_job(prep, timeout=60) == "COMPLETED"
    ran_in_order(slurm_lab, [prep, train])
    prep_log, train_log = log_of(run_dir, "chain2x1-prep", prep), log_of(run_dir, "chain2x1", train)
    # the prep job tokenized (and made the tiny base); the ranks only read what it left
    assert TOKENIZING in prep_log and f"prepared {tmp_path / 'cache'}" in prep_log, prep_log[-3000:]
    assert "base model" in prep_log and (run_dir / "base" / "config.json").is_file()
    assert TOKENIZING not in train_log and "prepared " not in train_log, train_log[-3000:]
    assert [int(s) for s, _, _ in STEP.findall(train_log)] == [1, 2], train_log[-3000:]
    assert (run_dir / "final" / "config.json").is_file()
    # every line a rank wrote carries its rank: `launcher logs --rank/--node` pick them, and each rank's
    # own stdout is kept apart as well (torchrun --tee, RUN_DIR/logs/ranks/<job>/node<N>/)
    by_rank = {r: launcher(slurm_lab, "logs", str(run_dir), "--rank", str(r), cache=tmp_path / "cache") for r in (0, 1)}
    node2 = launcher(slurm_lab, "logs", str(run_dir), "--node", "node2", cache=tmp_path / "cache")
    assert all(cp.returncode == 0 for cp in (*by_rank.values(), node2)), [cp.stderr for cp in by_rank.values()]
    assert [int(s) for s, _, _ in STEP.findall(by_rank[0].stdout)] == [1, 2], by_rank[0].stdout[-3000:]
    rank1 = [ln for ln in by_rank[1].stdout.splitlines() if not ln.startswith("==> ")]
    assert rank1 and all(ln.startswith("[rank1]:") for ln in rank1), by_rank[1].stdout[-3000:]
    assert node2.stdout == by_rank[1].stdout  # one rank per node
    [out0] = (run_dir / "logs" / "ranks" / train / "node0").glob("*/attempt_0/0/stdout.log")
    assert [int(s) for s, _, _ in STEP.findall(out0.read_text())] == [1, 2]
    assert list((run_dir / "logs" / "ranks" / train / "node1").glob("*/attempt_0/0/stderr.log"))
    # the training job has one step, the ranks (one torchrun per node): no preparation step inside it
    steps = [r for r in slurm_lab.sacct(train, ["JobID", "NodeList", "NTasks"], steps=True)
             if re.fullmatch(rf"{train}\.\d+", r["JobID"])]
    assert [(r["JobID"], r["NodeList"], r["NTasks"]) for r in steps] == [(f"{train}.0", "node[1-2]", "2")], steps
    [prep_row] = slurm_lab.sacct(prep, ["NNodes", "AllocCPUS"])
    assert (prep_row["NNodes"], prep_row["AllocCPUS"]) == ("1", "1")

    status = status_of(slurm_lab, run_dir, tmp_path / "cache")
    assert {j: (s["kind"], s["state"]) for j, s in status.items()} == {prep: ("prep", "COMPLETED"),
                                                                      train: ("train", "COMPLETED")}
    assert status[prep]["logs"] == [str(run_dir / "logs" / f"chain2x1-prep-{prep}.out")]


def test_then_merge_then_eval_follow_a_lora_run_in_order(slurm_lab, tmp_path):
    run_dir, jobs = submit(slurm_lab, tmp_path, "chainlora", "--nodes", "1", "--nproc", "1", "--method", "lora",
                           "--then", "merge", "--then", "eval")
    prep, train, merge, ev = jobs
    recorded = [(j["job_id"], j["kind"], j.get("after")) for j in
                map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines())]
    assert recorded == [(prep, "prep", None), (train, "train", prep), (merge, "merge", train), (ev, "eval", merge)]

    names = {prep: "chainlora-prep", train: "chainlora", merge: "chainlora-merge", ev: "chainlora-eval"}
    state = slurm_lab.wait_job(ev, timeout=600)
    logs = {j: log_of(run_dir, n, j) if (run_dir / "logs" / f"{n}-{j}.out").is_file() else "" for j, n in names.items()}
    assert state == "COMPLETED", "\n".join(text[-2000:] for text in logs.values())
    for job in jobs:
        assert slurm_lab.wait_job(job, timeout=60) == "COMPLETED", logs[job][-3000:]
    ran_in_order(slurm_lab, jobs)

    assert (run_dir / "final" / "adapter_config.json").is_file()  # training wrote the adapter
    merged = run_dir / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file(), logs[merge][-3000:]
    assert not (merged / "adapter_config.json").exists()  # a plain model
    assert f"merged model + tokenizer in {merged}" in logs[merge]
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["run_dir"] == str(run_dir) and results, logs[ev][-3000:]
    assert "launcher: job step ended with status 0" in logs[merge] and "launcher: job step ended with status 0" in logs[ev]

    status = status_of(slurm_lab, run_dir, tmp_path / "cache")
    assert [(status[j]["kind"], status[j]["state"]) for j in jobs] == [
        ("prep", "COMPLETED"), ("train", "COMPLETED"), ("merge", "COMPLETED"), ("eval", "COMPLETED")]
