"""Thin wrappers around Slurm's own tools (squeue, scontrol, sacct, sinfo, scancel), each with a
timeout, and the parsers of their output. The parsers are pure functions of the text, tested on
recorded output (tests/unit/test_jobs_parsing.py); the wrappers only run the tools.

Facts of Slurm 22.05 this relies on: `squeue -j IDS` lists only jobs the controller still holds as
pending/running/completing and exits 1 ("Invalid job id specified") when it knows none of one
given id; `scontrol show job -o ID` gives one Key=Value line per job (array task) while the
controller remembers it (MinJobAge); `sacct -D -X` lists every attempt of a job (REQUEUED, then
the next), it has no Restarts field and no StdOut field; GPUs appear in AllocTRES as gres/gpu=N
only where the cluster tracks them (AccountingStorageTRES=gres/gpu).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from launcher.errors import RunFailed, UserError

DEFAULT_TIMEOUT = 30.0

# Job states in which a job may still run (again): squeue lists these.
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})
# Job states after which a job does not run again by itself.
ENDED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "TIMEOUT", "REVOKED", "SPECIAL_EXIT",
})

# squeue fields (-o): the job name last, as it may hold the separator.
SQUEUE_FIELDS = ("job_id", "array_job_id", "array_task_id", "state", "time_used", "time_limit", "nodes",
                 "node_list", "reason", "tres_per_node", "name")
SQUEUE_FORMAT = "%i|%F|%K|%T|%M|%l|%D|%N|%r|%b|%j"

# sacct fields (--parsable2): JobName and SubmitLine last, as they may hold the separator.
SACCT_FIELDS = ("JobID", "JobIDRaw", "State", "ExitCode", "DerivedExitCode", "Elapsed", "ElapsedRaw", "AllocTRES",
                "AllocCPUS", "NNodes", "NodeList", "Partition", "Start", "End", "Submit", "Timelimit", "WorkDir",
                "JobName")


class SlurmToolError(RunFailed):
    """A Slurm tool that is there but failed or did not answer in time (exit 1)."""


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"`{tool}` is not on the PATH: this command reads Slurm's own tools (squeue, scontrol, "
                        f"sacct, sinfo, scancel); run it where Slurm's client commands are installed (a login "
                        f"node), or put their folder on the PATH")
    return path


def run(tool: str, *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Slurm tool; UserError when it is missing, SlurmToolError when it fails (check) or hangs."""
    argv = [require(tool), *args]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmToolError(f"`{tool} {' '.join(args)}` did not answer within {timeout:.0f} s "
                             f"(is the Slurm controller up?)") from None
    if check and cp.returncode != 0:
        raise SlurmToolError(f"`{tool} {' '.join(args)}` exited {cp.returncode}: "
                             f"{(cp.stderr or cp.stdout).strip()[:500]}")
    return cp


# --------------------------------------------------------------------------- parsers (pure)

def parse_delimited(text: str, fields: Sequence[str], sep: str = "|") -> list[dict[str, str]]:
    """Rows of `-o`/`--parsable2` output with these fields; the last field keeps any extra separators."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(sep, len(fields) - 1)
        parts += [""] * (len(fields) - len(parts))
        rows.append(dict(zip(fields, parts)))
    return rows


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line: Key=Value pairs, a value may contain blanks (Command, Reason)."""
    out: dict[str, str] = {}
    matches = list(_KEY.finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def parse_scontrol(text: str) -> list[dict[str, str]]:
    return [parse_scontrol_record(line) for line in text.splitlines() if "=" in line]


_DURATION = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?$")


def parse_duration(text: str | None) -> int | None:
    """Slurm's elapsed/time-limit syntax -> seconds: [D-]HH:MM:SS, MM:SS, D-HH:MM:SS; None for
    UNLIMITED, INVALID, N/A or empty. A bare number is minutes (Slurm's meaning in limits)."""
    if text is None:
        return None
    t = text.strip()
    if not t or t.upper() in ("UNLIMITED", "INFINITE", "INVALID", "N/A", "NONE", "PARTITION_LIMIT"):
        return None
    if t.isdigit():
        return int(t) * 60
    m = _DURATION.match(t)
    if m:
        d, h, mi, s = m.groups()
        return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi) * 60 + int(s)
    m = re.match(r"^(\d+)-(\d+)$", t)  # D-HH
    if m:
        return int(m.group(1)) * 86400 + int(m.group(2)) * 3600
    return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def parse_tres(text: str | None) -> dict[str, str]:
    """'cpu=2,mem=1000M,node=2,billing=2,gres/gpu=4' -> {'cpu': '2', ..., 'gres/gpu': '4'}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        k, sep, v = item.partition("=")
        if sep and k.strip():
            out[k.strip()] = v.strip()
    return out


def gpus_in_tres(text: str | None) -> int:
    """Allocated GPUs in a TRES string: gres/gpu=N, or the sum of typed gres/gpu:TYPE=N entries."""
    tres = parse_tres(text)
    if "gres/gpu" in tres:
        return parse_int(tres["gres/gpu"])
    return sum(parse_int(v) for k, v in tres.items() if k.startswith("gres/gpu:"))


def parse_gres(text: str | None) -> list[tuple[str, str | None, int]]:
    """Node Gres 'gpu:h100:2(S:0-1),gpu:a100:1' -> [('gpu', 'h100', 2), ('gpu', 'a100', 1)]. '(null)' -> []."""
    out = []
    for item in re.split(r",(?![^()]*\))", text or ""):
        item = re.sub(r"\(.*?\)", "", item).strip()
        if not item or item in ("(null)", "N/A"):
            continue
        parts = item.split(":")
        name = parts[0]
        if len(parts) == 1:
            out.append((name, None, 1))
        elif len(parts) == 2:
            out.append((name, None, parse_int(parts[1])) if parts[1].isdigit() else (name, parts[1], 1))
        else:
            out.append((name, parts[1], parse_int(parts[2])))
    return out


def parse_exit_code(text: str | None) -> tuple[int | None, int | None]:
    """sacct/scontrol 'CODE:SIGNAL' -> (code, signal); (None, None) when absent."""
    m = re.match(r"^\s*(\d+):(\d+)\s*$", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def state_word(state: str | None) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'RUNNING' -> 'RUNNING'."""
    return (state or "").split()[0].rstrip("+") if (state or "").strip() else ""


def expand_hostlist(text: str | None) -> list[str]:
    """'node[1-3,7],gpu05' -> ['node1', 'node2', 'node3', 'node7', 'gpu05'] (Slurm's hostlist
    syntax, one bracket per name); '(null)', 'None assigned' -> []."""
    text = (text or "").strip()
    if not text or text in ("(null)", "None assigned", "N/A"):
        return []
    names = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", text):
        m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", item)
        if not m:
            names.append(item)
            continue
        head, ranges, tail = m.groups()
        for r in ranges.split(","):
            lo, sep, hi = r.partition("-")
            if sep:
                width = len(lo)
                names += [f"{head}{i:0{width}d}{tail}" for i in range(int(lo), int(hi) + 1)]
            else:
                names.append(f"{head}{lo}{tail}")
    return names


def parse_int(text: Any, default: int = 0) -> int:
    """An integer field ("4", "4(x)"); `default` where there is none."""
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        m = re.match(r"^\s*(\d+)", str(text or ""))
        return int(m.group(1)) if m else default


# --------------------------------------------------------------------------- the tools

def _ids(job_ids: Iterable[str]) -> list[str]:
    return [str(j) for j in dict.fromkeys(str(j) for j in job_ids) if str(j).strip()]


def squeue(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, str]]:
    """Jobs the controller still holds as live (pending, running, completing, ...)."""
    ids = _ids(job_ids)
    if not ids:
        return []
    cp = run("squeue", "-h", "-j", ",".join(ids), "-o", SQUEUE_FORMAT, timeout=timeout, check=False)
    if cp.returncode != 0:
        if "Invalid job id" in cp.stderr + cp.stdout:
            return []  # none of the ids is known any more
        raise SlurmToolError(f"`squeue -j {','.join(ids)}` exited {cp.returncode}: {cp.stderr.strip()[:500]}")
    return parse_delimited(cp.stdout, SQUEUE_FIELDS)


def scontrol_show_job(job_id: str, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, str]]:
    """`scontrol show job -o ID`: one record per job (array task); [] once the controller forgot it."""
    cp = run("scontrol", "show", "job", "-o", str(job_id), timeout=timeout, check=False)
    if cp.returncode != 0:
        if "Invalid job id" in cp.stderr + cp.stdout:
            return []
        raise SlurmToolError(f"`scontrol show job {job_id}` exited {cp.returncode}: {cp.stderr.strip()[:500]}")
    return parse_scontrol(cp.stdout)


def sacct(job_ids: Iterable[str], fields: Sequence[str] = SACCT_FIELDS, *, all_attempts: bool = True,
          allocations: bool = True, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, str]]:
    """Accounting rows, oldest attempt first: `sacct -n -P [-D] [-X] -j IDS --format=...`.

    Raises SlurmToolError when accounting does not answer (no slurmdbd): callers fall back."""
    ids = _ids(job_ids)
    if not ids:
        return []
    argv = ["-n", "-P", "-j", ",".join(ids), "--format=" + ",".join(fields)]
    if all_attempts:
        argv.append("-D")
    if allocations:
        argv.append("-X")
    cp = run("sacct", *argv, timeout=timeout)
    return parse_delimited(cp.stdout, fields)


def sinfo_nodes(partition: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, str]]:
    fields = ("node", "partition", "cpus", "memory", "gres", "state")
    argv = ["-h", "-N", "-o", "%N|%R|%c|%m|%G|%t"]
    if partition:
        argv += ["-p", partition]
    return parse_delimited(run("sinfo", *argv, timeout=timeout).stdout, fields)


def scontrol_show(kind: str, name: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, str]]:
    """`scontrol show partition|node [NAME] -o` as records; [] when NAME is unknown."""
    argv = ["show", kind, *([name] if name else []), "-o"]
    cp = run("scontrol", *argv, timeout=timeout, check=False)
    if cp.returncode != 0:
        if re.search(r"not found|Invalid", cp.stderr + cp.stdout, re.I):
            return []
        raise SlurmToolError(f"`scontrol {' '.join(argv)}` exited {cp.returncode}: {cp.stderr.strip()[:500]}")
    return parse_scontrol(cp.stdout)


def scancel(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> None:
    ids = _ids(job_ids)
    if ids:
        run("scancel", *ids, timeout=timeout)


@dataclass(frozen=True)
class Attempt:
    """One row of `sacct -D -X`: one run of a job (a requeued job has several)."""

    job_id: str
    state: str
    exit_code: int | None
    signal: int | None
    elapsed_s: int
    gpus: int
    cpus: int
    nodes: int
    node_list: str
    partition: str
    start: str
    end: str
    time_limit_s: int | None
    name: str

    @classmethod
    def from_sacct(cls, row: dict[str, str]) -> "Attempt":
        code, sig = parse_exit_code(row.get("ExitCode"))
        elapsed = row.get("ElapsedRaw", "")
        return cls(
            job_id=row.get("JobID", ""), state=state_word(row.get("State")), exit_code=code, signal=sig,
            elapsed_s=parse_int(elapsed) if elapsed.strip().isdigit() else (parse_duration(row.get("Elapsed")) or 0),
            gpus=gpus_in_tres(row.get("AllocTRES")), cpus=parse_int(row.get("AllocCPUS")), nodes=parse_int(row.get("NNodes")),
            node_list=row.get("NodeList", ""), partition=row.get("Partition", ""), start=row.get("Start", ""),
            end=row.get("End", ""), time_limit_s=parse_duration(row.get("Timelimit")), name=row.get("JobName", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "exit_code": self.exit_code, "signal": self.signal,
                "elapsed_s": self.elapsed_s, "gpus": self.gpus, "cpus": self.cpus, "nodes": self.nodes,
                "node_list": self.node_list, "partition": self.partition, "start": self.start, "end": self.end}


# --------------------------------------------------------------------------- job ids and attempts

def base_job_id(job_id: str) -> str:
    """The submitted job's id of an array task or a step: '123_4' and '123.batch' -> '123'."""
    return job_id.split("_")[0].split(".")[0]


def display_id(rec: dict[str, str]) -> str:
    """An scontrol record's job id as squeue and sacct show it: ARRAYJOB_TASK for an array task."""
    aj, at = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
    if aj and at and at not in ("N/A", "(null)"):
        return f"{aj}_{at}"
    return rec.get("JobId", "")


def group_attempts(rows: list[dict[str, str]]) -> dict[str, list[Attempt]]:
    """`sacct -D -X` rows as job id -> its attempts, oldest first: by submit time (a requeue submits
    again), then start, then sacct's order."""
    out: dict[str, list[tuple[tuple[str, str, str], Attempt]]] = {}
    for i, row in enumerate(rows):
        a = Attempt.from_sacct(row)
        if a.job_id:
            late = "9999"
            key = (row.get("Submit") or late, a.start if a.start[:1].isdigit() else late, f"{i:09d}")
            out.setdefault(a.job_id, []).append((key, a))
    return {j: [a for _, a in sorted(group, key=lambda x: x[0])] for j, group in out.items()}
