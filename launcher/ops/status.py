"""Every job of a run dir: its state, elapsed time, nodes, GPUs, step/max_steps and last loss, and
for an ended job the reason, classified.

Sources, asked in this order for each job id the run dir recorded (jobs.jsonl):
  1. squeue        live jobs (pending with its reason, running, completing);
  2. scontrol      jobs the controller still remembers (until MinJobAge after they end): state,
                   exit code, Restarts, log path;
  3. sacct -D -X   every attempt of every job, also after the controller forgot it: state, exit
                   code, elapsed, AllocTRES (GPUs), nodes;
  4. the run dir   markers the ranks write (launcher/rundir/markers.py, RUN_DIR/markers/*.json) and the job's
                   log (RUN_DIR/logs/*-JOBID.out): what the ranks saw (out of memory, a collective
                   timeout, a hang, the exception), and the job's state when Slurm answers nothing.
The state comes from the first source that knows the job; the reason it ended combines Slurm's
state and exit code with the markers and the log, which are the only place that knows why a rank
failed (without cgroups Slurm has no OUT_OF_MEMORY state; torchrun exits 1 whatever its ranks did).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.ops.logs import one_label, strip_labels
from launcher.ops import slurmtools as st
from launcher.ops.slurmtools import Attempt
from launcher.rank.watchdog import BACKSTOP_DUMP

# --------------------------------------------------------------------------- reasons

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

# Reasons a retry may cure (issue 9, item 5); the others would repeat.
TRANSIENT = frozenset({NODE_FAILURE, COLLECTIVE_TIMEOUT, HANG, PREEMPTED, PREEMPTED_REQUEUED})

# Exit codes of `launcher train` (README "Exit codes", launcher/errors.py).
_EXIT_REASONS = {2: BAD_INPUT, 3: PREEMPTED, 4: HANG, 5: OUT_OF_MEMORY}

# Marker `reason` values the ranks may write, and what they mean here.
MARKER_REASONS = {
    "completed": COMPLETED, "oom": OUT_OF_MEMORY, "out_of_memory": OUT_OF_MEMORY, "hang": HANG,
    "collective_timeout": COLLECTIVE_TIMEOUT, "nccl_timeout": COLLECTIVE_TIMEOUT, "node_failure": NODE_FAILURE,
    "time_limit": TIME_LIMIT, "preempted": PREEMPTED, "requeue": PREEMPTED, "cancelled": CANCELLED,
    "failed": FAILED, "bad_input": BAD_INPUT,
}

# What a log says, most specific first. Each: (reason, pattern).
_LOG_SIGNS: list[tuple[str, re.Pattern[str]]] = [
    (OUT_OF_MEMORY, re.compile(r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|"
                               r"DefaultCPUAllocator: can't allocate memory|oom[-_]kill|"
                               r"Killed process \d+ .*out of memory|Detected \d+ oom[-_]kill|"
                               r"MemoryError\b", re.I)),
    # the watchdog's line, or the first line of its faulthandler backstop's dump (a hang holding the GIL)
    (HANG, re.compile(r"launcher: (?:watchdog|hang)|hang detected|no progress for \d+|" + BACKSTOP_DUMP.pattern, re.I)),
    (COLLECTIVE_TIMEOUT, re.compile(r"Watchdog caught collective operation timeout|collective operation timeout|"
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
# The batch script prints this at the start of every attempt (slurm/job.sbatch.j2).
_ATTEMPT_BANNER = re.compile(r"^launcher: job (\d+) on ", re.M)
# Step lines of rank 0 (launcher/rank/loop.py format_step), read tolerantly.
_STEP = re.compile(r"(?<![\w.])step\s+(\d+)\s*/\s*(\d+)\b(?:.*?\bloss[\s=:]+([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)))?",
                   re.I)


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
    for _, pattern in _LOG_SIGNS:
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
    for reason, pattern in _LOG_SIGNS:
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
    if exit_code in _EXIT_REASONS and exit_code != 2:
        reason = _EXIT_REASONS[exit_code]
        return (PREEMPTED_REQUEUED if reason == PREEMPTED and requeued_after else reason), line
    if seen in (OUT_OF_MEMORY, HANG, COLLECTIVE_TIMEOUT, NODE_FAILURE):
        return seen, line
    if exit_code == 2:
        return BAD_INPUT, line
    return FAILED, line


def _killed(exit_code: int | None, signal: int | None, log: str) -> bool:
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

# The ranks write RUN_DIR/markers/NAME.json through launcher.rundir.markers; this module reads them there.
from launcher.rundir.markers import read_markers  # noqa: E402


# Which marker tells most when several ranks wrote one: the cause before its echoes (a rank out of
# memory makes the others' collectives fail), a failure before a clean stop.
_MARKER_PRIORITY = {OUT_OF_MEMORY: 0, BAD_INPUT: 1, HANG: 2, NODE_FAILURE: 3, FAILED: 4, COLLECTIVE_TIMEOUT: 5,
                    TIME_LIMIT: 6, PREEMPTED: 7, CANCELLED: 8, COMPLETED: 9}


def marker_for(markers: list[dict[str, Any]], job_id: str, restart: int | None = None) -> dict[str, Any] | None:
    """The most telling marker of a job (attempt `restart`, or any): the cause of a failure first."""
    mine = [m for m in markers if str(m.get("job_id")) == str(job_id) and m.get("reason")
            and (restart is None or m.get("restart") in (None, restart))]
    if not mine:
        return None
    return min(mine, key=lambda m: (_MARKER_PRIORITY.get(MARKER_REASONS.get(str(m["reason"]), FAILED), 4),
                                    m.get("time") or 0))


# --------------------------------------------------------------------------- logs

def job_log_files(run_dir: Path, job_id: str, extra: str | None = None) -> list[Path]:
    """The job's log files: RUN_DIR/logs/%x-%j.out (or %x-%A_%a.out for array tasks), plus the
    path the controller reports (StdOut) when it lies elsewhere."""
    logs = run_dir / "logs"
    found: list[Path] = []
    if logs.is_dir():
        found = sorted(p for p in logs.iterdir() if p.is_file() and p.name.endswith(f"-{job_id}.out"))
    if extra and extra not in ("", "(null)", "/dev/null"):
        p = Path(extra)
        if p.is_file() and p not in found:
            found.append(p)
    return found


def read_text(paths: list[Path], limit: int = 4 << 20) -> str:
    parts = []
    for p in paths:
        try:
            with p.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - limit))
                parts.append(f.read().decode("utf-8", "replace"))
        except OSError:
            continue
    return "\n".join(parts)


def split_attempts(text: str, job_id: str) -> list[str]:
    """The log of each attempt (a requeued job appends to its log; the batch script prints a
    banner at each start). Without banners the whole text is one attempt."""
    starts = [m.start() for m in _ATTEMPT_BANNER.finditer(text)]
    if not starts:
        return [text]
    segs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    segs[0] = text[: starts[1] if len(starts) > 1 else len(text)]  # preamble joins the first
    return segs


def last_step(text: str) -> tuple[int | None, int | None, float | None]:
    """(step, max_steps, loss) of the last step line ('step N/M loss X ...'); eval lines skipped."""
    step = max_steps = None
    loss = None
    for line in text.splitlines():
        s = strip_labels(line.strip())
        if s.lower().startswith("eval"):
            continue
        m = _STEP.search(s)
        if m and (m.group(3) or not s[: m.start()].strip()):
            step, max_steps = int(m.group(1)), int(m.group(2))
            loss = float(m.group(3)) if m.group(3) else loss
    return step, max_steps, loss


def metrics_progress(run_dir: Path) -> tuple[int | None, float | None]:
    """(last step, its loss) from RUN_DIR/logs/metrics.jsonl, which rank 0 writes each logging step."""
    path = run_dir / "logs" / "metrics.jsonl"
    step = loss = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and isinstance(rec.get("step"), int):
            if step is None or rec["step"] >= step:
                step, loss = rec["step"], rec["loss"]
    return step, loss


# --------------------------------------------------------------------------- status of one job

@dataclass
class JobStatus:
    job_id: str
    kind: str
    state: str = "UNKNOWN"
    source: str = "none"  # squeue | scontrol | sacct | run dir | none
    live: bool = False
    reason: str | None = None  # for an ended job (see the constants above)
    transient: bool | None = None  # would a retry help (node failure, collective timeout, ...)
    detail: str = ""  # 'failed: exit code 1: ValueError: ...' or 'pending: Resources'
    exit_code: int | None = None
    signal: int | None = None
    log_line: str | None = None
    elapsed_s: int | None = None  # the latest attempt
    total_elapsed_s: int = 0  # every attempt
    nodes: int | None = None
    node_list: str = ""
    gpus: int | None = None
    gpu_hours: float = 0.0  # every attempt
    usd: float | None = None  # every attempt, at the run's prices
    restarts: int = 0
    requeues: int = 0  # requeues after a preemption/time-limit signal the batch script recorded (jobs.jsonl)
    retries: int = 0  # retries after a transient failure the batch script recorded (jobs.jsonl)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    logs: list[str] = field(default_factory=list)
    record: list[dict[str, Any]] = field(default_factory=list)  # its lines in jobs.jsonl

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recorded_jobs(run_dir: Path) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(job id, kind, its jobs.jsonl lines) in submission order, each id once."""
    from launcher.rundir.layout import RunDir

    seen: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for rec in RunDir(run_dir).jobs():
        jid = str(rec.get("job_id", "")).strip()
        if not jid:
            continue
        if jid not in seen:
            seen[jid] = (str(rec.get("kind") or "job"), [])
        seen[jid][1].append(rec)
    return [(j, k, recs) for j, (k, recs) in seen.items()]


def _display_id(rec: dict[str, str]) -> str:
    aj, at = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
    if aj and at and at not in ("N/A", "(null)"):
        return f"{aj}_{at}"
    return rec.get("JobId", "")


def _group_attempts(rows: list[dict[str, str]]) -> dict[str, list[Attempt]]:
    out: dict[str, list[tuple[tuple[str, str], Attempt]]] = {}
    for i, row in enumerate(rows):
        a = Attempt.from_sacct(row)
        if a.job_id:
            # oldest attempt first: by submit time (a requeue submits again), then start, then sacct's order
            late = "9999"
            key = (row.get("Submit") or late, a.start if a.start[:1].isdigit() else late, f"{i:09d}")
            out.setdefault(a.job_id, []).append((key, a))
    return {j: [a for _, a in sorted(group, key=lambda x: x[0])] for j, group in out.items()}


def _task_order(job_id: str) -> tuple[int, int, str]:
    """'123' before '123_0' before '123_2' before '123_10' before '123_[3-5]' (pending rest)."""
    _, sep, task = job_id.partition("_")
    if not sep:
        return (0, 0, "")
    return (1, int(task), "") if task.isdigit() else (2, 0, task)


def _base(job_id: str) -> str:
    return job_id.split("_")[0].split(".")[0]


@dataclass
class Sources:
    """What each tool said, gathered once for a set of job ids (and what failed)."""

    squeue: dict[str, dict[str, str]] = field(default_factory=dict)
    scontrol: dict[str, dict[str, str]] = field(default_factory=dict)
    sacct: dict[str, list[Attempt]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def gather(cls, job_ids: list[str]) -> "Sources":
        s = cls()
        if not job_ids:
            return s
        try:
            for row in st.squeue(job_ids):
                s.squeue[row["job_id"]] = row
        except st.SlurmToolError as exc:
            s.problems.append(str(exc))
        for jid in job_ids:
            try:
                for rec in st.scontrol_show_job(jid):
                    s.scontrol[_display_id(rec)] = rec
            except st.SlurmToolError as exc:
                s.problems.append(str(exc))
        try:
            s.sacct = _group_attempts(st.sacct(job_ids))
        except st.SlurmToolError as exc:
            s.problems.append(f"accounting (sacct) did not answer: {exc}")
        return s


def job_statuses(run_dir: Path, sources: Sources | None = None) -> list[JobStatus]:
    """The status of every job the run dir recorded (array tasks each on their own)."""
    run_dir = Path(run_dir)
    recorded = recorded_jobs(run_dir)
    ids = [j for j, _, _ in recorded]
    src = sources if sources is not None else Sources.gather(ids)
    markers = read_markers(run_dir)
    kinds = {j: (k, recs) for j, k, recs in recorded}
    max_steps_default = _spec_max_steps(run_dir)

    out: list[JobStatus] = []
    for jid, kind, recs in recorded:
        # every display id that belongs to this recorded id (itself, or its array tasks)
        members = [jid]
        for table in (src.squeue, src.scontrol, src.sacct):
            for key in table:
                if key != jid and _base(key) == jid and key not in members:
                    members.append(key)
        if len(members) > 1 and not any(m == jid for m in (*src.squeue, *src.scontrol, *src.sacct)):
            members.remove(jid)  # an array: its tasks stand for it
        members.sort(key=_task_order)
        for member in members:
            out.append(_one(run_dir, member, kind, kinds.get(jid, (kind, recs))[1], src, markers, max_steps_default))
    return out


def _spec_max_steps(run_dir: Path) -> int | None:
    try:
        from launcher import yamlio

        data = yamlio.load_file(run_dir / "spec.yaml") or {}
        return int(data.get("optim", {}).get("max_steps"))
    except Exception:  # a run dir without a readable spec: no default
        return None


def _one(run_dir: Path, jid: str, kind: str, recs: list[dict[str, Any]], src: Sources,
         markers: list[dict[str, Any]], max_steps_default: int | None) -> JobStatus:
    task = jid.partition("_")[2]
    recs = [r for r in recs if not task or str(r.get("task", "")) in ("", task) or r.get("kind") == kind]
    js = JobStatus(job_id=jid, kind=kind, record=recs)
    js.requeues = sum(1 for r in recs if r.get("kind") == "requeue" and str(r.get("task", "")) in ("", task))
    js.retries = sum(1 for r in recs if r.get("kind") == "retry" and str(r.get("task", "")) in ("", task))
    q, sc, attempts = src.squeue.get(jid), src.scontrol.get(jid), src.sacct.get(jid, [])
    log_files = job_log_files(run_dir, jid, (sc or {}).get("StdOut"))
    js.logs = [str(p) for p in log_files]
    text = read_text(log_files)

    # state: the first source that knows the job
    if q:
        js.state, js.source, js.live = st.state_word(q.get("state")), "squeue", True
        js.elapsed_s = st.parse_duration(q.get("time_used"))
        js.nodes = st._int(q.get("nodes")) or None
        js.node_list = q.get("node_list", "")
        if js.state == "PENDING":
            js.detail = f"pending: {q.get('reason', '')}"
    elif sc:
        js.state, js.source = st.state_word(sc.get("JobState")), "scontrol"
    elif attempts:
        js.state, js.source = attempts[-1].state, "sacct"
    if sc:
        js.live = js.live or js.state in st.LIVE_STATES
        js.exit_code, js.signal = st.parse_exit_code(sc.get("ExitCode"))
        js.restarts = st._int(sc.get("Restarts"))
        js.elapsed_s = js.elapsed_s if js.elapsed_s is not None else st.parse_duration(sc.get("RunTime"))
        js.nodes = js.nodes or st._int(sc.get("NumNodes")) or None
        nl = sc.get("NodeList", "")
        js.node_list = js.node_list or (nl if nl != "(null)" else "")
        tres = sc.get("AllocTRES") or sc.get("TRES")
        if tres:
            js.gpus = st.gpus_in_tres(tres)
        if js.state == "PENDING" and not js.detail:
            js.detail = f"pending: {sc.get('Reason', '')}"
    if attempts:
        last = attempts[-1]
        js.restarts = max(js.restarts, len(attempts) - 1)
        if js.exit_code is None:
            js.exit_code, js.signal = last.exit_code, last.signal
        if js.elapsed_s is None or (not js.live and last.elapsed_s):
            js.elapsed_s = last.elapsed_s
        js.nodes = js.nodes or last.nodes or None
        js.node_list = js.node_list or (last.node_list if last.node_list not in ("None assigned",) else "")
        if js.gpus is None or last.gpus:
            js.gpus = last.gpus  # what the attempt was given (a pending job keeps what it asks for)
        js.total_elapsed_s = sum(a.elapsed_s for a in attempts)
        js.gpu_hours = sum(a.elapsed_s * a.gpus for a in attempts) / 3600
    elif js.elapsed_s:
        js.total_elapsed_s = js.elapsed_s
        js.gpu_hours = js.elapsed_s * (js.gpus or 0) / 3600

    # the run dir: when Slurm knows nothing of the job any more
    segments = split_attempts(text, jid) if text else []
    if js.source == "none":
        fallback = _state_from_run_dir(text, marker_for(markers, jid), run_dir, kind)
        if fallback:
            js.state, js.source = fallback, "run dir"
            m = re.findall(r"launcher: job step ended with status (\d+)", text)
            if m:
                js.exit_code = int(m[-1])

    # attempts, each with its reason
    n = len(attempts)
    seg_for = {}
    if segments:
        for i in range(max(n, 1)):
            k = len(segments) - max(n, 1) + i
            seg_for[i] = segments[k] if k >= 0 else ""
    for i, a in enumerate(attempts):
        d = a.to_dict()
        if a.state not in st.LIVE_STATES or i < n - 1:
            reason, line = classify(a.state, a.exit_code, a.signal, seg_for.get(i, ""),
                                    marker_for(markers, jid, i), requeued_after=i < n - 1)
            d.update(reason=reason, log_line=line)
        js.attempts.append(d)

    # progress from the log (rank 0's step lines), else the run's metrics file
    step, max_steps, loss = last_step(text) if text else (None, None, None)
    if step is None and kind == "train":
        step, loss = metrics_progress(run_dir)
    js.step, js.loss = step, loss
    js.max_steps = max_steps or (max_steps_default if kind == "train" else None)

    # why it ended
    if not js.live and js.state not in ("UNKNOWN",) and js.state not in st.LIVE_STATES:
        last_text = segments[-1] if segments else text
        reason, line = classify(js.state, js.exit_code, js.signal, last_text,
                                marker_for(markers, jid, n - 1 if n else js.restarts))
        js.reason, js.log_line = reason, line
        js.transient = reason in TRANSIENT or (reason == FAILED and _killed(js.exit_code, js.signal, last_text))
        js.detail = describe(reason, js.exit_code, js.signal, line)
    elif js.state == "UNKNOWN":
        js.detail = "no record in squeue, scontrol or sacct, and nothing in the run dir says how it ended"
    elif js.live and not js.detail:
        js.detail = js.state.lower()
        if js.restarts:
            js.detail += f" (attempt {js.restarts + 1})"
    return js


def _state_from_run_dir(text: str, marker: dict[str, Any] | None, run_dir: Path, kind: str) -> str | None:
    """A job Slurm no longer knows (no accounting, controller forgot): its end as the run dir tells it."""
    if marker and marker.get("reason"):
        reason = MARKER_REASONS.get(str(marker["reason"]))
        return "COMPLETED" if reason == COMPLETED else "FAILED"
    ended = re.findall(r"launcher: job step ended with status (\d+)", text)
    if ended:
        return "COMPLETED" if ended[-1] == "0" else "FAILED"
    if "DUE TO TIME LIMIT" in text:
        return "TIMEOUT"
    if re.search(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT", text):
        return "CANCELLED"
    if kind == "train" and (run_dir / "final" / "config.json").is_file():
        return "COMPLETED"
    return None


# --------------------------------------------------------------------------- a run

def run_status(run_dir: str | os.PathLike, sources: Sources | None = None) -> dict[str, Any]:
    """Status of a run dir as a JSON-ready dict: the run, its jobs, and what failed to answer."""
    from launcher.ops.cost import Prices
    from launcher.rundir.layout import open_run_dir

    rd = open_run_dir(run_dir)
    ids = [j for j, _, _ in recorded_jobs(rd.path)]
    src = sources if sources is not None else Sources.gather(ids)
    prices = Prices.for_run(rd.path)
    jobs = job_statuses(rd.path, src)
    for js in jobs:
        js.usd = prices.usd_for_attempts(src.sacct.get(js.job_id, [])) if js.job_id in src.sacct else None
    name = None
    try:
        from launcher import yamlio

        name = (yamlio.load_file(rd.spec_path) or {}).get("name")
    except Exception:
        pass
    return {"run_dir": str(rd.path), "name": name, "jobs": [j.to_dict() for j in jobs],
            "live": any(j.live for j in jobs), "problems": src.problems}


def format_run(status: dict[str, Any]) -> list[str]:
    """Text lines for one run's status (the table `launcher status` prints)."""
    lines = [f"{status['run_dir']}" + (f"  ({status['name']})" if status.get("name") else "")]
    jobs = status["jobs"]
    if not jobs:
        lines.append("  no jobs recorded (jobs.jsonl is empty: submit with `launcher slurm --submit`)")
        return lines
    head = ("JOB", "KIND", "STATE", "FROM", "ELAPSED", "NODES", "GPUS", "STEP", "LOSS", "GPU-H", "$", "REASON")
    rows = []
    for j in jobs:
        step = f"{j['step']}/{j['max_steps'] or '?'}" if j.get("step") is not None else (
            f"-/{j['max_steps']}" if j.get("max_steps") else "-")
        rows.append((
            j["job_id"], j["kind"], j["state"] + (f" x{j['restarts'] + 1}" if j.get("restarts") else ""),
            j["source"], st.format_duration(j.get("elapsed_s")), str(j["nodes"] or "-"),
            "-" if j.get("gpus") is None else str(j["gpus"]), step,
            "-" if j.get("loss") is None else f"{j['loss']:.4f}", f"{j.get('gpu_hours') or 0:.3f}",
            "-" if j.get("usd") is None else f"{j['usd']:.2f}", j.get("detail") or "",
        ))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1]))
    for j in jobs:
        if len(j.get("attempts") or []) > 1:
            for i, a in enumerate(j["attempts"]):
                why = a.get("reason") or a["state"].lower()
                lines.append(f"  {j['job_id']} attempt {i + 1}: {a['state']} {st.format_duration(a['elapsed_s'])}"
                             f" on {a['node_list'] or '-'}: {why}" + (f" ({a['log_line']})" if a.get("log_line") and
                                                                      why != COMPLETED else ""))
    for p in status.get("problems") or []:
        lines.append(f"  note: {p}")
    return lines
