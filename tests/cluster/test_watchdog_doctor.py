"""The hang watchdog and `launcher doctor` on the real lab Slurm cluster.

- watchdog: a 2-node job (one torchrun rank per node, tiny Llama, ZeRO-2 on CPU over gloo) whose rank 1
  (on node2) stalls in Python after step 2 (test fault `stall`) with cluster.hang_timeout_s=15: the job
  ends (no retry budget) long before its time limit, the job log holds the watchdog's line and the
  stalled rank's stack down to the stall site, and `launcher status RUN_DIR --json` says hang.
- doctor: `launcher doctor --cluster lab` (a profile whose default partition is the lab's) probes both
  nodes through srun, finds the versions equal, the output dir shared and `eth0` as the interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 15
SPEC = {"data": {"seq_len": 64}, "optim": {"max_steps": 8, "micro_batch": 2}, "precision": "fp32",
        "zero": {"stage": 2}, "output": {"log_every": 1},
        "cluster": {"gpus_per_node": 0, "time": "15", "partition": "debug", "nodes": 2, "nproc_per_node": 1,
                    "net_ifname": "eth0", "hang_timeout_s": HANG_S, "max_retries": 0,
                    "prep": {"cpus": 1}}}


def launcher(lab, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    full.pop("LAUNCHER_TEST_FAULT", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=full, text=True,
                          capture_output=True, timeout=timeout)


def log_of(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def test_stalled_rank_ends_the_job_with_its_stack_in_the_log_and_status_says_hang(slurm_lab, tmp_path):
    spec_file = tmp_path / "stall.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    run_dir = tmp_path / "stall"
    cp = launcher(slurm_lab, "slurm", str(spec_file), "--name", "stall", "--out", str(run_dir), "--submit",
                  env={"LAUNCHER_CACHE": str(tmp_path / "cache"), "LAUNCHER_TEST_FAULT": "stall:rank=1:step=2"})
    assert cp.returncode == 0, cp.stderr
    job = cp.stdout.strip().splitlines()[-1]
    t0 = time.monotonic()
    state = slurm_lab.wait_job(job, timeout=420)
    log = log_of(run_dir)
    assert state == "FAILED", f"{state}\n{log[-4000:]}"
    # the watchdog, not the time limit (15 min) nor the collective timeout (30 min default), ended it
    assert time.monotonic() - t0 < 400
    markers = run_dir / "markers"
    [fault] = [json.loads(p.read_text()) for p in markers.glob(f"fault-{job}-a0-rank1.json")]
    [hung] = [json.loads(p.read_text()) for p in markers.glob(f"exit-{job}-a0-rank1.json")]
    assert fault["kind"] == "stall" and fault["node"] == "node2"
    assert hung["reason"] == "hang" and hung["exit_code"] == 4 and hung["node"] == "node2"
    assert 0 < hung["time"] - fault["time"] <= HANG_S + 15
    # the log: the watchdog's line naming rank and node, and the stalled rank's stack down to the stall
    assert "launcher: rank 1 on node2 made no progress for" in log, log[-4000:]
    assert "stacks of every thread follow" in log and "in _stall_forever" in log and "in inject_step_faults" in log
    assert "launcher: rank 1 on node2: hang (exit 4)" in log  # the batch script's summary from the marker
    # launcher status classifies it as a hang, by the watchdog
    st = launcher(slurm_lab, "status", "--json", str(run_dir))
    assert st.returncode == 0, st.stderr
    [status] = [j for j in json.loads(st.stdout)[0]["jobs"] if j["job_id"] == job]  # (a prep job runs first)
    assert status["reason"] == "hang" and status["detail"].startswith("hang (watchdog)"), status
    assert "rank 1 on node2 made no progress" in (status["log_line"] or "") and status["transient"] is True


def test_doctor_reports_both_nodes_a_shared_dir_and_eth0(slurm_lab, tmp_path):
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text(yaml.safe_dump({"lab": {"default_partition": "debug", "net_ifname": "eth0",
                                                "partitions": {"debug": {"gpus_per_node": 0, "max_nodes": 2}}}}))
    out = tmp_path / "runs"
    cp = launcher(slurm_lab, "doctor", "--cluster", "lab", "--clusters", str(clusters), "--nodes", "2",
                  "--out", str(out), "--json", "--timeout", "240")
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
    report = json.loads(cp.stdout)
    assert report["ok"] and report["mode"] == "srun" and report["partition"] == "debug", report["problems"]
    assert sorted(n["node"] for n in report["nodes"]) == ["node1", "node2"]
    assert report["shared"] is True and report["net_ifname"] == "eth0"
    by_node = {n["node"]: n for n in report["nodes"]}
    assert by_node["node1"]["net"]["local_address"] == "10.77.0.11"
    assert by_node["node2"]["net"]["local_address"] == "10.77.0.12"
    for n in report["nodes"]:
        assert n["packages"]["torch"] and n["bitsandbytes_cuda"] == "no CUDA"
        assert n["disk_free_bytes"] > 0 and n["shared"]["seen"] == {"0": "node1", "1": "node2"}
    assert not list(out.glob(".launcher-doctor-*"))  # its token folder is removed
    # the table says the same
    text = launcher(slurm_lab, "doctor", "--partition", "debug", "--nodes", "2", "--out", str(out), "--timeout", "240")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "node1" in text.stdout and "node2" in text.stdout and "ok: versions agree, the output dir is shared; " \
        "network interface eth0" in text.stdout
