"""Preemption, requeue, failed ranks and cut-off checkpoints on the real lab Slurm cluster.

Three 2-node jobs (one torchrun rank per node, tiny Llama, full fine-tuning, ZeRO-2, fp32 on CPU over
gloo), all `launcher slurm --submit` into their own run dirs, submitted at once so their waits overlap:

- reference: runs to max_steps undisturbed.
- preempted: once its log shows step 2, `scancel --signal=USR1 JOB` signals the job step (torchrun on
  each node forwards it to its rank). The ranks agree on a step, save, rank 0 writes the requeue
  marker, the batch script records the requeue in jobs.jsonl and runs `scontrol requeue`; the test
  releases Slurm's ~120 s requeue hold (StartTime=now). The second attempt resumes by itself from the
  checkpoint and ends at exactly max_steps, every step printed once, with Restarts>=1, and its final
  weights equal the reference's (the same path without the signal, same world size).
- faulty: LAUNCHER_TEST_FAULT kills rank 1 (on node2) with SIGKILL in the middle of saving
  checkpoint-4 (after its shards, before the completion marker). Rank 0 leaves within the collective
  timeout, the script names the silent rank and its node and retries (cluster.max_retries=1); the
  retry skips the cut-off checkpoint, resumes from checkpoint-2 and completes.
- oom (one node, one rank): LAUNCHER_TEST_FAULT raises torch.OutOfMemoryError at step 2 with
  cluster.max_retries=2: the rank records exit 5 and the script does not retry (a retry would repeat
  it); `launcher status` says out of memory, not transient.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.testing.faults import TEST_DUMP_ENV

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 10
TIMEOUT_S = 60  # cluster.nccl.timeout_s of the faulty job
SPEC = {"data": {"seq_len": 64}, "optim": {"max_steps": MAX_STEPS, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 2},
        "precision": "fp32", "zero": {"stage": 2}, "output": {"log_every": 1},
        "cluster": {"gpus_per_node": 0, "time": "15", "partition": "debug", "nodes": 2, "nproc_per_node": 1,
                    "prep": {"cpus": 1},  # the preparation job fits the lab's 2-CPU nodes
                    "net_ifname": "eth0", "max_requeues": 2}}
STEP = re.compile(r"^(?:\[rank0\]:|\s*0: )?step (\d+)/(\d+) loss ([0-9.]+) ", re.M)  # rank 0's step lines


def submit(lab, tmp: Path, name: str, spec: dict, **env: str) -> tuple[str, Path]:
    import yaml

    run_dir = tmp / name
    spec_file = tmp / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    full = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                               "LAUNCHER_CACHE": str(tmp / "cache")})
    for k in (TEST_DUMP_ENV, "LAUNCHER_TEST_FAULT"):
        full.pop(k, None)
    full.update(env)  # the job inherits this environment (--export=ALL)
    cp = subprocess.run([sys.executable, "-m", "launcher", "slurm", str(spec_file), "--name", name, "--out",
                         str(run_dir), "--submit"], cwd=ROOT, env=full, text=True, capture_output=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.strip().splitlines()[-1], run_dir


def log_of(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def steps_of(log: str) -> list[int]:
    return [int(s) for s, _, _ in STEP.findall(log)]


def watch(lab, job: str, timeout: float = 600) -> tuple[str, int]:
    """Wait for the job to end, releasing its requeue hold; returns (state, highest Restarts seen). The hold is
    released 3 s after the requeue at the earliest: a start within the second of the first attempt's end met
    its revoked credential ("Killing non-startable batch JobId=...: Job credential revoked", seen here with a
    one-node job)."""
    deadline = time.monotonic() + timeout
    restarts, held_since = 0, None
    while True:
        info = lab.scontrol_show_job(job)
        restarts = max(restarts, int(info.get("Restarts", "0") or 0))
        held = info.get("JobState") == "PENDING" and info.get("Restarts", "0") != "0" \
            and info.get("Reason") in ("BeginTime", "JobHeldAdmin", "JobHeldUser")
        held_since = (held_since or time.monotonic()) if held else None
        if held and time.monotonic() - held_since >= 3:
            lab.release(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                or not info:
            return lab.wait_job(job, timeout=120), restarts
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')} after {timeout}s"
        time.sleep(1)


def signal_at_step(lab, job: str, run_dir: Path, step: int = 2) -> float:
    """Once the job's log shows `step`, `scancel --signal=USR1` its job step (the preemption); the time sent."""
    deadline = time.monotonic() + 600
    while step not in steps_of(log_of(run_dir)):
        state = lab.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{log_of(run_dir)[-3000:]}"
        assert time.monotonic() < deadline, log_of(run_dir)[-3000:]
        time.sleep(0.5)
    lab.cmd("scancel", "--signal=USR1", job)
    return time.time()


@pytest.fixture(scope="module")
def jobs(slurm_lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    ref = submit(slurm_lab, tmp, "reference", SPEC, **{TEST_DUMP_ENV: str(tmp / "reference.pt")})
    pre = submit(slurm_lab, tmp, "preempted", SPEC, **{TEST_DUMP_ENV: str(tmp / "preempted.pt")})
    faulty_spec = json.loads(json.dumps(SPEC))
    faulty_spec["optim"]["max_steps"] = 6
    faulty_spec["output"]["save_every"] = 2
    faulty_spec["cluster"].update(max_retries=1, nccl={"timeout_s": TIMEOUT_S})
    faulty = submit(slurm_lab, tmp, "faulty", faulty_spec, LAUNCHER_TEST_FAULT="kill-in-save:rank=1:step=4")
    oom_spec = json.loads(json.dumps(SPEC))
    oom_spec["optim"]["max_steps"] = 3
    oom_spec["cluster"].update(nodes=1, max_retries=2)
    oom = submit(slurm_lab, tmp, "oom", oom_spec, LAUNCHER_TEST_FAULT="oom:rank=0:step=2")

    # the preemption: a USR1 to the job step once training is under way
    signalled = signal_at_step(slurm_lab, *pre)

    results = {}
    for key, (j, d) in {"reference": ref, "preempted": pre, "faulty": faulty, "oom": oom}.items():
        state, restarts = watch(slurm_lab, j)
        results[key] = {"job": j, "run_dir": d, "state": state, "restarts": restarts, "log": log_of(d)}
    results["preempted"]["signalled"] = signalled
    results["tmp"] = tmp
    return results


def test_preempted_job_requeues_resumes_and_ends_at_max_steps_with_the_reference_weights(jobs, slurm_lab):
    import torch

    ref, pre = jobs["reference"], jobs["preempted"]
    assert ref["state"] == "COMPLETED", ref["log"][-3000:]
    assert pre["state"] == "COMPLETED", pre["log"][-4000:]
    log = pre["log"]
    stopped = int(re.search(r"ranks agreed to stop at step (\d+)/", log).group(1))
    assert 2 <= stopped < MAX_STEPS
    assert "requeueing job" in log and f"resuming from {pre['run_dir'] / 'checkpoints' / f'checkpoint-{stopped}'}" in log
    # every step exactly once over both attempts: nothing repeated, nothing lost, ends at max_steps
    assert steps_of(log) == list(range(1, MAX_STEPS + 1)), log[-4000:]
    assert pre["restarts"] >= 1
    attempts = [r["State"].split()[0] for r in slurm_lab.sacct(pre["job"], ["State"], all_attempts=True)]
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", attempts
    requeues = [j for j in map(json.loads, (pre["run_dir"] / "jobs.jsonl").read_text().splitlines())
                if j["kind"] == "requeue"]
    assert len(requeues) == 1 and requeues[0]["job_id"] == pre["job"]
    a = torch.load(jobs["tmp"] / "reference.pt", weights_only=True)
    b = torch.load(jobs["tmp"] / "preempted.pt", weights_only=True)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"max |difference| {worst:.3e}"
    if os.environ.get("LAUNCHER_RESUME_RESULTS"):
        with open(os.environ["LAUNCHER_RESUME_RESULTS"], "a") as f:
            f.write(json.dumps({"case": "slurm-2x1-full-zero2-usr1", "stopped_at": stopped, "max_steps": MAX_STEPS,
                                "steps_lost": 0, "bitwise": all(torch.equal(a[k], b[k]) for k in a),
                                "max_abs_diff": worst, "restarts": pre["restarts"]}) + "\n")


def test_rank_killed_on_node2_mid_save_ends_the_attempt_in_time_and_the_retry_skips_the_cut_off_checkpoint(jobs, slurm_lab):
    f = jobs["faulty"]
    log, run_dir = f["log"], f["run_dir"]
    assert f["state"] == "COMPLETED", log[-4000:]
    assert "rank 1 on node2 ended without an exit record" in log, log[-4000:]
    assert "the job step failed" in log and "(retry 1 of 1)" in log
    markers = run_dir / "markers"
    job = f["job"]
    # the survivor left within the collective timeout, naming itself and why
    [survivor] = [json.loads(p.read_text()) for p in markers.glob(f"exit-{job}-a0-rank0.json")]
    assert survivor["reason"] == "collective_timeout" and survivor["node"] == "node1"
    [started] = [json.loads(p.read_text()) for p in markers.glob(f"start-{job}-a0-rank1.json")]
    assert started["node"] == "node2" and not (markers / f"exit-{job}-a0-rank1.json").exists()
    [fault] = [json.loads(p.read_text()) for p in markers.glob(f"fault-{job}-a0-rank1.json")]
    assert fault["kind"] == "kill-in-save" and fault["node"] == "node2"
    assert 0 <= survivor["time"] - fault["time"] < TIMEOUT_S
    # the retry: skips the cut-off save, resumes from checkpoint-2, completes
    assert "skipping .staging-checkpoint-4: cut off mid-save" in log
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-2'}" in log
    assert steps_of(log) == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 of the failed attempt are redone
    assert (run_dir / "final" / "config.json").is_file()
    retries = [j for j in map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines()) if j["kind"] == "retry"]
    assert len(retries) == 1
    assert f["restarts"] >= 1


def test_out_of_memory_is_not_retried_and_status_says_why(jobs, slurm_lab):
    o = jobs["oom"]
    log, run_dir = o["log"], o["run_dir"]
    assert o["state"] == "FAILED" and o["restarts"] == 0, log[-4000:]
    assert "not retrying: a rank ended with exit 5" in log, log[-4000:]
    assert "retry" not in [j["kind"] for j in map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines())]
    assert steps_of(log) == [1]
    env = slurm_lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    cp = subprocess.run([sys.executable, "-m", "launcher", "status", str(run_dir), "--json"], cwd=ROOT, env=env,
                        text=True, capture_output=True, timeout=120)
    [job] = [j for r in json.loads(cp.stdout) for j in r["jobs"] if j["job_id"] == o["job"]]
    assert job["reason"] == "out of memory" and job["exit_code"] == 5 and not job["transient"], job
