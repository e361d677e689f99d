"""Operating runs on the real lab cluster: `cluster check` against the live partitions,
a GPU-shaped 2-node script scheduled with its GPUs, `status` for every way a job ends (also after
the controller forgot the job), `logs -f` returning when the job ends, `cancel`, and `cost`
against sacct's own numbers.

Every job is submitted by the module fixture at once, so their waits overlap (the whole file takes
about three minutes on 2 cores). Jobs whose content is not the point are small hand-written
scripts recorded into a run dir; the GPU-shaped job is `launcher slurm`'s own script with a
stand-in `python3` on the PATH (the nodes have no GPUs to train on), and one run is a real
`launcher slurm --submit` of the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from launcher.rundir.jobs import job_ids, record_job
from launcher.rundir.layout import JOB_LOG_PATTERN, RunDir

ROOT = Path(__file__).resolve().parents[2]
GPU_PRICE = 3.6  # $/GPU-hour in the lab profile
NODE_PRICE = 1.2  # $/node-hour
LAB_PROFILE = {
    "default_partition": "debug",
    "partitions": {"debug": {"gpu_type": "h100", "gpus_per_node": 2, "cpus_per_node": 2, "mem_per_node": "4000M",
                             "max_nodes": 2, "usd_per_gpu_hour": GPU_PRICE, "usd_per_node_hour": NODE_PRICE}},
}
WRONG_PROFILE = {
    "default_partition": "debug",
    "partitions": {"gpu": {"gpu_type": "h100", "gpus_per_node": 2},
                   "debug": {"gpu_type": "a100", "gpus_per_node": 2, "cpus_per_node": 2, "max_time": "04:00:00"}},
}
TINY = {"data": {"seq_len": 64}, "optim": {"max_steps": 3, "micro_batch": 2}, "precision": "fp32",
        "zero": {"stage": 2}, "cluster": {"gpus_per_node": 0, "time": "10", "partition": "debug",
                                          "prep": {"cpus": 1}}}  # the preparation job fits a 2-CPU node


def launcher(lab, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})})
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=full, text=True,
                          capture_output=True, timeout=timeout)


def launcher_popen(lab, *args: str) -> subprocess.Popen:
    full = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def status_json(lab, *run_dirs: Path, env: dict | None = None) -> dict[str, dict]:
    cp = launcher(lab, "status", "--json", *map(str, run_dirs), env=env)
    assert cp.returncode == 0, cp.stderr
    return {job["job_id"]: job for run in json.loads(cp.stdout) for job in run["jobs"]}


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def hand_written_run(lab, base: Path, name: str, body: str, *directives: str) -> tuple[Path, str]:
    """A run dir (made by `launcher slurm --out`) and a small hand-written job recorded into it."""
    run_dir = base / name
    cp = launcher(lab, "slurm", "--out", str(run_dir), "--partition", "debug", "--name", name)
    assert cp.returncode == 0, cp.stderr
    script = run_dir / f"{name}.sh"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={RunDir(run_dir).logs}/{JOB_LOG_PATTERN}",
             "#SBATCH --oversubscribe", *(f"#SBATCH {d}" for d in directives), textwrap.dedent(body)]
    script.write_text("\n".join(lines) + "\n")
    job = str(lab.sbatch(script, cwd=run_dir))
    record_job(run_dir, job, "train")
    return run_dir, job


STUB = """\
#!/bin/bash
# Stand-in for python3 on GPU-shaped nodes without GPUs: says what Slurm gave it, then works a while.
case "$*" in *"launcher prepare"*) echo "STUB prepare"; exit 0;; esac
echo "STUB node=$SLURMD_NODENAME CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE restart=${SLURM_RESTART_COUNT:-0}"
sleep 12
echo "STUB done on $SLURMD_NODENAME"
"""


@pytest.fixture(scope="module")
def profiles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "clusters.yaml"
    path.write_text(yaml.safe_dump({"lab": LAB_PROFILE, "wrong": WRONG_PROFILE}))
    return path


@pytest.fixture(scope="module")
def jobs(slurm_lab, tmp_path_factory, profiles_file):
    """Every job of this file, submitted at once; waits happen in the tests."""
    base = tmp_path_factory.mktemp("lifecycle")
    out: dict = {"base": base}

    # A GPU-shaped 2-node job: launcher slurm's own script; python3 is a stand-in on the PATH.
    stub_dir = base / "stub"
    stub_dir.mkdir()
    (stub_dir / "python3").write_text(STUB)
    (stub_dir / "python3").chmod(0o755)
    gpu_spec = base / "gpu.yaml"
    gpu_spec.write_text(yaml.safe_dump({"name": "gpu2x2", "cluster": {
        "nodes": 2, "gpus_per_node": 2, "nproc_per_node": 1, "time": "10", "net_ifname": "eth0",
        # one CPU, not the profile's whole node: the hand-written jobs below run beside it, as they always did
        "cpus_per_task": 1, "setup": [f"export PATH={stub_dir}:$PATH"]}}))
    gpu_run = base / "gpu"
    # --no-prep: the stand-in reads no data, and the run's cost is this one job's
    common = ["--cluster", "lab", "--clusters", str(profiles_file)]
    cp = launcher(slurm_lab, "slurm", str(gpu_spec), "--out", str(gpu_run), "--gpus-per-node", "2", "--no-prep",
                  *common)
    assert cp.returncode == 0, cp.stderr
    out["gpu_test_only"] = slurm_lab.cmd("sbatch", "--test-only", str(gpu_run / "job.sbatch"), check=False,
                                         cwd=gpu_run)
    cp = launcher(slurm_lab, "slurm", str(gpu_spec), "--out", str(gpu_run), "--gpus-per-node", "2", "--no-prep",
                  *common, "--force", "--submit")
    assert cp.returncode == 0, cp.stderr
    out["gpu"] = (gpu_run, cp.stdout.strip().splitlines()[-1])
    out["gpu_follow"] = launcher_popen(slurm_lab, "logs", "-f", str(gpu_run))

    # Hand-written jobs for the ways a job ends.
    out["failed"] = hand_written_run(slurm_lab, base, "failed", """\
        echo "loading shard 7"
        python3 -c "raise ValueError('bad shard 7: 3 rows have no text field')"
        """)
    out["oom"] = hand_written_run(slurm_lab, base, "oom", """\
        echo "step 1/10 loss 9.1234 lr 1.000e-04 tokens/s 1,000"
        echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total)" >&2
        exit 5
        """)
    out["cancelled"] = hand_written_run(slurm_lab, base, "cancelled", "echo started; sleep 300\n")
    out["timeout"] = hand_written_run(slurm_lab, base, "timeout", "echo started; sleep 300\n", "--time=1")

    # The tiny model through `launcher slurm --submit` (CPU ranks), priced per node-hour.
    tiny_run = base / "tiny"
    tiny_spec = base / "tiny.yaml"
    tiny_spec.write_text(yaml.safe_dump(TINY))
    args = [str(tiny_spec), "--nodes", "1", "--nproc", "1", "--net-ifname", "eth0", "--name", "tiny", *common]
    # Nothing prepared by hand: the run's preparation job tokenizes and makes the tiny base.
    cp = launcher(slurm_lab, "slurm", *args, "--out", str(tiny_run), "--submit")
    assert cp.returncode == 0, cp.stderr
    out["tiny"] = (tiny_run, cp.stdout.strip().splitlines()[-1])
    yield out
    for key in ("gpu", "failed", "oom", "cancelled", "timeout", "tiny"):
        slurm_lab.cmd("scancel", out[key][1], check=False)
    if out["gpu_follow"].poll() is None:
        out["gpu_follow"].kill()
        out["gpu_follow"].wait()


# --------------------------------------------------------------------------- cluster check

def test_cluster_check_passes_on_the_lab_profile_and_lists_each_difference(slurm_lab, profiles_file):
    cp = launcher(slurm_lab, "cluster", "check", "lab", "--clusters", str(profiles_file))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "matches the live cluster" in cp.stdout

    cp = launcher(slurm_lab, "cluster", "check", "wrong", "--clusters", str(profiles_file))
    assert cp.returncode == 1, cp.stdout + cp.stderr
    out = cp.stdout
    assert "partition gpu: exists: profile says yes, cluster has no such partition (it has: debug)" in out
    assert "partition debug, node node1: GPU type: profile says a100, cluster has h100" in out
    assert "partition debug, node node2: GPU type: profile says a100, cluster has h100" in out
    assert "partition debug: max time: profile says 04:00:00, cluster has no limit" in out
    assert "differs from the live cluster in 4 place(s)" in out, out  # nothing else differs

    cp = launcher(slurm_lab, "cluster", "check", "nope", "--clusters", str(profiles_file))
    assert cp.returncode == 2 and "no cluster named 'nope'" in cp.stderr


# --------------------------------------------------------------------------- a GPU-shaped job

def test_gpu_shaped_two_node_script_is_scheduled_with_four_gpus_and_logs_follow_to_the_end(slurm_lab, jobs):
    test_only = jobs["gpu_test_only"]
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    run_dir, job = jobs["gpu"]
    follow = jobs["gpu_follow"]
    log = lambda: "\n".join(p.read_text(errors="replace") for p in RunDir(run_dir).logs.glob("*.out"))  # noqa: E731

    # Requeue the first attempt while it runs: the job then has two attempts to account for.
    wait_until(lambda: log().count("STUB node=") >= 2, 180, "both nodes of the GPU job to start")
    slurm_lab.cmd("scontrol", "requeue", job)
    wait_until(lambda: slurm_lab.scontrol_show_job(job).get("JobState") == "PENDING", 60, "the requeued job to pend")
    time.sleep(3)
    assert follow.poll() is None, "logs -f returned while the job was requeued and pending"
    assert slurm_lab.wait_job(job, timeout=240, release_requeued=True) == "COMPLETED", log()
    stdout, stderr = follow.communicate(timeout=60)  # returns by itself once the job has ended
    assert follow.returncode == 0, stderr
    text = log()
    assert stdout == text and "job step ended with status 0" in text, stdout  # every line, to the end
    assert "CUDA_VISIBLE_DEVICES=0,1 SLURM_GPUS_ON_NODE=2 restart=1" in text, text
    rows = slurm_lab.sacct(job, ["JobID", "State", "AllocTRES", "NNodes"], all_attempts=True)
    assert [r["State"] for r in rows] == ["REQUEUED", "COMPLETED"], rows
    assert all("gres/gpu=4" in r["AllocTRES"] and r["NNodes"] == "2" for r in rows), rows


# --------------------------------------------------------------------------- status

def _expect(statuses: dict[str, dict], jobs: dict, source: set[str]) -> None:
    gpu = statuses[jobs["gpu"][1]]
    assert gpu["state"] == "COMPLETED" and gpu["reason"] == "completed", gpu
    assert gpu["gpus"] == 4 and gpu["nodes"] == 2 and gpu["restarts"] == 1, gpu
    assert [a["reason"] for a in gpu["attempts"]] == ["preempted and requeued", "completed"], gpu["attempts"]

    failed = statuses[jobs["failed"][1]]
    assert failed["state"] == "FAILED" and failed["reason"] == "failed" and failed["exit_code"] == 1, failed
    assert failed["log_line"] == "ValueError: bad shard 7: 3 rows have no text field", failed
    assert failed["detail"] == "failed: exit code 1: ValueError: bad shard 7: 3 rows have no text field"

    oom = statuses[jobs["oom"][1]]
    assert oom["reason"] == "out of memory" and oom["exit_code"] == 5 and not oom["transient"], oom
    assert oom["log_line"].startswith("torch.OutOfMemoryError: CUDA out of memory"), oom
    assert (oom["step"], oom["max_steps"], oom["loss"]) == (1, 10, 9.1234), oom

    cancelled = statuses[jobs["cancelled"][1]]
    assert cancelled["state"] == "CANCELLED" and cancelled["reason"] == "cancelled", cancelled

    timeout = statuses[jobs["timeout"][1]]
    assert timeout["state"] == "TIMEOUT" and timeout["reason"] == "time limit", timeout
    assert "DUE TO TIME LIMIT" in timeout["log_line"], timeout

    tiny = statuses[jobs["tiny"][1]]
    assert tiny["state"] == "COMPLETED" and tiny["reason"] == "completed", tiny
    assert (tiny["step"], tiny["max_steps"]) == (3, 3) and tiny["loss"] > 0, tiny
    assert tiny["nodes"] == 1 and tiny["gpus"] == 0, tiny

    for key in ("gpu", "failed", "oom", "cancelled", "timeout", "tiny"):
        assert statuses[jobs[key][1]]["source"] in source, (key, statuses[jobs[key][1]])


def test_status_reports_how_each_job_ended(slurm_lab, jobs):
    run_dirs = [jobs[k][0] for k in ("gpu", "failed", "oom", "cancelled", "timeout", "tiny")]
    # cancel: every live job of the run dir, through the command
    cancelled_dir, cancelled_job = jobs["cancelled"]
    wait_until(lambda: slurm_lab.scontrol_show_job(cancelled_job).get("JobState") == "RUNNING", 240, "a running job")
    live = status_json(slurm_lab, cancelled_dir)[cancelled_job]
    assert live["state"] == "RUNNING" and live["live"] and live["source"] == "squeue", live
    cp = launcher(slurm_lab, "cancel", str(cancelled_dir))
    assert cp.returncode == 0 and cancelled_job in cp.stdout, cp.stderr

    for key in ("failed", "oom", "cancelled", "timeout", "tiny", "gpu"):
        state = slurm_lab.wait_job(jobs[key][1], timeout=300, release_requeued=True)
        assert state != "PENDING"
    statuses = status_json(slurm_lab, *run_dirs)
    _expect(statuses, jobs, {"scontrol", "sacct"})
    text = launcher(slurm_lab, "status", *map(str, run_dirs))
    assert text.returncode == 0, text.stderr
    assert "failed: exit code 1: ValueError: bad shard 7" in text.stdout, text.stdout
    assert "attempt 1: REQUEUED" in text.stdout, text.stdout


def test_status_after_the_controller_forgot_the_jobs(slurm_lab, jobs):
    run_dirs = [jobs[k][0] for k in ("gpu", "failed", "oom", "cancelled", "timeout", "tiny")]
    ids = [jobs[k][1] for k in ("gpu", "failed", "oom", "cancelled", "timeout", "tiny")]
    before = int(slurm_lab.knobs["min_job_age"])
    slurm_lab.set_config(min_job_age=10)
    try:
        for job in ids:
            slurm_lab.wait_forgotten(job, timeout=150)
    finally:
        slurm_lab.set_config(min_job_age=before)
    statuses = status_json(slurm_lab, *run_dirs)
    _expect(statuses, jobs, {"sacct"})

    # Without accounting either, the run dir's own record still answers.
    fake = jobs["base"] / "no-accounting"
    fake.mkdir(exist_ok=True)
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Problem talking to the database' >&2\nexit 1\n")
    (fake / "sacct").chmod(0o755)
    statuses = status_json(slurm_lab, *run_dirs, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    tiny, timeout = statuses[jobs["tiny"][1]], statuses[jobs["timeout"][1]]
    assert (tiny["source"], tiny["state"], tiny["reason"], tiny["step"]) == ("run dir", "COMPLETED", "completed", 3), tiny
    assert (timeout["source"], timeout["state"], timeout["reason"]) == ("run dir", "TIMEOUT", "time limit"), timeout


# --------------------------------------------------------------------------- cost

def test_cost_is_the_sum_over_attempts_of_sacct_elapsed_times_allocation_times_price(slurm_lab, jobs, profiles_file):
    gpu_run, gpu_job = jobs["gpu"]
    tiny_run, tiny_job = jobs["tiny"]
    for job in (gpu_job, tiny_job):
        slurm_lab.wait_job(job, timeout=300, release_requeued=True)
    cp = launcher(slurm_lab, "cost", "--json", "--clusters", str(profiles_file), str(gpu_run), str(tiny_run))
    assert cp.returncode == 0, cp.stderr
    gpu, tiny = json.loads(cp.stdout)

    rows = slurm_lab.sacct(gpu_job, ["ElapsedRaw", "AllocTRES"], all_attempts=True)
    assert len(rows) == 2
    gpu_seconds = sum(int(r["ElapsedRaw"]) * int(r["AllocTRES"].split("gres/gpu=")[1].split(",")[0]) for r in rows)
    assert gpu["gpu_hours"] == pytest.approx(gpu_seconds / 3600, rel=0.01)
    assert gpu["usd"] == pytest.approx(gpu_seconds / 3600 * GPU_PRICE, rel=0.01)
    assert len(gpu["attempts"]) == 2 and gpu["tokens"] is None

    # every job of the run is paid for: the training job, and its preparation job when the cache lacked the data
    tiny_ids = job_ids(tiny_run)
    assert tiny_ids[-1] == tiny_job
    rows = [r for j in tiny_ids for r in slurm_lab.sacct(j, ["ElapsedRaw", "NNodes"], all_attempts=True)]
    node_seconds = sum(int(r["ElapsedRaw"]) * int(r["NNodes"]) for r in rows)
    assert tiny["gpu_hours"] == 0 and tiny["usd"] == pytest.approx(node_seconds / 3600 * NODE_PRICE, rel=0.01)
    tokens = 3 * 2 * 64  # max_steps x (micro batch 2 x 1 rank) x seq_len 64
    assert tiny["tokens"] == tokens
    assert tiny["usd_per_mtok"] == pytest.approx(tiny["usd"] / tokens * 1e6, rel=1e-9)
    assert tiny["estimate"]["usd_per_mtok"] is None and "CPU" in tiny["estimate"]["note"]

    text = launcher(slurm_lab, "cost", "--clusters", str(profiles_file), str(gpu_run))
    assert text.returncode == 0 and "GPU-hours" in text.stdout and "REQUEUED" in text.stdout, text.stdout
