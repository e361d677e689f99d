"""A GPU job's CPUs and memory come from the cluster profile, proven on the real lab cluster.

The lab's nodes are GPU-shaped (gres gpu:h100:2 backed by stand-in device files, no real GPU), so
`launcher slurm` renders and Slurm schedules a real `--gpus-per-node=2` job from a profile that declares
the node (2 GPUs, 2 CPUs, 3000M); the ranks per node come from the GPUs. The job runs launcher's own
script and torchrun for real; only the rank's entry is replaced (a `python3` on the PATH swaps `-m
launcher train` for a reporter), since a rank with a GPU plan would need CUDA. Each rank reports the
CPUs, memory and threads it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROFILE = {"default_partition": "debug", "partitions": {"debug": {
    "gpu_type": "h100", "gpus_per_node": 2, "cpus_per_node": 2, "mem_per_node": "3000M", "max_nodes": 2}}}

# Each rank: what Slurm and the script gave it, as one line.
REPORTER = """\
import json, os
keys = ("RANK", "LOCAL_RANK", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE",
        "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")
print("RANKREPORT " + json.dumps({**{k: os.environ.get(k) for k in keys},
                                  "affinity": len(os.sched_getaffinity(0))}), flush=True)
"""
# python3 on the PATH (cluster.setup puts it first): torchrun runs for real, with the reporter as the ranks'
# entry in place of `-m launcher train SPEC`.
PYTHON_STANDIN = f"""\
#!{sys.executable}
import os, sys
argv = sys.argv[1:]
if argv[:2] == ["-m", "torch.distributed.run"]:
    i = len(argv) - 4
    assert argv[i:i + 3] == ["-m", "launcher", "train"], argv
    argv[i:i + 3] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "reporter.py")]
os.execv(sys.executable, [sys.executable, *argv])
"""


def test_a_gpu_job_gets_the_profiles_cpus_memory_and_threads_per_rank(slurm_lab, tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "reporter.py").write_text(REPORTER)
    (stub / "python3").write_text(PYTHON_STANDIN)
    (stub / "python3").chmod(0o755)
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text(yaml.safe_dump({"lab": PROFILE}))
    spec = tmp_path / "gpu.yaml"
    spec.write_text(yaml.safe_dump({"name": "gpu-cpus", "cluster": {
        "nodes": 1, "time": "5", "net_ifname": "eth0", "setup": [f"export PATH={stub}:$PATH"]}}))
    run_dir = tmp_path / "run"
    env = slurm_lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    cp = subprocess.run([sys.executable, "-m", "launcher", "slurm", str(spec), "--cluster", "lab", "--clusters",
                         str(clusters), "--gpus-per-node", "2", "--no-prep", "--out", str(run_dir), "--submit"],
                        cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    job = cp.stdout.split()[-1]
    plan = (run_dir / "plan.txt").read_text()
    assert "1 node(s) x 2 rank(s)" in plan and "1 CPU core(s) per rank (OMP_NUM_THREADS=1); 3000M per node" in plan

    state = slurm_lab.wait_job(job, timeout=120)
    log = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out"))
    assert state == "COMPLETED", log[-3000:]
    reports = [json.loads(line.split("RANKREPORT ", 1)[1]) for line in log.splitlines() if "RANKREPORT " in line]
    assert sorted(r["RANK"] for r in reports) == ["0", "1"], log[-3000:]
    for r in reports:
        # torchrun's one task holds the node's two ranks: 2 CPUs (Slurm's default would be 1), the node's memory,
        # both GPUs; each rank's threads are its share of the cores, from the script (not torchrun's default)
        assert r["SLURM_CPUS_PER_TASK"] == "2" and r["SLURM_MEM_PER_NODE"] == "3000", r
        assert r["SLURM_GPUS_ON_NODE"] == "2" and r["CUDA_VISIBLE_DEVICES"] == "0,1", r
        assert r["OMP_NUM_THREADS"] == "1" and r["affinity"] >= 1, r
    assert "Setting OMP_NUM_THREADS environment variable for each process" not in log  # torchrun left it alone
    # accounting: what was allocated (the lab's CR_Core tracks CPUs, not memory: the memory asked for is ReqMem)
    [row] = slurm_lab.sacct(job, ["AllocTRES", "ReqMem"])
    tres = dict(kv.split("=", 1) for kv in row["AllocTRES"].split(","))
    assert tres["cpu"] == "2" and tres["gres/gpu"] == "2" and row["ReqMem"].startswith("3000M"), row
