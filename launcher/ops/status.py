"""Every job of a run dir: its state, elapsed time, nodes, GPUs, step/max_steps and last loss, and
for an ended job the reason, classified (launcher/ops/reasons.py).

Sources, asked in this order for each job id the run dir recorded (jobs.jsonl):
  1. squeue        live jobs (pending with its reason, running, completing);
  2. scontrol      jobs the controller still remembers (until MinJobAge after they end): state,
                   exit code, Restarts, log path;
  3. sacct -D -X   every attempt of every job, also after the controller forgot it: state, exit
                   code, elapsed, AllocTRES (GPUs), nodes;
  4. the run dir   markers the ranks write (launcher/rundir/markers.py) and the job's log
                   (RunDir.job_logs): what the ranks saw (out of memory, a collective timeout, a
                   hang, the exception), and the job's state when Slurm answers nothing.
The state comes from the first source that knows the job; the reason it ended combines Slurm's
state and exit code with the markers and the log, which are the only place that knows why a rank
failed (without cgroups Slurm has no OUT_OF_MEMORY state; torchrun exits 1 whatever its ranks did).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher import yamlio
from launcher.ops import reasons
from launcher.ops import slurmtools as st
from launcher.ops.cost import Prices
from launcher.ops.logs import job_log_files, last_step, read_tail, split_attempts
from launcher.ops.sources import Sources
from launcher.rundir import metrics
from launcher.rundir.jobs import REQUEUE, RETRY, count_kind, job_ids, lines_of_task, recorded_jobs
from launcher.rundir.layout import RunDir, open_run_dir
from launcher.rundir.markers import read_markers

# The batch script's last line of a job step (slurm/job.sbatch.j2).
_STEP_ENDED = re.compile(r"launcher: job step ended with status (\d+)")


# --------------------------------------------------------------------------- status of one job

@dataclass
class JobStatus:
    job_id: str
    kind: str
    state: str = "UNKNOWN"
    source: str = "none"  # squeue | scontrol | sacct | run dir | none
    live: bool = False
    reason: str | None = None  # for an ended job: a status word of launcher/ops/reasons.py
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


def _task_order(job_id: str) -> tuple[int, int, str]:
    """'123' before '123_0' before '123_2' before '123_10' before '123_[3-5]' (pending rest)."""
    _, sep, task = job_id.partition("_")
    if not sep:
        return (0, 0, "")
    return (1, int(task), "") if task.isdigit() else (2, 0, task)


def job_statuses(run_dir: Path, sources: Sources | None = None) -> list[JobStatus]:
    """The status of every job the run dir recorded (array tasks each on their own)."""
    run_dir = Path(run_dir)
    recorded = recorded_jobs(run_dir)
    ids = [j.job_id for j in recorded]
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
                if key != jid and st.base_job_id(key) == jid and key not in members:
                    members.append(key)
        if len(members) > 1 and not any(m == jid for m in (*src.squeue, *src.scontrol, *src.sacct)):
            members.remove(jid)  # an array: its tasks stand for it
        members.sort(key=_task_order)
        for member in members:
            out.append(_one(run_dir, member, kind, kinds.get(jid, (kind, recs))[1], src, markers, max_steps_default))
    return out


def _spec_max_steps(run_dir: Path) -> int | None:
    try:
        data = yamlio.load_file(RunDir(run_dir).spec_path) or {}
        return int(data.get("optim", {}).get("max_steps"))
    except Exception:  # a run dir without a readable spec: no default
        return None


def _one(run_dir: Path, jid: str, kind: str, recs: list[dict[str, Any]], src: Sources,
         markers: list[dict[str, Any]], max_steps_default: int | None) -> JobStatus:
    task = jid.partition("_")[2]
    recs = lines_of_task(recs, kind, task)
    js = JobStatus(job_id=jid, kind=kind, record=recs)
    js.requeues, js.retries = count_kind(recs, REQUEUE, task), count_kind(recs, RETRY, task)
    q, sc, attempts = src.squeue.get(jid), src.scontrol.get(jid), src.sacct.get(jid, [])
    log_files = job_log_files(run_dir, jid, (sc or {}).get("StdOut"))
    js.logs = [str(p) for p in log_files]
    text = read_tail(log_files)

    # state: the first source that knows the job
    if q:
        js.state, js.source, js.live = st.state_word(q.get("state")), "squeue", True
        js.elapsed_s = st.parse_duration(q.get("time_used"))
        js.nodes = st.parse_int(q.get("nodes")) or None
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
        js.restarts = st.parse_int(sc.get("Restarts"))
        js.elapsed_s = js.elapsed_s if js.elapsed_s is not None else st.parse_duration(sc.get("RunTime"))
        js.nodes = js.nodes or st.parse_int(sc.get("NumNodes")) or None
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
        fallback = _state_from_run_dir(text, reasons.marker_for(markers, jid), run_dir, kind)
        if fallback:
            js.state, js.source = fallback, "run dir"
            m = _STEP_ENDED.findall(text)
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
            reason, line = reasons.classify(a.state, a.exit_code, a.signal, seg_for.get(i, ""),
                                            reasons.marker_for(markers, jid, i), requeued_after=i < n - 1)
            d.update(reason=reason, log_line=line)
        js.attempts.append(d)

    # progress from the log (rank 0's step lines), else the run's metrics file
    step, max_steps, loss = last_step(text) if text else (None, None, None)
    if step is None and kind == "train":
        step, loss = metrics.progress(run_dir)
    js.step, js.loss = step, loss
    js.max_steps = max_steps or (max_steps_default if kind == "train" else None)

    # why it ended
    if not js.live and js.state not in ("UNKNOWN",) and js.state not in st.LIVE_STATES:
        last_text = segments[-1] if segments else text
        reason, line = reasons.classify(js.state, js.exit_code, js.signal, last_text,
                                        reasons.marker_for(markers, jid, n - 1 if n else js.restarts))
        js.reason, js.log_line = reason, line
        js.transient = reason in reasons.TRANSIENT or (
            reason == reasons.FAILED and reasons.killed(js.exit_code, js.signal, last_text))
        js.detail = reasons.describe(reason, js.exit_code, js.signal, line)
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
        reason = reasons.MARKER_REASONS.get(str(marker["reason"]))
        return "COMPLETED" if reason == reasons.COMPLETED else "FAILED"
    ended = _STEP_ENDED.findall(text)
    if ended:
        return "COMPLETED" if ended[-1] == "0" else "FAILED"
    if "DUE TO TIME LIMIT" in text:
        return "TIMEOUT"
    if re.search(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT", text):
        return "CANCELLED"
    if kind == "train" and (RunDir(run_dir).final / "config.json").is_file():
        return "COMPLETED"
    return None


# --------------------------------------------------------------------------- a run

def run_status(run_dir: str | os.PathLike, sources: Sources | None = None) -> dict[str, Any]:
    """Status of a run dir as a JSON-ready dict: the run, its jobs, and what failed to answer."""
    rd = open_run_dir(run_dir)
    ids = job_ids(rd.path)
    src = sources if sources is not None else Sources.gather(ids)
    prices = Prices.for_run(rd.path)
    jobs = job_statuses(rd.path, src)
    for js in jobs:
        js.usd = prices.usd_for_attempts(src.sacct.get(js.job_id, [])) if js.job_id in src.sacct else None
    name = None
    try:
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
                                                                      why != reasons.COMPLETED else ""))
    for p in status.get("problems") or []:
        lines.append(f"  note: {p}")
    return lines
