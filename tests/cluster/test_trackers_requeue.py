"""Experiment trackers across a preemption on the real lab Slurm cluster: one tracker run, every step once.

A real MLflow tracking server (`mlflow server`, SQLite backend) runs on this machine, bound to the lab's
bridge address, which the nodes (in their own network namespaces) reach. One job (one node, one rank, tiny
Llama, full fine-tuning, ZeRO-2, fp32 on CPU) logs to MLflow and to wandb in offline mode (no network: the
runs stay in the run dir). Once its log shows step 2, `scancel --signal=USR1` preempts it: the ranks save,
the batch script requeues, the test releases Slurm's requeue hold, the second attempt resumes and ends at
max_steps. Then:

- the MLflow server holds exactly one run for the job, with each step's loss once and in order (the same
  numbers as the run's metrics.jsonl), the job id and both attempts as tags, the spec as params, and the
  run's cost as `launcher cost` reports it;
- the wandb offline files (read with wandb's own protobuf records) hold one run id over the two attempts'
  folders, and no step twice; `launcher sync --dry-run` uploads both into that id.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_preemption import ROOT, log_of, steps_of, submit, watch  # the same path

from launcher.testing.faults import FAULT_ENV

MAX_STEPS = 8
PLANTED = {"WANDB_API_KEY": "planted0wandb0key0" + "7" * 22, "MLFLOW_TRACKING_TOKEN": "planted0mlflow0token0x9"}
EXPERIMENT = "launcher-trackers-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(slurm_lab, tmp_path_factory):
    """`mlflow server` with a SQLite backend on a free port of this machine (all interfaces: the nodes reach it
    at the lab bridge's address); stopped (its whole process group) at the end."""
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "0.0.0.0",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.5)
        yield {"local": f"http://127.0.0.1:{port}", "nodes": f"http://{slurm_lab.BRIDGE_ADDR}:{port}"}
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(scope="module")
def preempted(slurm_lab, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    spec = {"data": {"seq_len": 64}, "optim": {"max_steps": MAX_STEPS, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 2},
            "precision": "fp32", "zero": {"stage": 2},
            "output": {"log_every": 1, "trackers": ["tensorboard", "wandb", "mlflow"],
                       "wandb": {"mode": "offline", "project": "launcher-test"},
                       "mlflow": {"tracking_uri": mlflow_server["nodes"], "experiment": EXPERIMENT}},
            "cluster": {"gpus_per_node": 0, "time": "15", "partition": "debug", "nodes": 1, "nproc_per_node": 1,
                        "prep": {"cpus": 1}, "net_ifname": "eth0", "max_requeues": 2, "usd_per_node_hour": 1.0}}
    t0 = time.monotonic()
    # offline wandb never needs the network; an unroutable server makes sure nothing is sent
    # planted keys: the trackers read them from the environment and nothing in the run dir may hold them
    # The preemption: USR1 at the end of step 2 of the first attempt, sent by the rank to itself (the test-only
    # fault), so that it lands mid-run however fast the steps go (a scancel timed from the log can come after
    # the last of 8 quick steps, and then nothing is requeued).
    job, run_dir = submit(slurm_lab, tmp, "tracked", spec, WANDB_BASE_URL="http://127.0.0.1:9",
                          WANDB_API_KEY=PLANTED["WANDB_API_KEY"], MLFLOW_TRACKING_TOKEN=PLANTED["MLFLOW_TRACKING_TOKEN"],
                          **{FAULT_ENV: "signal:rank=0:step=2:attempt=0"})
    state, restarts = watch(slurm_lab, job)
    return {"job": job, "run_dir": run_dir, "state": state, "restarts": restarts, "log": log_of(run_dir),
            "seconds": time.monotonic() - t0}


def test_requeued_job_completed_every_step_once(preempted):
    assert preempted["state"] == "COMPLETED", preempted["log"][-4000:]
    assert preempted["restarts"] >= 1
    assert steps_of(preempted["log"]) == list(range(1, MAX_STEPS + 1)), preempted["log"][-4000:]
    assert "tracker could not" not in preempted["log"], preempted["log"][-4000:]


def test_mlflow_server_holds_one_run_with_every_step_once_in_order_and_the_job_and_attempts(preempted, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server["local"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id])  # exactly one run for both attempts
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    recorded = [json.loads(x) for x in (preempted["run_dir"] / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in recorded if "loss" in r}
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    job, tags = preempted["job"], run.data.tags
    assert tags["slurm_job_id"] == job and tags["job_id"] == job and tags["attempt"] == "1"
    first, second = json.loads(tags[f"attempt.{job}.0"]), json.loads(tags[f"attempt.{job}.1"])
    assert first["attempt"] == "0" and second["attempt"] == "1" and first["nodes"].startswith("node")
    assert run.data.params["spec.output.mlflow.experiment"] == EXPERIMENT and run.data.params["plan.world_size"] == "1"
    assert run.info.status == "FINISHED"
    assert run.data.metrics.get("cost/cpu_node_hours", 0) > 0 and "cost/usd" in run.data.metrics
    kept = json.loads((preempted["run_dir"] / "trackers.json").read_text())["mlflow"]
    assert kept["run_id"] == run.info.run_id and kept["last_step"] == MAX_STEPS


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (wandb's transaction log: a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def test_wandb_offline_files_hold_one_run_id_and_no_step_twice(preempted, slurm_lab):
    run_dir = preempted["run_dir"]
    kept = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    folders = sorted((run_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders  # one per attempt
    ids, steps = set(), []
    for folder in folders:
        [f] = folder.glob("run-*.wandb")
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "history" and any(item.nested_key == ["loss"] or item.key == "loss" for item in rec.history.item):
                steps.append(rec.history.step.num)
    assert ids == {kept["run_id"]}
    assert len(steps) == len(set(steps)) and sorted(steps) == list(range(1, MAX_STEPS + 1)), steps
    # `launcher sync` would upload both attempts, in order, into that one run id
    env = slurm_lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    cp = subprocess.run([sys.executable, "-m", "launcher", "sync", str(run_dir), "--dry-run"], cwd=ROOT, env=env,
                        text=True, capture_output=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert f"--id {kept['run_id']}" in cp.stdout and all(str(f) in cp.stdout for f in folders)


def test_no_api_key_is_written_into_the_run_dir(preempted):
    for path in preempted["run_dir"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, value in PLANTED.items():
                assert value.encode() not in data, f"{name} written into {path}"
