"""Print or follow a run's logs (RUN_DIR/logs: one file per Slurm job, %x-%j.out, which a requeued
job appends to; launch.log of a local run), optionally only one rank's or one node's lines.

Which rank or node a line comes from, by its label:
  "[rankN]:..."      the batch script's torchrun prefix (--tee 3, global rank N) on every line a rank
                     writes; also torch's own prefix on rank N's errors           -> rank N
  "[defaultL]: ..."  torchrun's default --tee prefix (local rank L)               -> rank L of a 1-node job
  "T: ..."           srun --label (task T): with `launcher: srun` the rank,
                     with torchrun (one task per node) the node index
  no label           the batch shell and torchrun itself; rank 0 of a local run -> rank 0, first node
A rank's node is rank // ranks per node (torchrun's node rank is SLURM_NODEID; srun places tasks in
blocks); node names come from the job's node list (sacct / scontrol).

Following returns once no job of the run is pending or running any more (squeue), after reading
what the last job wrote. Also the readers `status` and `cost` share: a job's log files, their tail, the
log of each attempt, and the last step line.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import UserError
from launcher.ops import slurmtools as st
from launcher.plan.plan import make_plan
from launcher.rundir import metrics
from launcher.rundir.jobs import job_ids
from launcher.rundir.layout import LOG_JOB_ID, RunDir

# Each label as (kind, its pattern at the start of a line; group 1: its number).
_LABELS = (
    ("rank", r"\[rank(\d+)\]:\s?"),
    ("local", r"\[default(\d+)\]:\s?"),
    ("task", r"\s*(\d+): "),
)
_LABEL = [(kind, re.compile("^" + pattern)) for kind, pattern in _LABELS]
# Any run of those labels at the start of a line ("0: [rank0]:[rank0]: Traceback ...").
_LABEL_RUN = re.compile("^(?:" + "|".join(pattern for _, pattern in _LABELS) + ")+")
_LOG_SUFFIXES = (".out", ".log", ".err")


def _first_label(line: str) -> tuple[str, re.Match[str]] | None:
    """(kind, match) of the label a line starts with, or None."""
    for kind, pattern in _LABEL:
        m = pattern.match(line)
        if m:
            return kind, m
    return None


def strip_labels(line: str) -> str:
    """The line as its rank wrote it: without the labels above."""
    return _LABEL_RUN.sub("", line, count=1)


def one_label(line: str) -> str:
    """The line with its labels cut to the first ("[rank1]:[rank1]: X" -> "[rank1]: X")."""
    run, first = _LABEL_RUN.match(line), _first_label(line)
    if not run or not first:
        return line
    return f"{first[1].group(0).strip()} {line[run.end():]}"


def log_files(run_dir: Path) -> list[Path]:
    """The run's log files: each recorded job's files in submission order, then any others."""
    logs = RunDir(run_dir).logs
    if not logs.is_dir():
        return []
    every = sorted((p for p in logs.iterdir() if p.is_file() and p.suffix in _LOG_SUFFIXES),
                   key=lambda p: (p.stat().st_mtime, p.name))
    ordered: list[Path] = []
    for jid in job_ids(run_dir):
        for p in every:
            m = LOG_JOB_ID.search(p.name)
            if m and m.group(1).split("_")[0] == jid and p not in ordered:
                ordered.append(p)
    return ordered + [p for p in every if p not in ordered]


@dataclass
class Layout:
    """How ranks map to nodes, for attributing lines."""

    nproc_per_node: int = 1
    launcher: str = "torchrun"
    nodes: dict[str, list[str]] = field(default_factory=dict)  # job id -> node names in order

    @classmethod
    def for_run(cls, run_dir: Path, need_nodes: bool) -> "Layout":
        lay = cls()
        try:
            spec = RunDir(run_dir).load_spec()
            lay.nproc_per_node, lay.launcher = make_plan(spec).nproc_per_node, spec.cluster.launcher
        except Exception:  # a run dir whose spec no longer validates: one rank per node
            pass
        if need_nodes:
            ids = job_ids(run_dir)
            try:
                for row in st.sacct(ids, ("JobID", "NodeList")):
                    hosts = st.expand_hostlist(row.get("NodeList"))
                    if hosts:
                        lay.nodes[row["JobID"]] = hosts
            except st.SlurmToolError:
                pass
            for jid in ids:
                if jid not in lay.nodes:
                    try:
                        for rec in st.scontrol_show_job(jid):
                            hosts = st.expand_hostlist(rec.get("NodeList"))
                            if hosts:
                                lay.nodes[jid] = hosts
                    except st.SlurmToolError:
                        pass
        return lay

    def attribute(self, line: str, single_node: bool) -> tuple[int | None, int | None]:
        """(rank, node index) of a line; None where the line does not say."""
        first = _first_label(line)
        if first is None:
            return 0, 0
        kind, n = first[0], int(first[1].group(1))
        if kind == "rank":
            return n, n // max(self.nproc_per_node, 1)
        if kind == "local":
            return (n, 0) if single_node else (None, None)
        if self.launcher == "srun":  # srun --label: the task is the rank
            return n, n // max(self.nproc_per_node, 1)
        return None, n  # torchrun: one task per node


@dataclass
class LineFilter:
    rank: int | None = None
    node: str | None = None
    layout: Layout = field(default_factory=Layout)
    matched: int = 0

    def active(self) -> bool:
        return self.rank is not None or self.node is not None

    def keep(self, line: str, path: Path) -> bool:
        if not self.active():
            return True
        m = LOG_JOB_ID.search(path.name)
        job = m.group(1) if m else ""
        hosts = self.layout.nodes.get(job) or self.layout.nodes.get(job.split("_")[0]) or []
        rank, node_index = self.layout.attribute(line, single_node=len(hosts) <= 1)
        if self.rank is not None:
            ok = rank == self.rank
        else:
            ok = node_index is not None and node_index < len(hosts) and hosts[node_index] == self.node
        self.matched += ok
        return ok


def make_filter(run_dir: Path, rank: int | None, node: str | None) -> LineFilter:
    if rank is not None and node is not None:
        raise UserError("give --rank N or --node NAME, not both")
    if rank is not None and rank < 0:
        raise UserError(f"--rank {rank}: ranks count from 0")
    f = LineFilter(rank=rank, node=node, layout=Layout.for_run(run_dir, need_nodes=node is not None))
    if node is not None:
        known = sorted({h for hosts in f.layout.nodes.values() for h in hosts})
        if node not in known:
            raise UserError(f"--node {node}: no job of this run ran on it (its jobs ran on: "
                            f"{', '.join(known) or 'no node yet'})")
    return f


def _emit_lines(path: Path, text: str, filt: LineFilter, write: Callable[[str], None]) -> None:
    for line in text.splitlines():
        if filt.keep(line, path):
            write(line)


def print_logs(run_dir: Path, write: Callable[[str], None], filt: LineFilter | None = None) -> int:
    """Print every log of the run; returns the number of files."""
    filt = filt or LineFilter()
    files = log_files(run_dir)
    for p in files:
        if len(files) > 1 and not filt.active():
            write(f"==> {p} <==")
        try:
            text = p.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        _emit_lines(p, text, filt, write)
    return len(files)


def live_jobs(run_dir: Path) -> list[str] | None:
    """Ids of the run's jobs that are pending or running; None when squeue did not answer."""
    ids = job_ids(run_dir)
    if not ids:
        return []
    try:
        return [r["job_id"] for r in st.squeue(ids) if st.state_word(r.get("state")) in st.LIVE_STATES]
    except st.SlurmToolError:
        return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def follow(run_dir: Path, write: Callable[[str], None], filt: LineFilter | None = None, *, poll: float = 0.5,
           check_every: float = 2.0, timeout: float | None = None,
           is_live: Callable[[Path], list[str] | None] = live_jobs) -> bool:
    """Print the logs and follow them until no job of the run is live; returns True when the jobs
    ended (False on timeout). A squeue that does not answer counts as 'still live'."""
    filt = filt or LineFilter()
    pos: dict[Path, int] = {}
    partial: dict[Path, str] = {}
    last_file: list[Path | None] = [None]
    start = time.monotonic()
    next_check = 0.0
    multi = [False]
    unreachable = [False]  # said once on stderr while squeue does not answer, again when it is back

    def drain(final: bool = False) -> None:
        files = log_files(run_dir)
        multi[0] = multi[0] or len(files) > 1
        for p in files:
            try:
                with p.open("rb") as f:
                    if f.seek(0, 2) < pos.get(p, 0):  # truncated (a job without open-mode append)
                        pos[p] = 0
                    f.seek(pos.get(p, 0))
                    data = f.read()
                    pos[p] = f.tell()
            except OSError:
                continue
            if not data and not (final and partial.get(p)):
                continue
            text = partial.pop(p, "") + data.decode("utf-8", "replace")
            if not final and not text.endswith("\n"):
                text, _, rest = text.rpartition("\n")
                partial[p] = rest
                if not text:
                    continue
            if multi[0] and not filt.active() and last_file[0] != p:
                write(f"==> {p} <==")
            last_file[0] = p
            _emit_lines(p, text, filt, write)

    while True:
        drain()
        now = time.monotonic()
        if now >= next_check:
            next_check = now + check_every
            live = is_live(run_dir)
            if live is None and not unreachable[0]:
                unreachable[0] = True
                _say(f"note: squeue does not answer; still following {RunDir(run_dir).logs} until it says the "
                     f"run's jobs ended (Ctrl-C to stop)")
            elif live is not None and unreachable[0]:
                unreachable[0] = False
                _say("note: squeue answers again")
            if live is not None and not live:
                time.sleep(min(1.0, poll * 2))  # the last writes of a job that just ended
                drain(final=True)
                return True
        if timeout is not None and now - start > timeout:
            drain(final=True)
            return False
        time.sleep(poll)


def stdout_write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- what status and cost read

# The batch script prints this at the start of every attempt (slurm/job.sbatch.j2).
_ATTEMPT_BANNER = re.compile(r"^launcher: job (\d+) on ", re.M)


def job_log_files(run_dir: Path, job_id: str, extra: str | None = None) -> list[Path]:
    """The job's log files in RUN_DIR/logs (RunDir.job_logs), plus the path the controller reports
    (StdOut) when it lies elsewhere."""
    found = RunDir(run_dir).job_logs(job_id)
    if extra and extra not in ("", "(null)", "/dev/null"):
        p = Path(extra)
        if p.is_file() and p not in found:
            found.append(p)
    return found


def read_tail(paths: list[Path], limit: int = 4 << 20) -> str:
    """The last `limit` bytes of each file, joined; unreadable files skipped."""
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
    """(step, max_steps, loss) of a log's last training step line (rundir/metrics.py parse_step, read
    through the rank labels); a line without a loss keeps the loss of an earlier one."""
    step = max_steps = None
    loss = None
    for line in text.splitlines():
        found = metrics.parse_step(strip_labels(line.strip()))
        if found is not None:
            step, max_steps = found.step, found.max_steps
            loss = found.loss if found.loss is not None else loss
    return step, max_steps, loss


__all__ = ["follow", "print_logs", "make_filter", "log_files", "live_jobs", "Layout", "LineFilter", "stdout_write",
           "job_log_files", "read_tail", "split_attempts", "last_step", "strip_labels", "one_label"]
