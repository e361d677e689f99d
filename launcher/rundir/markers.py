"""The markers: small JSON files in RUN_DIR/markers/, one per thing a rank or job did (a rank started, a
rank ended and why, the ranks stopped for a requeue), and the reason words they carry. Their names, the
writer, the readers, the reason words and the reason of an exception are defined here; the ranks write
them, and the batch script (the names are rendered into it from here), `launcher run` and
`launcher status` read them. Stdlib only at import.

Names: KIND-JOB-aATTEMPT-rankR.json for what one rank did (start, exit, fault), KIND-JOB-aATTEMPT.json
for what the job's ranks did together (requeue). JOB and ATTEMPT are launcher.identity's job_key and
attempt.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_HANG, EXIT_OK, EXIT_OOM, EXIT_REQUEUE,
                             UserError)
from launcher.rundir.layout import RunDir

# --------------------------------------------------------------------------- names

START = "start"  # a rank began (written before training)
EXIT = "exit"  # a rank ended, with its reason and exit code (none: the rank was killed)
REQUEUE = "requeue"  # global rank 0: every rank stopped after a complete checkpoint; requeue the job
FAULT = "fault"  # test-only: where and when an injected fault struck
SUFFIX = ".json"
RANK_PART = "-rank"  # between the attempt and the rank number
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def attempt_part(job: str, attempt: int | str) -> str:
    """JOB-aATTEMPT, the part every marker of one attempt shares. Strings pass through as they are:
    the batch script renders it with shell variables ("$LAUNCHER_JOB_ID", "$LAUNCHER_ATTEMPT")."""
    return f"{job}-a{attempt}"


def marker_name(kind: str, job: str, attempt: int | str, rank: int | str | None = None) -> str:
    """KIND-JOB-aATTEMPT, with -rankR for a rank's own marker (no suffix)."""
    base = f"{kind}-{attempt_part(job, attempt)}"
    return base if rank is None else f"{base}{RANK_PART}{rank}"


def rank_glob(kind: str, job: str, attempt: int | str) -> str:
    """The file pattern of every rank's KIND marker of one attempt: KIND-JOB-aATTEMPT-rank*.json."""
    return f"{marker_name(kind, job, attempt)}{RANK_PART}*{SUFFIX}"


def own_name(kind: str, who: identity.JobEnv | None = None) -> str:
    """This process's marker of `kind`: per rank, but REQUEUE, which is the attempt's."""
    who = identity.current() if who is None else who
    return marker_name(kind, who.job_key, who.attempt, None if kind == REQUEUE else who.rank)


def _dir(run_dir: str | os.PathLike[str]) -> Path:
    return RunDir(Path(run_dir)).markers


# --------------------------------------------------------------------------- reason words

COMPLETED = "completed"
REQUEUED = "requeue"  # stopped on a signal after a complete checkpoint
OOM = "oom"
HANG = "hang"  # the hang watchdog ended the rank
COLLECTIVE_TIMEOUT = "collective_timeout"  # a collective failed: another rank died or hung
BAD_INPUT = "bad_input"
FAILED = "failed"
INTERRUPTED = "interrupted"  # KeyboardInterrupt or SystemExit (the manifest's attempt; no marker)
# torch's line when NCCL's C++ watchdog finds a collective past its timeout (ProcessGroupNCCL); it then
# aborts the process (SIGABRT), so the rank writes no exit marker and only its log says why.
NCCL_WATCHDOG_LINE = "Watchdog caught collective operation timeout"
REASONS = (COMPLETED, REQUEUED, OOM, HANG, COLLECTIVE_TIMEOUT, BAD_INPUT, FAILED, INTERRUPTED)

# The exit code of `launcher train` that goes with each reason a marker carries.
EXIT_CODES = {COMPLETED: EXIT_OK, REQUEUED: EXIT_REQUEUE, OOM: EXIT_OOM, HANG: EXIT_HANG,
              COLLECTIVE_TIMEOUT: EXIT_FAILED, BAD_INPUT: EXIT_BAD_INPUT, FAILED: EXIT_FAILED}


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, Python's MemoryError, or the CPU allocator's failure."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


_COLLECTIVE = re.compile(r"Connection closed by peer|Connection reset by peer|Timed out|timeout|"
                         r"ProcessGroup(Gloo|NCCL)|\bgloo\b|\bNCCL\b|c10d", re.I)


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's DistError, or a RuntimeError that names the process group or a timeout."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE.search(f"{type(exc).__name__}: {exc}"))


def exit_reason(exc: BaseException) -> str:
    """The reason word for a process that ended with `exc` (the markers' and the manifest's)."""
    if isinstance(exc, UserError):
        return BAD_INPUT
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return INTERRUPTED
    if is_oom(exc):
        return OOM
    if is_collective_failure(exc):
        return COLLECTIVE_TIMEOUT
    return FAILED


# --------------------------------------------------------------------------- writer

def write_marker(run_dir: str | os.PathLike[str], name: str, /, **fields: Any) -> Path:
    """RUN_DIR/markers/NAME.json, written atomically, with who wrote it (job, attempt as "restart",
    rank, node, host, pid, time) and `fields`. Keys in a fixed order, one line: the batch script
    reads "node", "rank", "reason", "step" and "exit_code" with sed."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"marker name {name!r}: use letters, digits, '.', '_' and '-'")
    who = identity.current()
    record = {"name": name, "job_id": who.job_key, "restart": who.attempt, "rank": who.rank, "node": who.node,
              "host": who.hostname, "pid": os.getpid(), "time": time.time(), **fields}
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}{SUFFIX}"
    tmp = d / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_own(run_dir: str | os.PathLike[str], kind: str, /, **fields: Any) -> Path:
    """This process's marker of `kind` (own_name); `fields` may have a "kind" of their own."""
    return write_marker(run_dir, own_name(kind), **fields)


def write_exit(run_dir: str | os.PathLike[str], reason: str, code: int, message: str = "", **extra: Any) -> None:
    """This process's exit marker: its reason, exit code and message. A marker that cannot be written never
    fails the exit it records."""
    try:
        write_own(run_dir, EXIT, reason=reason, exit_code=code, message=message[:2000], **extra)
    except OSError:
        pass


# --------------------------------------------------------------------------- readers

def _read(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_marker(run_dir: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """One marker, or None when it is missing or unreadable."""
    return _read(_dir(run_dir) / f"{name}{SUFFIX}")


def read_markers(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every readable marker of a run, oldest first."""
    d = _dir(run_dir)
    found = (_read(p) for p in sorted(d.glob(f"*{SUFFIX}"))) if d.is_dir() else ()
    return sorted((rec for rec in found if rec is not None), key=lambda r: r.get("time") or 0)


def _rank_of(path: Path) -> str:
    return path.name[path.name.rindex(RANK_PART) + len(RANK_PART):-len(SUFFIX)]


def rank_markers(run_dir: str | os.PathLike[str], kind: str, job: str, attempt: int) -> dict[str, dict[str, Any]]:
    """Every rank's KIND marker of one attempt, by rank (as written in the name), in file name order;
    an unreadable one as {}."""
    d = _dir(run_dir)
    paths = sorted(d.glob(rank_glob(kind, job, attempt))) if d.is_dir() else []
    return {_rank_of(p): _read(p) or {} for p in paths}


def silent_ranks(run_dir: str | os.PathLike[str], job: str, attempt: int) -> list[dict[str, Any]]:
    """Start markers of this attempt whose rank wrote no exit marker: ranks that were killed (SIGKILL,
    out-of-memory killer, a node that died), as {rank, node}."""
    ended = rank_markers(run_dir, EXIT, job, attempt)
    out = [{"rank": int(r) if r.isdigit() else r, "node": rec.get("node", "?")}
           for r, rec in rank_markers(run_dir, START, job, attempt).items() if r not in ended]
    return sorted(out, key=lambda x: str(x["rank"]).zfill(8))
