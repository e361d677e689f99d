"""RUN_DIR/jobs.jsonl: one JSON line per submission or attempt of a run's jobs (job id, kind, time,
reason and any extra fields), appended by `launcher slurm --submit`, `launcher run`, the bench and the
batch script's requeue (which writes the same keys with printf, script_line_format, and counts its own
lines with grep). Requeues and retries are counted here, not from SLURM_RESTART_COUNT.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from launcher.rundir import damage
from launcher.rundir.layout import RunDir

# Kinds of the lines the batch script appends when the job requeues itself.
REQUEUE = "requeue"  # after a preemption or time-limit signal and a complete checkpoint
RETRY = "retry"  # after a transient failure


# The batch script appends its requeue and retry lines in shell (printf): these keys in this order, job_id,
# kind and task first, so that one fixed-string grep counts a job's lines of one kind.
SCRIPT_KEYS = ("job_id", "kind", "task", "time", "attempt", "reason")
_SCRIPT_NUMBERS = ("time", "attempt")


def script_line_format() -> str:
    """printf's format of the batch script's line; its arguments are SCRIPT_KEYS' values in order."""
    fields = (f'"{k}": %s' if k in _SCRIPT_NUMBERS else f'"{k}": "%s"' for k in SCRIPT_KEYS)
    return "{" + ", ".join(fields) + "}\\n"


def script_line_prefix(job_id: str, kind: str, task: str) -> str:
    """How a batch-script line of this job, kind and array task begins (for grep -F)."""
    return "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(SCRIPT_KEYS, (job_id, kind, task))) + ","


def record_job(run_dir: str | os.PathLike, job_id: str, kind: str, reason: str = "", **extra: Any) -> None:
    """Append one line: {"job_id", "kind", "time", "reason", **extra}."""
    line = {"job_id": str(job_id), "kind": kind, "time": time.time(), "reason": reason, **extra}
    with RunDir(Path(run_dir)).jobs_path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def read_jobs(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line, in the order written; blank lines skipped. A line that is not a JSON object with a job id
    (written by hand, cut off, binary) is said on stderr with its number and skipped."""
    path = RunDir(Path(run_dir)).jobs_path
    try:
        if not path.exists():
            return []
        raw = path.read_bytes()
    except OSError as exc:
        damage.skipped(path, damage.describe(exc))
        return []
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            damage.skipped(path, f"not a JSON line ({damage.describe(exc)})", n)
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("job_id"), (str, int)) or isinstance(
                rec.get("job_id"), bool):
            damage.skipped(path, "not a job record (a JSON object with a job_id)", n)
            continue
        out.append(rec)
    return out


class RecordedJob(NamedTuple):
    job_id: str
    kind: str  # the kind of its first line (train, prep, merge, eval, bench, local)
    lines: list[dict[str, Any]]  # every line of this job id, requeues and retries included


def recorded_jobs(run_dir: str | os.PathLike) -> list[RecordedJob]:
    """Each job id once, in submission order, with its kind and lines."""
    seen: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for rec in read_jobs(run_dir):
        jid = str(rec.get("job_id", "")).strip()
        if not jid:
            continue
        if jid not in seen:
            seen[jid] = (str(rec.get("kind") or "job"), [])
        seen[jid][1].append(rec)
    return [RecordedJob(j, k, recs) for j, (k, recs) in seen.items()]


def job_ids(run_dir: str | os.PathLike) -> list[str]:
    """The recorded job ids, in submission order."""
    return [j.job_id for j in recorded_jobs(run_dir)]


def lines_of_task(lines: list[dict[str, Any]], kind: str, task: str) -> list[dict[str, Any]]:
    """A job's lines that belong to array task `task` ("" for a plain job): the job's own submission
    lines (of `kind`) and the lines written for that task or for no task."""
    return [r for r in lines if not task or str(r.get("task", "")) in ("", task) or r.get("kind") == kind]


def count_kind(lines: list[dict[str, Any]], kind: str, task: str = "") -> int:
    """How many of a job's lines are of `kind` (REQUEUE, RETRY) for array task `task` or for no task."""
    return sum(1 for r in lines if r.get("kind") == kind and str(r.get("task", "")) in ("", task))
