"""Who this process is in its job: global and local rank, world size, node, job key and attempt, read
from the environment in one place. Stdlib only: the ranks, the marker writer and `launcher doctor`'s
probe on each node all read it.

Where each value comes from:
  rank, local_rank, world_size   RANK, LOCAL_RANK, WORLD_SIZE (torchrun sets them; with `launcher: srun`
                                 the batch script exports them from Slurm's task ids); 0, 0, 1 outside
  node                           SLURMD_NODENAME (in a job every node may share one hostname), else the
                                 hostname
  job_key                        LAUNCHER_JOB_ID (the batch script: JOBID or ARRAYJOB_TASK; `launcher run`:
                                 local-PID), else SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID, else SLURM_JOB_ID,
                                 else "local"
  attempt                        LAUNCHER_ATTEMPT, else SLURM_RESTART_COUNT, else 0: 0 first, then one
                                 more per requeue or retry
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class JobEnv:
    """This process in its job. `current()` reads it from the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node: str = ""
    hostname: str = ""
    job_key: str = "local"
    attempt: int = 0


def _int(raw: str | None, default: int) -> int:
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() else default


def job_key(env: Mapping[str, str]) -> str:
    """The job (attempt family) that markers and manifest attempts belong to."""
    if env.get("LAUNCHER_JOB_ID"):
        return env["LAUNCHER_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "local"


def current(env: Mapping[str, str] | None = None) -> JobEnv:
    """This process as the environment (os.environ, or `env`) says now. Read on every call: the values
    are set before the process starts, and tests change them between calls."""
    env = os.environ if env is None else env
    hostname = socket.gethostname()
    return JobEnv(rank=_int(env.get("RANK"), 0), local_rank=_int(env.get("LOCAL_RANK"), 0),
                  world_size=_int(env.get("WORLD_SIZE"), 1), node=env.get("SLURMD_NODENAME") or hostname,
                  hostname=hostname, job_key=job_key(env),
                  attempt=_int(env.get("LAUNCHER_ATTEMPT") or env.get("SLURM_RESTART_COUNT"), 0))


def rank() -> int:
    """This process's global rank (0 outside a distributed run)."""
    return current().rank
