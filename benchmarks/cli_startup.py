"""How fast the CLI answers: `launcher --help` against `deepspeed --help` on the same machine.

    python benchmarks/cli_startup.py [--runs 7]

Prints the median wall time of each (fresh interpreter each run) and the ratio; the target is
launcher/deepspeed <= 0.15.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ours = wall([sys.executable, "-m", "launcher", "--help"], args.runs)
    ds_bin = shutil.which("deepspeed")
    ds_cmd = [ds_bin, "--help"] if ds_bin else [sys.executable, "-m", "deepspeed.launcher.runner", "--help"]
    theirs = wall(ds_cmd, args.runs)
    print(f"launcher --help   {ours * 1000:8.1f} ms (median of {args.runs})")
    print(f"deepspeed --help  {theirs * 1000:8.1f} ms (median of {args.runs})")
    print(f"ratio             {ours / theirs:8.3f}  (target <= 0.15)")


if __name__ == "__main__":
    main()
