"""Mixture data benchmarks (issue #14), on this machine:

  rss    a training rank's peak RSS with a mixture corpus 1x and 10x as large (same steps, same spec
         otherwise): the rank maps its shards, so its memory should not grow with the corpus;
  prep   `launcher prepare` tokens/s with 1, 2 and 4 processes (--procs) over the same shards.

  python benchmarks/mixture_bench.py rss|prep --out DIR

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["rss", "prep"])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result = rss(a.out) if a.kind == "rss" else prep(a.out)
    (a.out / f"{a.kind}.json").write_text(json.dumps(result, indent=2) + "\n")



if __name__ == "__main__":
    main()
