"""The markers (names, writer, readers, reason words, the reason of an exception) and who a process is in
its job (launcher.identity)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher import identity
from launcher.errors import UserError
from launcher.rundir import markers


@pytest.fixture
def job(monkeypatch):
    for k in ("LAUNCHER_JOB_ID", "LAUNCHER_ATTEMPT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID",
              "SLURM_RESTART_COUNT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURMD_NODENAME"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_identity_reads_rank_node_job_and_attempt_from_the_environment(job):
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "SLURMD_NODENAME": "node2", "SLURM_JOB_ID": "70",
           "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "2"}
    who = identity.current(env)
    assert (who.rank, who.local_rank, who.world_size, who.node, who.job_key, who.attempt) == (3, 1, 4, "node2", "70_1", 2)
    # the batch script's own names win over Slurm's
    who = identity.current({**env, "LAUNCHER_JOB_ID": "70_1", "LAUNCHER_ATTEMPT": "0"})
    assert (who.job_key, who.attempt) == ("70_1", 0)
    assert identity.current({"SLURM_JOB_ID": "12"}).job_key == "12"
    plain = identity.current({})
    assert (plain.rank, plain.world_size, plain.job_key, plain.attempt, plain.node) == (0, 1, "local", 0, plain.hostname)
    with pytest.raises(AttributeError):
        plain.rank = 1  # frozen
    job.setenv("RANK", "5")
    assert identity.rank() == 5 and identity.current().rank == 5


def test_marker_names_and_the_patterns_the_batch_script_uses(job):
    assert markers.marker_name(markers.EXIT, "90", 1, 3) == "exit-90-a1-rank3"
    assert markers.marker_name(markers.REQUEUE, "90", 0) == "requeue-90-a0"
    assert markers.rank_glob(markers.START, "70_1", 2) == "start-70_1-a2-rank*.json"
    assert markers.attempt_part("$LAUNCHER_JOB_ID", "$LAUNCHER_ATTEMPT") == "$LAUNCHER_JOB_ID-a$LAUNCHER_ATTEMPT"
    job.setenv("LAUNCHER_JOB_ID", "local-7")
    job.setenv("RANK", "1")
    assert markers.own_name(markers.START) == "start-local-7-a0-rank1"
    assert markers.own_name(markers.REQUEUE) == "requeue-local-7-a0"  # the attempt's, not a rank's


def test_markers_round_trip_and_silent_ranks(tmp_path, job):
    job.setenv("LAUNCHER_JOB_ID", "90")
    job.setenv("LAUNCHER_ATTEMPT", "1")
    job.setenv("SLURMD_NODENAME", "node2")
    for r in ("0", "1", "2"):
        job.setenv("RANK", r)
        markers.write_own(tmp_path, markers.START)
    job.setenv("RANK", "1")
    path = markers.write_own(tmp_path, markers.EXIT, reason=markers.OOM, exit_code=5, message="out of memory")
    assert path == tmp_path / "markers" / "exit-90-a1-rank1.json"
    # one line, keys the batch script reads with sed
    assert path.read_text().count("\n") == 1 and '"node": "node2"' in path.read_text()
    rec = markers.read_marker(tmp_path, "exit-90-a1-rank1")
    assert (rec["job_id"], rec["restart"], rec["rank"], rec["reason"], rec["exit_code"]) == ("90", 1, 1, "oom", 5)
    assert list(markers.rank_markers(tmp_path, markers.EXIT, "90", 1)) == ["1"]
    assert markers.silent_ranks(tmp_path, "90", 1) == [{"rank": 0, "node": "node2"}, {"rank": 2, "node": "node2"}]
    assert markers.silent_ranks(tmp_path, "90", 0) == []
    assert [m["name"] for m in markers.read_markers(tmp_path)][-1] == "exit-90-a1-rank1"  # oldest first
    assert markers.read_marker(tmp_path, "exit-90-a0-rank1") is None
    fault = markers.write_own(tmp_path, markers.FAULT, kind="stall", step=3)  # a field named like the argument
    assert markers.read_marker(tmp_path, fault.stem)["kind"] == "stall"
    assert markers.read_markers(tmp_path / "nowhere") == []
    with pytest.raises(ValueError):
        markers.write_marker(tmp_path, "../escape", reason="oom")


def test_the_reason_of_an_exception():
    assert markers.exit_reason(UserError("x")) == markers.BAD_INPUT == "bad_input"
    assert markers.exit_reason(MemoryError()) == markers.OOM == "oom"
    import torch  # the exception the ranks really meet (the oom test fault raises it too)

    assert markers.exit_reason(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert markers.exit_reason(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB")) == "oom"
    assert markers.exit_reason(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")) == \
        markers.COLLECTIVE_TIMEOUT
    assert markers.exit_reason(ValueError("Timed out")) == markers.FAILED  # only a RuntimeError names a collective
    assert markers.exit_reason(KeyboardInterrupt()) == markers.exit_reason(SystemExit(1)) == markers.INTERRUPTED
    assert markers.exit_reason(ValueError("x")) == "failed"
    assert set(markers.EXIT_CODES) < set(markers.REASONS)
    assert (markers.EXIT_CODES[markers.OOM], markers.EXIT_CODES[markers.HANG], markers.EXIT_CODES[markers.REQUEUED]) == (5, 4, 3)


def test_the_production_path_never_imports_the_test_faults():
    code = ("import os, sys\n"
            "[os.environ.pop(k) for k in list(os.environ) if k.startswith('LAUNCHER_TEST_')]\n"
            "from launcher.commands import train_cmds\n"
            "from launcher.rank import checkpoint, entry, loop, records, stop, watchdog\n"
            "assert loop._testing() is None\n"
            "assert not any(m.startswith('launcher.testing') for m in sys.modules), 'imported'\n"
            "from launcher.testing import faults\n"
            "assert all(k.startswith(loop.TEST_ONLY_PREFIX) for k in faults.TEST_ONLY_ENV)\n"
            "os.environ[faults.FAULT_ENV] = 'kill:rank=1:step=3'\n"
            "assert loop._testing() is faults\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
