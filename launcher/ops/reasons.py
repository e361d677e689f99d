"""Why a job ended, in words: the status words `launcher status` and `cost` show, which of them a retry
may cure, what each marker reason and exit code of `launcher train` means, the signs a log shows (out of
memory, a hang, a collective timeout, a lost node, ...), and `classify`, which weighs Slurm's state and
exit code, the ranks' markers and the log into one reason."""

from __future__ import annotations

import re
from typing import Any

from launcher.errors import EXIT_BAD_INPUT, EXIT_HANG, EXIT_OOM, EXIT_REQUEUE
from launcher.ops.logs import one_label, strip_labels
from launcher.rundir import markers as marker_file

COMPLETED = "completed"
OUT_OF_MEMORY = "out of memory"
COLLECTIVE_TIMEOUT = "collective timeout"
HANG = "hang"
NODE_FAILURE = "node failure"
TIME_LIMIT = "time limit"
PREEMPTED_REQUEUED = "preempted and requeued"
PREEMPTED = "preempted"
CANCELLED = "cancelled"
FAILED = "failed"
BAD_INPUT = "bad input"

# Reasons a retry may cure; the others would repeat.
TRANSIENT = frozenset({NODE_FAILURE, COLLECTIVE_TIMEOUT, HANG, PREEMPTED, PREEMPTED_REQUEUED})

# Exit codes of `launcher train` (README "Exit codes", launcher/errors.py).
EXIT_REASONS = {EXIT_BAD_INPUT: BAD_INPUT, EXIT_REQUEUE: PREEMPTED, EXIT_HANG: HANG, EXIT_OOM: OUT_OF_MEMORY}

# Marker `reason` values (launcher/rundir/markers.py writes the first of each), and what they mean here;
# the other spellings are read too.
MARKER_REASONS = {
    marker_file.COMPLETED: COMPLETED, marker_file.OOM: OUT_OF_MEMORY, "out_of_memory": OUT_OF_MEMORY,
    marker_file.HANG: HANG, marker_file.COLLECTIVE_TIMEOUT: COLLECTIVE_TIMEOUT, "nccl_timeout": COLLECTIVE_TIMEOUT,
    "node_failure": NODE_FAILURE, "time_limit": TIME_LIMIT, "preempted": PREEMPTED, marker_file.REQUEUED: PREEMPTED,
    "cancelled": CANCELLED, marker_file.FAILED: FAILED, marker_file.BAD_INPUT: BAD_INPUT,
}

# The first line of the hang watchdog's faulthandler backstop dump (faulthandler's own words), as a log
# shows it: a rank stuck in C code holding the GIL leaves no marker, only this.
BACKSTOP_DUMP = re.compile(r"(?:^|\n)Timeout \(\d+:\d\d:\d\d(?:\.\d+)?\)!")

# What a log says, most specific first. Each: (reason, pattern).
LOG_SIGNS: list[tuple[str, re.Pattern[str]]] = [
    (OUT_OF_MEMORY, re.compile(r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|"
                               r"DefaultCPUAllocator: can't allocate memory|oom[-_]kill|"
                               r"Killed process \d+ .*out of memory|Detected \d+ oom[-_]kill|"
                               r"MemoryError\b", re.I)),
    # the watchdog's line, or the first line of its faulthandler backstop's dump (a hang holding the GIL)
    (HANG, re.compile(r"launcher: (?:watchdog|hang)|hang detected|no progress for \d+|" + BACKSTOP_DUMP.pattern, re.I)),
    (COLLECTIVE_TIMEOUT, re.compile(re.escape(marker_file.NCCL_WATCHDOG_LINE) + r"|collective operation timeout|"
                                    r"ProcessGroupNCCL.{0,200}?(?:taking the entire process down|watchdog thread "
                                    r"terminated)|"
                                    r"(?:NCCL|gloo|c10d|ProcessGroup\w*|DistBackendError).{0,200}?timed out|"
                                    r"Timed out waiting \d+ ?ms for (?:recv|send)|Timeout\(ms\)=\d+\) ran for", re.I)),
    (NODE_FAILURE, re.compile(r"Node failure on|NODE_FAIL|DUE TO NODE FAILURE|Node \S+ not responding", re.I)),
    (TIME_LIMIT, re.compile(r"DUE TO TIME LIMIT")),
    (PREEMPTED, re.compile(r"DUE TO PREEMPTION")),
    (PREEMPTED_REQUEUED, re.compile(r"DUE TO JOB REQUEUE")),
]
# Exception lines of a Python traceback; wrappers that only say "a child failed" come last.
_EXCEPTION = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Z][\w]*(?:Error|Exception|Exit|"
                        r"Interrupt|Failure|Warning)\b(?::.*)?)$")
_WRAPPERS = re.compile(r"ChildFailedError|SignalException|CalledProcessError|SystemExit|UserWarning|FutureWarning|"
                       r"DeprecationWarning|RuntimeWarning")
_ERROR_LINE = re.compile(r"^(?:error|fatal|ERROR|FATAL)\b[:\s].*|"
                         r"^(?:srun|slurmstepd)(?:-\S+)?: error: .*", re.I)
_NOISE = re.compile(r"bitsandbytes.*kernels|kernels-community|kernels.*not installed|launcher: batch shell got|"
                    r"launcher: job step ended|^\s*$|^\s*warnings\.warn", re.I)
# The batch script's summary of each failed rank, from the ranks' markers (slurm/job.sbatch.j2).
_RANK_SUMMARY = re.compile(r"^launcher: rank \d+ on \S+: .*|^launcher: rank \d+ on \S+ ended without an exit record")


def _clip(line: str, n: int = 300) -> str:
    line = line.strip()
    return line if len(line) <= n else line[: n - 3] + "..."


def _unlabeled(text: str) -> list[tuple[str, str]]:
    """The log's lines without the known noise, each as (the line without its rank labels ("[rank1]:",
    "1: "), for matching; the line as written)."""
    pairs = ((strip_labels(raw.rstrip()), raw) for raw in text.splitlines())
    return [(bare, raw) for bare, raw in pairs if not _NOISE.search(bare)]


def _shown(line: str) -> str:
    """A log line to show: its first label only ("[rank1]: ValueError: ..."), clipped."""
    return _clip(one_label(line.strip()))


def why_line(text: str) -> str | None:
    """The log line that best says why a job ended: a known sign (out of memory, collective
    timeout, ...), else the last real exception of a traceback, else the last error line."""
    lines = _unlabeled(text)
    for _, pattern in LOG_SIGNS:
        for bare, raw in reversed(lines):
            if pattern.search(bare) and not bare.lstrip().startswith(("File ", "raise ", "^")):
                return _shown(raw)
    ranks = [raw for bare, raw in lines if _RANK_SUMMARY.match(bare.strip())]
    if ranks:
        return _shown(ranks[0])
    exc = [(bare, raw) for bare, raw in lines if _EXCEPTION.match(bare.strip())]
    real = [raw for bare, raw in exc if not _WRAPPERS.search(bare)]
    if real or exc:
        return _shown((real or [raw for _, raw in exc])[-1])
    errors = [(bare, raw) for bare, raw in lines if _ERROR_LINE.match(bare.strip())]
    if errors:
        specific = [raw for bare, raw in errors if not re.match(r"^(srun|slurmstepd)", bare.strip())]
        return _shown((specific or [raw for _, raw in errors])[-1])
    return None


def log_signs(text: str) -> str | None:
    """The most specific reason a log shows, if any."""
    body = "\n".join(bare for bare, _ in _unlabeled(text) if not bare.lstrip().startswith(("File ", "raise ")))
    for reason, pattern in LOG_SIGNS:
        if pattern.search(body):
            return reason
    return None


def classify(state: str, exit_code: int | None = None, signal: int | None = None, log: str = "",
             marker: dict[str, Any] | None = None, requeued_after: bool = False) -> tuple[str, str | None]:
    """(reason, the log line that says why) for an ended attempt.

    state: Slurm's state word (COMPLETED, FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY,
    PREEMPTED, REQUEUED, ...); requeued_after: a later attempt of the same job exists."""
    line = why_line(log) if log else None
    if marker and marker.get("reason"):
        reason = MARKER_REASONS.get(str(marker["reason"]), str(marker["reason"]))
        if reason == PREEMPTED and requeued_after:
            reason = PREEMPTED_REQUEUED
        seen = log_signs(log) if reason == COLLECTIVE_TIMEOUT and log else None
        if seen in (OUT_OF_MEMORY, HANG):
            return seen, line  # the marker's failed collective echoes a rank that died without one
        return reason, marker.get("message") or line
    if state == "COMPLETED" and not exit_code:
        return COMPLETED, None
    if state == "OUT_OF_MEMORY":
        return OUT_OF_MEMORY, line
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return NODE_FAILURE, line
    if state in ("TIMEOUT", "DEADLINE"):
        return TIME_LIMIT, line
    if state in ("PREEMPTED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return (PREEMPTED_REQUEUED if requeued_after or state.startswith("REQUEUE") else PREEMPTED), line
    seen = log_signs(log) if log else None
    if state == "CANCELLED":
        if seen in (TIME_LIMIT, PREEMPTED, PREEMPTED_REQUEUED, NODE_FAILURE):
            return (PREEMPTED_REQUEUED if seen == PREEMPTED and requeued_after else seen), line
        return CANCELLED, line
    # FAILED, or COMPLETED with a non-zero exit: the ranks' own exit code and log say why.
    if exit_code in EXIT_REASONS and exit_code != EXIT_BAD_INPUT:
        reason = EXIT_REASONS[exit_code]
        return (PREEMPTED_REQUEUED if reason == PREEMPTED and requeued_after else reason), line
    if seen in (OUT_OF_MEMORY, HANG, COLLECTIVE_TIMEOUT, NODE_FAILURE):
        return seen, line
    if exit_code == EXIT_BAD_INPUT:
        return BAD_INPUT, line
    return FAILED, line


def killed(exit_code: int | None, signal: int | None, log: str) -> bool:
    """A rank or the job killed from outside (SIGKILL), which a retry may cure."""
    return exit_code == 137 or signal == 9 or bool(re.search(r"task \d+: Killed\b|ended without an exit record",
                                                             log or ""))


def describe(reason: str, exit_code: int | None, signal: int | None, line: str | None) -> str:
    """'failed: exit code 1: ValueError: bad shard 7'; a hang is always the watchdog's (exit 4, its marker or
    its log line): 'hang (watchdog): ...'."""
    parts = [f"{reason} (watchdog)" if reason == HANG else reason]
    if reason not in (COMPLETED,) and (exit_code or signal):
        parts.append(f"exit code {exit_code}" + (f" (signal {signal})" if signal else ""))
    if line and reason != COMPLETED:
        parts.append(line)
    return ": ".join(parts)


# --------------------------------------------------------------------------- markers

# Which marker tells most when several ranks wrote one: the cause before its echoes (a rank out of
# memory makes the others' collectives fail), a failure before a clean stop.
MARKER_PRIORITY = {OUT_OF_MEMORY: 0, BAD_INPUT: 1, HANG: 2, NODE_FAILURE: 3, FAILED: 4, COLLECTIVE_TIMEOUT: 5,
                   TIME_LIMIT: 6, PREEMPTED: 7, CANCELLED: 8, COMPLETED: 9}


def marker_for(markers: list[dict[str, Any]], job_id: str, restart: int | None = None) -> dict[str, Any] | None:
    """The most telling marker of a job (attempt `restart`, or any): the cause of a failure first."""
    mine = [m for m in markers if str(m.get("job_id")) == str(job_id) and m.get("reason")
            and (restart is None or m.get("restart") in (None, restart))]
    if not mine:
        return None
    return min(mine, key=lambda m: (MARKER_PRIORITY.get(MARKER_REASONS.get(str(m["reason"]), FAILED), 4),
                                    m.get("time") or 0))
