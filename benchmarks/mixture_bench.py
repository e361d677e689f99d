"""Mixture data benchmarks (issue #14), on this machine:

  rss    a training rank's peak RSS with a mixture corpus 1x and 10x as large (same steps, same spec
         otherwise): the rank maps its shards, so its memory should not grow with the corpus;
  prep   `launcher prepare` tokens/s with 1, 2 and 4 processes (--procs) over the same shards;
  slurm  the preparation job array with 1, 2 and 4 tasks on the Slurm lab cluster (tests/cluster/slurmlab.py;
         root): tokens over the array's span from its first task's start to its last task's end (sacct).

  python benchmarks/mixture_bench.py rss|prep|slurm --out DIR

Writes DIR/<kind>.json and prints one line per measurement. Runs with the checkout on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(root: Path, copies: int) -> Path:
    """The embedded corpus, `copies` times, as three sources (jsonl, txt, jsonl)."""
    text = (ROOT / "launcher" / "tiny" / "corpus.txt").read_text()
    paras = [p for p in text.split("\n\n") if p.strip()]
    root.mkdir(parents=True, exist_ok=True)
    third = len(paras) // 3
    with (root / "web.jsonl").open("w") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": p}) + "\n" for p in paras[:third])
    with (root / "code.txt").open("w") as f:
        for _ in range(copies):
            f.write("\n\n".join(paras[third: 2 * third]) + "\n\n")
    with (root / "replay.jsonl").open("w") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": p}) + "\n" for p in paras[2 * third:])
    return root


def spec(path: Path, data: Path, cache: Path, steps: int) -> Path:
    tree = {"precision": "fp32", "zero": {"stage": 2}, "optim": {"max_steps": steps, "micro_batch": 4},
            "output": {"log_every": 10},
            "data": {"seq_len": 128, "shard_mb": 1.0, "cache_dir": str(cache), "sources": [
                {"name": "web", "path": str(data / "web.jsonl"), "weight": 0.6},
                {"name": "code", "path": str(data / "code.txt"), "weight": 0.3},
                {"name": "replay", "path": str(data / "replay.jsonl"), "weight": 0.1}]}}
    path.write_text(json.dumps(tree))
    return path


def launcher(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "launcher", *args], env=env, text=True, capture_output=True, check=True)


def peak_rss_of_run(spec_path: Path, out: Path) -> int:
    """Peak RSS (bytes) of the largest process of `launcher run` (the rank), measured by a fresh helper
    process whose only child is the run, so RUSAGE_CHILDREN holds nothing else."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cp = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "launcher", "run", str(spec_path),
                         "--out", str(out)], env=env, text=True, capture_output=True, check=True)
    return int(cp.stdout.strip().splitlines()[-1]) * 1024


def rss(out: Path) -> dict:
    rows = []
    specs = {}
    for copies in (1, 10):
        data = corpus(out / f"data{copies}", copies)
        specs[copies] = spec(out / f"mix{copies}.yaml", data, out / f"cache{copies}", steps=30)
        launcher("prepare", str(specs[copies]))
    for rep in range(2):  # alternating, the machine is shared
        for copies in (1, 10):
            run = out / f"run{copies}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            peak = peak_rss_of_run(specs[copies], run)
            tokens = sum(json.loads(m.read_text())["tokens"] for m in (out / f"cache{copies}").glob("shards-*/manifest.json"))
            rows.append({"copies": copies, "corpus_tokens": tokens, "peak_rss_bytes": peak, "rep": rep})
            print(f"corpus x{copies:<3} {tokens:>10,} tokens  rank peak RSS {peak / 2**20:,.0f} MiB", flush=True)
    med = {c: sorted(r["peak_rss_bytes"] for r in rows if r["copies"] == c) for c in (1, 10)}
    ratio = max(med[10]) / min(med[1])
    print(f"10x corpus / 1x corpus peak RSS: worst {ratio:.3f}, best {min(med[10]) / max(med[1]):.3f}")
    return {"rows": rows, "worst_ratio": ratio}


def prep(out: Path) -> dict:
    data = corpus(out / "data", 10)
    rows = []
    for procs in (1, 2, 4):
        cache = out / f"cache-p{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        s = spec(out / f"prep{procs}.yaml", data, cache, steps=1)
        t0 = time.perf_counter()
        cp = launcher("prepare", str(s), "--procs", str(procs))
        wall = time.perf_counter() - t0
        m = re.search(r"([\d,]+) tokens in ([\d.]+) s", cp.stdout)
        tokens = int(m.group(1).replace(",", ""))
        rows.append({"procs": procs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall})
        print(f"procs {procs}: {tokens:,} tokens in {wall:.1f} s wall = {tokens / wall:,.0f} tokens/s", flush=True)
    return {"rows": rows, "cpus": os.cpu_count()}


def slurm(out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from datetime import datetime

    from slurmlab import SlurmLab

    lab = SlurmLab.ensure()
    rows = []
    try:
        data = corpus(out / "data", 10)
        for tasks in (1, 2, 4):
            s = spec(out / f"slurm{tasks}.yaml", data, out / f"cache-t{tasks}", steps=1)
            tree = json.loads(s.read_text())
            tree["cluster"] = {"gpus_per_node": 0, "time": "10", "partition": "debug", "net_ifname": "eth0",
                               "prep": {"cpus": 1, "time": "10", "tasks": tasks}}
            tree["data"]["shard_mb"] = 0.5
            s.write_text(json.dumps(tree))
            run = out / f"slurm-run{tasks}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(out / f"cache-t{tasks}", ignore_errors=True)
            env = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
            cp = subprocess.run([sys.executable, "-m", "launcher", "slurm", str(s), "--out", str(run), "--submit"],
                                env=env, text=True, capture_output=True, check=True)
            prep_job = cp.stdout.split()[0]
            state = lab.wait_job(prep_job, timeout=900)
            deadline = time.monotonic() + 900
            while True:  # an array's job id can report done before every task has ended: wait for each
                got = lab.sacct(prep_job, ["JobID", "State", "Start", "End", "NodeList"])
                parts = [r for r in got if r["JobID"] != prep_job or tasks == 1]
                if len(parts) == tasks and all(r["End"] not in ("Unknown", "") for r in parts):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"prep array {prep_job} did not end: {got}")
                time.sleep(2)
            state = ",".join(sorted({r["State"] for r in parts}))
            t0 = min(datetime.fromisoformat(r["Start"]) for r in parts)
            t1 = max(datetime.fromisoformat(r["End"]) for r in parts)
            tokens = sum(json.loads(m.read_text())["tokens"] for m in (out / f"cache-t{tasks}").glob("shards-*/manifest.json"))
            span = (t1 - t0).total_seconds()
            rows.append({"tasks": tasks, "state": state, "tokens": tokens, "span_s": span,
                         "tokens_per_s": tokens / span if span else None,
                         "nodes": sorted({r["NodeList"] for r in parts})})
            print(f"tasks {tasks}: {tokens:,} tokens, array span {span:.0f} s = {tokens / max(span, 1):,.0f} tokens/s "
                  f"on {', '.join(rows[-1]['nodes'])} ({state})", flush=True)
    finally:
        lab.leave()
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["rss", "prep", "slurm"])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"rss": rss, "prep": prep, "slurm": slurm}[a.kind](a.out.resolve())
    (a.out / f"{a.kind}.json").write_text(json.dumps(result, indent=2) + "\n")



if __name__ == "__main__":
    main()
