"""A real Slurm cluster on this machine, for the tests under tests/cluster.

One controller (slurmctld) in the root network namespace, two compute nodes (slurmd ``node1`` and
``node2``) each in its own network namespace (``n1``/``n2``, interface ``eth0``, 10.77.0.11/.12 on a
bridge 10.77.0.1/24), munge, and accounting (slurmdbd on a private MariaDB), so ``sacct`` answers.
The nodes are GPU-shaped (``Gres=gpu:h100:2`` backed by character-device stand-ins), so GPU requests
are scheduled and accounted for real while the processes compute on CPU.

Everything lives under one root folder (default /var/tmp/launcher-slurmlab): its own SLURM_CONF,
munge socket and key, MariaDB data folder, state, spool, pid and log files. Outside that folder the
lab touches only: the network namespaces ``n1``/``n2``, the bridge ``slurmlab0`` (and veth ``slv-n1``/
``slv-n2``), and a marked block in /etc/hosts that names node1/node2. /etc/slurm is never read or
written (every tool gets SLURM_CONF; plugstack.conf is pinned beside slurm.conf).

Plain module (no pytest import): usable from a shell too::

    python3 tests/cluster/slurmlab.py start|status|stop|purge   (start pins the cluster until stop)

Needs root, Debian's slurm-wlm/slurmdbd/munge/mariadb-server packages (``.ci/install-slurm.sh``) and
permission to create network namespaces. Verified with Slurm 22.05 on Debian 12.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_ROOT = "/var/tmp/launcher-slurmlab"
HARNESS_VERSION = 1  # bump when the rendered configuration changes meaningfully

# Job states after which a job does not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "REVOKED",
    }
)
# Node states (sinfo %t, lower case) in which a node can take work.
_USABLE_NODE_STATES = frozenset({"idle", "alloc", "mix", "comp"})

_DAEMON_NAMES = frozenset({"munged", "mariadbd", "mysqld", "slurmdbd", "slurmctld", "slurmd", "slurmstepd"})
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_REQUIRED_TOOLS = (
    "munged", "munge", "unmunge", "mariadbd", "mariadb-admin", "mariadb-install-db", "mariadb", "slurmctld", "slurmd", "slurmdbd",
    "sbatch", "srun", "squeue", "sinfo", "scontrol", "sacct", "sacctmgr", "ip", "setpriv", "setsid", "mknod",
)


class SlurmLabError(RuntimeError):
    """The lab cluster could not be started, or a command against it failed or timed out."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    return "\n".join(data.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    """True when pid runs and is not a zombie (nobody may reap orphans here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _proc_start_time(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot): tells a pid apart from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :].split()[19].decode()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _environ_has(pid: int, entry: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry.encode() in f.read().split(b"\0")
    except OSError:
        return False


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class SlurmLab:
    """Handle on the lab cluster rooted at ``root``. Get one with :meth:`ensure`."""

    CLUSTER = "launcherlab"
    PARTITION = "debug"
    NODES = ("node1", "node2")
    NETNS = {"node1": "n1", "node2": "n2"}
    NODE_ADDR = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
    VETH = {"node1": "slv-n1", "node2": "slv-n2"}
    IFNAME = "eth0"  # the nodes' interface, for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    BRIDGE = "slurmlab0"
    BRIDGE_ADDR = "10.77.0.1"
    PREFIX = 24
    CPUS = 2
    REAL_MEMORY_MB = 4000
    GPUS_PER_NODE = 2
    GPU_TYPE = "h100"
    SLURMCTLD_PORT = 6917
    SLURMD_PORT = 6918
    SLURMDBD_PORT = 6919
    MYSQL_PORT = 3307
    DB_NAME = "slurm_acct_db"
    DB_USER = "slurm"
    DB_PASS = "slurmlab"
    HOSTS_BEGIN = "# BEGIN launcher-slurmlab (tests/cluster/slurmlab.py)"
    HOSTS_END = "# END launcher-slurmlab"
    # Settings that `scontrol reconfigure` applies to a running cluster (see set_config()).
    DEFAULT_KNOBS = {"min_job_age": 30, "kill_wait": 10, "requeue_exit": "", "requeue_exit_hold": ""}

    _available_cache: tuple[bool, str] | None = None

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root).resolve()
        self.etc = self.root / "etc"
        self.conf_path = self.etc / "slurm.conf"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.jobs_dir = self.root / "jobs"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.mysql_dir = self.root / "mysql"
        self.mysql_data = self.mysql_dir / "data"
        self.mysql_run = self.mysql_dir / "run"
        self.mysql_socket = self.mysql_run / "mysqld.sock"
        self.gpu_dir = self.root / "dev"
        self.state_file = self.root / "lab.json"
        self.hostname = _short_hostname()
        self.knobs: dict = dict(self.DEFAULT_KNOBS)
        self.reused = False  # ensure() found a healthy cluster and did not start anything
        self.start_seconds = 0.0  # how long ensure() took
        self._load_state()

    # ------------------------------------------------------------------ public API

    @property
    def env(self) -> dict[str, str]:
        """Variables to add to a subprocess's environment to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    def subprocess_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ + :attr:`env` (+ extra): a complete environment for subprocess calls."""
        env = dict(os.environ)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.NODES

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this machine can run the lab; else (False, why).

        Needs Linux, root, the packages (installed here with .ci/install-slurm.sh when missing), and
        permission to create network namespaces and a bridge. The answer is cached per process.
        """
        if cls._available_cache is None:
            cls._available_cache = cls._check_available()
        return cls._available_cache

    @classmethod
    def ensure(
        cls,
        root: str | os.PathLike = DEFAULT_ROOT,
        *,
        min_job_age: int | None = None,
        kill_wait: int | None = None,
        requeue_exit: str | None = None,
        requeue_exit_hold: str | None = None,
        timeout: float = 240.0,
        keep: bool = False,
    ) -> "SlurmLab":
        """Return a handle on a healthy lab cluster, starting or restarting it as needed.

        A healthy cluster (left by this or another process, same configuration) is reused as is;
        a broken or differently configured one is stopped and started afresh (empty job state and
        accounting database). Concurrent callers are serialised by a lock file. The keyword
        settings are applied with ``scontrol reconfigure`` when they differ from the running ones;
        None keeps the running value (default on a fresh start: MinJobAge=30, KillWait=10, no
        RequeueExit). Raises SlurmLabError (with daemon log tails) on failure.

        The calling process takes a lease on the cluster: leave() stops the cluster only when no
        other live process holds one, so concurrent test sessions on one machine share it safely.
        keep=True pins it (as the command line ``start`` does) until an explicit stop().
        """
        ok, reason = cls.available()
        if not ok:
            raise SlurmLabError(f"Slurm lab unavailable: {reason}")
        t0 = time.monotonic()
        lab = cls(root)
        lab.root.mkdir(parents=True, exist_ok=True)
        os.chmod(lab.root, 0o755)
        with lab._lock():
            lab._load_state()
            wanted = {
                k: v
                for k, v in dict(
                    min_job_age=min_job_age, kill_wait=kill_wait, requeue_exit=requeue_exit,
                    requeue_exit_hold=requeue_exit_hold,
                ).items()
                if v is not None
            }
            problem = lab._health_problem()
            if problem is None:
                lab.reused = True
                if wanted:
                    lab._set_config_locked(wanted, timeout=60)
            else:
                lab.knobs = dict(cls.DEFAULT_KNOBS)
                lab.knobs.update({k: (str(v) if k.startswith("requeue") else int(v)) for k, v in wanted.items()})
                lab._log_event(f"(re)starting cluster: {problem}")
                lab._stop_locked(teardown_network=False)
                lab._start_locked(deadline=time.monotonic() + timeout)
            lab._add_lease(keep=keep)
        lab.start_seconds = time.monotonic() - t0
        return lab

    def stop(self, *, purge: bool = False) -> None:
        """Stop every process the lab started (daemons and any job processes, whoever submitted
        them), remove the namespaces, bridge and /etc/hosts block, drop all leases. Logs stay under
        the root folder; ``purge=True`` removes the whole root folder too (the next start then
        re-initialises MariaDB, about 2 s more)."""
        with self._lock():
            self._stop_all_locked()
        if purge:
            shutil.rmtree(self.root, ignore_errors=True)

    def leave(self) -> bool:
        """Drop this process's lease; stop the cluster (as stop()) if no other live process holds
        one and it is not pinned. Returns True when it stopped the cluster."""
        with self._lock():
            with contextlib.suppress(FileNotFoundError):
                (self.root / "leases" / str(os.getpid())).unlink()
            others = self._live_leases()
            if others:
                self._log_event(f"leave: cluster kept running for {others}")
                return False
            self._stop_all_locked()
            return True

    def _stop_all_locked(self) -> None:
        self._stop_locked(teardown_network=True)
        self._remove_hosts_block()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        shutil.rmtree(self.root / "leases", ignore_errors=True)

    def _add_lease(self, keep: bool = False) -> None:
        d = self.root / "leases"
        d.mkdir(parents=True, exist_ok=True)
        if keep:
            (d / "keep").write_text("pinned by ensure(keep=True) or the command line; stop() removes it\n")
        (d / str(os.getpid())).write_text(_proc_start_time(os.getpid()) or "")

    def _live_leases(self) -> list[str]:
        """Lease holders still running (pids as strings, and "keep" when pinned); drops stale ones."""
        d = self.root / "leases"
        live = []
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            if f.name == "keep":
                live.append("keep")
                continue
            try:
                pid, started = int(f.name), f.read_text().strip()
            except (ValueError, OSError):
                continue
            if _pid_alive(pid) and (not started or _proc_start_time(pid) == started):
                live.append(str(pid))
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
        return live

    def is_healthy(self) -> bool:
        return self._health_problem() is None

    def set_config(self, *, timeout: float = 60, **knobs) -> None:
        """Change min_job_age / kill_wait / requeue_exit / requeue_exit_hold on the running cluster
        (rewrites slurm.conf, ``scontrol reconfigure``, waits until the controller reports it).

        Note the controller purges finished jobs only every 60 s, so a job is forgotten between
        MinJobAge and MinJobAge + 60 s after it ends (see wait_forgotten())."""
        with self._lock():
            self._set_config_locked(knobs, timeout=timeout)

    def cmd(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,
            cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command (e.g. ``lab.cmd("sinfo", "-N")``) with SLURM_CONF set; text output.
        check=True raises SlurmLabError with its output when it exits non-zero."""
        try:
            cp = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                cwd=str(cwd) if cwd else None, env=self.subprocess_env(env),
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmLabError(f"timed out after {timeout}s: {shlex.join(argv)}") from exc
        if check and cp.returncode != 0:
            raise SlurmLabError(
                f"{shlex.join(argv)} exited {cp.returncode}\nstdout: {cp.stdout.strip()}\n"
                f"stderr: {cp.stderr.strip()}"
            )
        return cp

    def sbatch(self, script: str | os.PathLike, *args: str, cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None, timeout: float = 60) -> int:
        """Submit a batch script and return its job id.

        ``script`` is a path to a script file, or the script's text (anything containing a newline
        or starting with ``#!``; it is written to a file under ROOT/jobs). ``args`` are extra sbatch
        options (before the script). The job runs in ``cwd`` (default ROOT/jobs, so default
        slurm-%j.out files land there, not in the repository) with os.environ + lab.env + env.
        """
        text = str(script) if not isinstance(script, os.PathLike) else None
        if text is not None and ("\n" in text or text.startswith("#!")):
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.jobs_dir)
            with os.fdopen(fd, "w") as f:
                f.write(text if text.startswith("#!") else "#!/bin/bash\n" + text)
            os.chmod(name, 0o755)
            path = name
        else:
            path = str(script)
        workdir = Path(cwd) if cwd else self.jobs_dir
        workdir.mkdir(parents=True, exist_ok=True)
        cp = self.cmd("sbatch", "--parsable", *args, path, cwd=workdir, env=env, timeout=timeout)
        out = cp.stdout.strip().splitlines()
        m = re.match(r"^(\d+)", out[-1] if out else "")
        if not m:
            raise SlurmLabError(f"sbatch gave no job id: {cp.stdout!r} {cp.stderr!r}")
        return int(m.group(1))

    def scontrol_show_job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, Reason, NodeList, ...).
        Returns {} once the controller has forgotten the job (after MinJobAge)."""
        # A controller busy starting an array's tasks on this 2-core machine now and then fails a query
        # with no message (seen once in CI for a task of a just-submitted array): ask again, briefly.
        for tries_left in (2, 1, 0):
            cp = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=30)
            if cp.returncode == 0:
                break
            if "Invalid job id" in cp.stderr or "Invalid job id" in cp.stdout:
                return {}
            if not tries_left:
                raise SlurmLabError(f"scontrol show job {job_id} failed (exit {cp.returncode}): "
                                    f"{(cp.stderr or cp.stdout).strip()}")
            time.sleep(2)
        line = cp.stdout.strip().splitlines()[0] if cp.stdout.strip() else ""
        return _parse_scontrol_line(line)

    def sacct(self, job_id: int | str, fields: str | Sequence[str] = ("JobID", "State", "ExitCode"),
              all_attempts: bool = False, steps: bool = False) -> list[dict[str, str]]:
        """Accounting rows of a job: one dict per row, keyed by the requested field names.

        Default is allocations only (``-X``, one row per attempt); ``steps=True`` adds the step
        rows. ``all_attempts=True`` passes ``-D`` (every requeued attempt, oldest first); without it
        sacct shows only the latest attempt. Slurm 22.05's sacct has no Restarts field.
        """
        names = [f.strip() for f in (fields.split(",") if isinstance(fields, str) else fields) if f.strip()]
        argv = ["sacct", "-n", "-P", "-j", str(job_id), "--format=" + ",".join(names)]
        if not steps:
            argv.append("-X")
        if all_attempts:
            argv.append("-D")
        cp = self.cmd(*argv, timeout=30)
        rows = []
        for line in cp.stdout.splitlines():
            if not line.strip():
                continue
            values = line.split("|")
            rows.append(dict(zip(names, values + [""] * (len(names) - len(values)))))
        return rows

    def job_state(self, job_id: int | str) -> str | None:
        """The job's state: from the controller while it remembers the job, else sacct's latest
        attempt (first word, e.g. "CANCELLED" from "CANCELLED by 0"); None if neither knows it."""
        info = self.scontrol_show_job(job_id)
        if info.get("JobState"):
            return info["JobState"]
        rows = self.sacct(job_id, ["State"])
        return rows[-1]["State"].split()[0] if rows and rows[-1]["State"] else None

    def wait_job(self, job_id: int | str, timeout: float = 300, *, release_requeued: bool = False,
                 poll: float = 1.0) -> str:
        """Wait until the job reached a terminal state and sacct has recorded it; return that state
        (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...; first word only).

        A requeued job is pending again, not finished: this keeps waiting. With
        release_requeued=True it releases such a job at once (StartTime=now) instead of letting it
        sit out Slurm's ~120 s requeue hold. Raises SlurmLabError on timeout."""
        deadline = time.monotonic() + timeout
        ctld_state = None
        unsettled_since = None
        while True:
            info = self.scontrol_show_job(job_id)
            ctld_state = info.get("JobState") if info else None
            if release_requeued and info and ctld_state == "PENDING" and info.get("Restarts", "0") != "0" \
                    and info.get("Reason") in ("BeginTime", "JobHeldAdmin", "JobHeldUser"):
                self.release(job_id)
            if ctld_state is None or ctld_state in TERMINAL_STATES:
                rows = self.sacct(job_id, ["State", "JobName", "NodeList"])
                row = rows[-1] if rows else {}
                acct = row["State"].split()[0] if row.get("State") else ""
                if acct in TERMINAL_STATES and (ctld_state is None or acct == ctld_state):
                    # The accounting record fills in from separate start and end messages; for a
                    # short job the end can land first (JobName "allocation", no nodes) for a moment.
                    settled = ctld_state is None or (
                        row.get("JobName") == info.get("JobName")
                        and (info.get("NodeList", "(null)") in ("", "(null)") or row.get("NodeList") == info["NodeList"])
                    )
                    unsettled_since = unsettled_since or time.monotonic()
                    if settled or time.monotonic() - unsettled_since > 20:
                        return acct
            if time.monotonic() > deadline:
                raise SlurmLabError(
                    f"job {job_id} not finished after {timeout}s (controller: {ctld_state}); "
                    f"scontrol: {info}\n{self.diagnostics(lines=15)}"
                )
            time.sleep(poll)

    def wait_state(self, job_id: int | str, states: Iterable[str], timeout: float = 120,
                   poll: float = 0.5) -> str:
        """Wait until the controller reports the job in one of ``states`` (e.g. {"RUNNING"})."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.scontrol_show_job(job_id).get("JobState")
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                raise SlurmLabError(f"job {job_id} not in {sorted(wanted)} after {timeout}s (is {state})")
            time.sleep(poll)

    def wait_forgotten(self, job_id: int | str, timeout: float | None = None, poll: float = 2.0) -> None:
        """Wait until the controller no longer knows the (finished) job; only sacct answers then.
        Takes MinJobAge plus up to 60 s (the controller's purge interval). Default timeout:
        min_job_age + 120 s."""
        if timeout is None:
            timeout = int(self.knobs["min_job_age"]) + 120
        deadline = time.monotonic() + timeout
        while self.scontrol_show_job(job_id):
            if time.monotonic() > deadline:
                raise SlurmLabError(f"controller still remembers job {job_id} after {timeout}s")
            time.sleep(poll)

    def release(self, job_id: int | str) -> None:
        """Let a requeued (BeginTime-held) job start now: ``scontrol update JobId=J StartTime=now``;
        also releases a held job."""
        info = self.scontrol_show_job(job_id)
        if info.get("Reason") in ("JobHeldAdmin", "JobHeldUser") or info.get("Priority") == "0":
            self.cmd("scontrol", "release", str(job_id), check=False)
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def node_states(self) -> dict[str, str]:
        """{node: sinfo state (idle, alloc, mix, down*, ...)}."""
        cp = self.cmd("sinfo", "-h", "-N", "-p", self.PARTITION, "-o", "%N %t", timeout=20)
        out = {}
        for line in cp.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            with contextlib.suppress(SlurmLabError):
                states = self.node_states()
            if all(states.get(n) == "idle" for n in self.NODES):
                return
            if time.monotonic() > deadline:
                raise SlurmLabError(f"nodes not idle after {timeout}s: {states}")
            time.sleep(0.5)

    def log_path(self, name: str) -> Path:
        """Log file of a daemon: munged, mariadb, slurmdbd, slurmctld, slurmd-node1, slurmd-node2."""
        return {
            "munged": self.log_dir / "munged.log",
            "mariadb": self.mysql_run / "mariadb.err",
        }.get(name, self.log_dir / f"{name}.log")

    def diagnostics(self, lines: int = 30) -> str:
        """Tails of every daemon log, for error messages."""
        parts = []
        for name in ("slurmctld", "slurmd-node1", "slurmd-node2", "slurmdbd", "mariadb", "munged"):
            parts.append(f"--- {self.log_path(name)} (last {lines} lines)\n{_tail(self.log_path(name), lines)}")
            out = self.log_dir / f"{name}.out"
            if out.exists() and out.stat().st_size:
                parts.append(f"--- {out}\n{_tail(out, 10)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ availability

    @classmethod
    def _check_available(cls) -> tuple[bool, str]:
        if not sys.platform.startswith("linux"):
            return False, "the Slurm lab needs Linux"
        if os.geteuid() != 0:
            return False, "the Slurm lab needs root (network namespaces, munge, slurmd as root)"
        missing = [t for t in _REQUIRED_TOOLS if not _which(t)]
        if missing:
            script = Path(__file__).resolve().parents[2] / ".ci" / "install-slurm.sh"
            if not script.exists():
                return False, f"missing tools {missing} and no {script} to install them"
            try:
                cp = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                return False, f"{script} timed out installing packages (missing tools: {missing})"
            if cp.returncode != 0:
                tail = "\n".join((cp.stdout + cp.stderr).splitlines()[-15:])
                return False, f"could not install the Slurm packages with {script}:\n{tail}"
            missing = [t for t in _REQUIRED_TOOLS if not _which(t)]
            if missing:
                return False, f"tools still missing after {script}: {missing}"
        probe = f"slprobe{os.getpid() % 100000}"
        try:
            cp = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
            if cp.returncode != 0:
                return False, f"'ip netns add' not permitted here: {cp.stderr.strip()}"
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
            cp = subprocess.run(["ip", "link", "add", probe, "type", "bridge"], capture_output=True, text=True,
                                timeout=20)
            if cp.returncode != 0 and "File exists" not in cp.stderr:
                return False, f"cannot create a bridge: {cp.stderr.strip()}"
            subprocess.run(["ip", "link", "del", probe], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"cannot probe network namespaces: {exc}"
        return True, ""

    # ------------------------------------------------------------------ state, lock, health

    @contextlib.contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        if isinstance(state.get("knobs"), dict):
            self.knobs = {**self.DEFAULT_KNOBS, **state["knobs"]}
        return state

    def _save_state(self, **updates) -> None:
        state = {}
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self.state_file.read_text())
        state.update(updates)
        state["knobs"] = self.knobs
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _log_event(self, msg: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "slurmlab.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()} {msg}\n")

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"v{HARNESS_VERSION} {self.hostname} {self.root}\n".encode())
        for text in (self._slurm_conf({}), self._gres_conf(), self._cgroup_conf(), self._slurmdbd_conf()):
            h.update(text.encode())
        return h.hexdigest()[:16]

    def _expected_daemons(self) -> dict[str, tuple[str, ...]]:
        """name -> substrings that the daemon's cmdline must contain."""
        return {
            "munged": ("munged", str(self.munge_socket)),
            "mariadb": ("mariadbd", str(self.mysql_data)),
            "slurmdbd": ("slurmdbd",),
            "slurmctld": ("slurmctld", str(self.conf_path)),
            **{f"slurmd-{n}": ("slurmd", str(self.conf_path), n) for n in self.NODES},
        }

    def _daemon_alive(self, name: str, pid: int | None) -> bool:
        if not pid or not _pid_alive(pid):
            return False
        cmd = " ".join(_cmdline(pid))
        if not all(s in cmd for s in self._expected_daemons()[name]):
            return False
        if name == "slurmdbd":
            return _environ_has(pid, f"SLURM_CONF={self.conf_path}")
        return True

    def _health_problem(self, attempts: int = 3) -> str | None:
        """None when the running cluster can be reused as is, else what is wrong. A failing query
        (a busy 2-core machine can be slow to answer) is retried before the cluster counts as broken:
        a restart would kill the jobs of every session sharing it."""
        for i in range(attempts):
            problem = self._health_problem_once()
            if problem is None or problem.startswith("!") or i == attempts - 1:
                return problem.lstrip("!") if problem else None
            time.sleep(2)
        return None

    def _health_problem_once(self) -> str | None:
        state = self._load_state()
        if not state:
            return "!no cluster state"
        if state.get("fingerprint") != self._fingerprint():
            return "!configuration changed or start unfinished"
        pids = state.get("pids", {})
        for name in self._expected_daemons():
            if not self._daemon_alive(name, pids.get(name)):
                return f"!{name} not running"
        for node, ns in self.NETNS.items():
            cp = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", self.IFNAME],
                                capture_output=True, text=True)
            if cp.returncode != 0 or self.NODE_ADDR[node] not in cp.stdout:
                return f"network namespace {ns} missing or without {self.NODE_ADDR[node]}"
        try:
            states = self.node_states()
        except SlurmLabError as exc:
            return f"sinfo failed: {exc}"
        for n in self.NODES:
            if states.get(n) not in _USABLE_NODE_STATES:
                return f"{n} is {states.get(n)}"
        cp = self.cmd("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster", check=False, timeout=20)
        if cp.returncode != 0 or self.CLUSTER not in cp.stdout.split():
            return f"accounting not answering: {cp.stderr.strip() or cp.stdout.strip()}"
        return None

    # ------------------------------------------------------------------ configuration files

    def _slurm_conf(self, knobs: dict | None = None) -> str:
        """slurm.conf; knobs=None renders the current knobs, {} renders without them (fingerprint)."""
        k = self.knobs if knobs is None else knobs
        r = self.root
        lines = [
            "# Generated by tests/cluster/slurmlab.py; rewritten on every start.",
            f"ClusterName={self.CLUSTER}",
            f"SlurmctldHost={self.hostname}({self.BRIDGE_ADDR})",
            f"SlurmctldPort={self.SLURMCTLD_PORT}",
            f"SlurmdPort={self.SLURMD_PORT}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state/slurmctld",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={self.run_dir}/slurmctld.pid",
            f"SlurmdPidFile={self.run_dir}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={self.etc}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "JobRequeue=1",
            "InactiveLimit=0",
            "Waittime=0",
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=10",
            "AccountingStorageType=accounting_storage/slurmdbd",
            f"AccountingStorageHost={self.BRIDGE_ADDR}",
            f"AccountingStoragePort={self.SLURMDBD_PORT}",
            # Connections to slurmdbd authenticate with the munge socket named here, not AuthInfo's.
            f"AccountingStoragePass={self.munge_socket}",
            "AccountingStorageTRES=gres/gpu",
            "JobCompType=jobcomp/none",
        ]
        if k:
            lines += [f"MinJobAge={int(k['min_job_age'])}", f"KillWait={int(k['kill_wait'])}"]
            if str(k.get("requeue_exit", "")).strip():
                lines.append(f"RequeueExit={k['requeue_exit']}")
            if str(k.get("requeue_exit_hold", "")).strip():
                lines.append(f"RequeueExitHold={k['requeue_exit_hold']}")
        gres = f"gpu:{self.GPU_TYPE}:{self.GPUS_PER_NODE}"
        for n in self.NODES:
            lines.append(
                f"NodeName={n} NodeAddr={self.NODE_ADDR[n]} CPUs={self.CPUS} RealMemory={self.REAL_MEMORY_MB} "
                f"Gres={gres} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.PARTITION} Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE "
            "OverSubscribe=YES State=UP"
        )
        return "\n".join(lines) + "\n"

    def _gres_conf(self) -> str:
        last = self.GPUS_PER_NODE - 1
        return (
            "AutoDetect=off\n"
            f"NodeName=node[1-{len(self.NODES)}] Name=gpu Type={self.GPU_TYPE} File={self.gpu_dir}/gpu[0-{last}]\n"
        )

    def _cgroup_conf(self) -> str:
        # Not used for tracking (proctrack/linuxproc, task/none), but slurmd loads the cgroup
        # plugin and its autodetection fails on this machine's cgroup v1 layout.
        return "CgroupPlugin=cgroup/v1\n"

    def _slurmdbd_conf(self) -> str:
        return "\n".join([
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"DbdHost={self.hostname}",
            f"DbdAddr={self.BRIDGE_ADDR}",
            f"DbdPort={self.SLURMDBD_PORT}",
            "SlurmUser=root",
            "DebugLevel=info",
            f"LogFile={self.log_dir}/slurmdbd.log",
            f"PidFile={self.run_dir}/slurmdbd.pid",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.MYSQL_PORT}",
            f"StorageUser={self.DB_USER}",
            f"StoragePass={self.DB_PASS}",
            f"StorageLoc={self.DB_NAME}",
        ]) + "\n"

    def _write_configs(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        self._write(self.conf_path, self._slurm_conf())
        self._write(self.etc / "gres.conf", self._gres_conf())
        self._write(self.etc / "cgroup.conf", self._cgroup_conf())
        self._write(self.etc / "plugstack.conf", "")
        self._write(self.etc / "slurmdbd.conf", self._slurmdbd_conf(), mode=0o600)

    @staticmethod
    def _write(path: Path, text: str, mode: int = 0o644) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def _set_config_locked(self, knobs: dict, timeout: float) -> None:
        unknown = set(knobs) - set(self.DEFAULT_KNOBS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(self.DEFAULT_KNOBS)}")
        new = dict(self.knobs)
        for key, value in knobs.items():
            new[key] = str(value) if key.startswith("requeue") else int(value)
        if new == self.knobs:
            return
        self.knobs = new
        self._write(self.conf_path, self._slurm_conf())
        self._save_state()
        self.cmd("scontrol", "reconfigure", timeout=60)
        deadline = time.monotonic() + timeout
        want_age, want_wait = str(new["min_job_age"]), str(new["kill_wait"])
        while True:
            cfg = self.cmd("scontrol", "show", "config", timeout=30).stdout
            age = re.search(r"^MinJobAge\s*=\s*(\d+)", cfg, re.M)
            wait = re.search(r"^KillWait\s*=\s*(\d+)", cfg, re.M)
            if age and wait and age.group(1) == want_age and wait.group(1) == want_wait:
                break
            if time.monotonic() > deadline:
                raise SlurmLabError(f"reconfigure not applied after {timeout}s\n{self.diagnostics(15)}")
            time.sleep(0.5)
        self._log_event(f"reconfigured: {new}")

    # ------------------------------------------------------------------ start

    def _start_locked(self, deadline: float) -> None:
        t0 = time.monotonic()
        for d in (self.etc, self.log_dir, self.run_dir, self.jobs_dir, self.gpu_dir, self.root / "state",
                  self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        # Fresh job state: the accounting database is recreated too, so job ids never collide.
        shutil.rmtree(self.root / "state" / "slurmctld", ignore_errors=True)
        shutil.rmtree(self.root / "spool", ignore_errors=True)
        (self.root / "state" / "slurmctld").mkdir(parents=True)
        for n in self.NODES:
            (self.root / "spool" / n).mkdir(parents=True)
        self._rotate_logs()
        self._make_gpu_devices()
        self._write_configs()
        self._setup_network()
        self._write_hosts_block()
        pids: dict[str, int] = {}
        self._save_state(fingerprint=None, pids=pids)

        pids["munged"] = self._start_munge(deadline)
        self._save_state(pids=pids)
        pids["mariadb"] = self._start_mariadb(deadline)
        self._save_state(pids=pids)
        self._mysql(
            f"DROP DATABASE IF EXISTS {self.DB_NAME}; CREATE DATABASE {self.DB_NAME};"
            f"CREATE USER IF NOT EXISTS '{self.DB_USER}'@'127.0.0.1' IDENTIFIED BY '{self.DB_PASS}';"
            f"CREATE USER IF NOT EXISTS '{self.DB_USER}'@'localhost' IDENTIFIED BY '{self.DB_PASS}';"
            f"GRANT ALL ON {self.DB_NAME}.* TO '{self.DB_USER}'@'127.0.0.1';"
            f"GRANT ALL ON {self.DB_NAME}.* TO '{self.DB_USER}'@'localhost'; FLUSH PRIVILEGES;"
        )
        pids["slurmdbd"] = self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._save_state(pids=pids)
        self._wait(lambda: self._ok("sacctmgr", "-n", "show", "cluster"), deadline, "slurmdbd to answer",
                   ["slurmdbd", "mariadb"], pid=pids["slurmdbd"])
        cp = self.cmd("sacctmgr", "-i", "add", "cluster", self.CLUSTER, check=False, timeout=30)
        if cp.returncode != 0 and "already exists" not in (cp.stdout + cp.stderr):
            raise SlurmLabError(f"sacctmgr add cluster failed: {cp.stdout} {cp.stderr}\n{self.diagnostics(20)}")

        pids["slurmctld"] = self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf_path)])
        self._save_state(pids=pids)
        self._wait(lambda: self._ok("scontrol", "ping") and "UP" in self.cmd("scontrol", "ping", check=False).stdout,
                   deadline, "slurmctld to answer", ["slurmctld"], pid=pids["slurmctld"])
        for n in self.NODES:
            pids[f"slurmd-{n}"] = self._spawn(
                f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf_path)], netns=self.NETNS[n]
            )
        self._save_state(pids=pids)

        def nodes_idle() -> bool:
            try:
                states = self.node_states()
            except SlurmLabError:
                return False
            return all(states.get(n) == "idle" for n in self.NODES)

        self._wait(nodes_idle, deadline, "node1 and node2 to be idle",
                   ["slurmctld", "slurmd-node1", "slurmd-node2"],
                   pid=[pids["slurmd-node1"], pids["slurmd-node2"], pids["slurmctld"]])
        self._wait(lambda: self.CLUSTER in self.cmd("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster",
                                                    check=False).stdout.split(),
                   deadline, "cluster registered in accounting", ["slurmdbd", "slurmctld"])
        self._save_state(fingerprint=self._fingerprint(), pids=pids, started=time.time())
        self._log_event(f"started in {time.monotonic() - t0:.1f}s: pids {pids}")

    def _ok(self, *argv: str) -> bool:
        try:
            return self.cmd(*argv, check=False, timeout=15).returncode == 0
        except SlurmLabError:
            return False

    def _wait(self, predicate, deadline: float, what: str, logs: Sequence[str], pid=None) -> None:
        pids = [pid] if isinstance(pid, int) else list(pid or [])
        while True:
            if predicate():
                return
            dead = [p for p in pids if not _pid_alive(p)]
            if dead or time.monotonic() > deadline:
                why = f"process {dead} exited" if dead else "timed out"
                tails = []
                for name in logs:
                    tails.append(f"--- {self.log_path(name)}\n{_tail(self.log_path(name), 30)}")
                    out = self.log_dir / f"{name}.out"
                    if out.exists() and out.stat().st_size:
                        tails.append(f"--- {out}\n{_tail(out, 15)}")
                raise SlurmLabError(f"Slurm lab: waiting for {what}: {why}\n" + "\n".join(tails))
            time.sleep(0.3)

    def _spawn(self, name: str, argv: list[str], *, netns: str | None = None, user: str | None = None) -> int:
        """Start a long-running daemon in its own session, detached from this process (it is
        re-parented at once, so it outlives pytest and never becomes our zombie). Returns its pid."""
        cmd = list(argv)
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd  # ip execs the command: same pid
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] + cmd
        out = self.log_dir / f"{name}.out"
        env = {"PATH": _SBIN_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}
        shell = f'setsid "$@" >>{shlex.quote(str(out))} 2>&1 </dev/null & echo $!'
        cp = subprocess.run(["/bin/sh", "-c", shell, "sh", *cmd], capture_output=True, text=True, env=env,
                            cwd=str(self.root), timeout=30)
        try:
            pid = int(cp.stdout.strip())
        except ValueError:
            raise SlurmLabError(f"could not start {name}: {cp.stdout!r} {cp.stderr!r}") from None
        self._log_event(f"spawned {name} pid={pid}: {shlex.join(cmd)}")
        return pid

    def _rotate_logs(self) -> None:
        prev = self.root / "log.prev"
        shutil.rmtree(prev, ignore_errors=True)
        if self.log_dir.exists():
            shutil.copytree(self.log_dir, prev, dirs_exist_ok=True)
            for f in self.log_dir.iterdir():
                if f.is_file() and f.name != "slurmlab.log":
                    f.unlink()

    def _make_gpu_devices(self) -> None:
        for i in range(self.GPUS_PER_NODE):
            dev = self.gpu_dir / f"gpu{i}"
            try:
                st = os.lstat(dev)
                if stat.S_ISCHR(st.st_mode):
                    continue
                dev.unlink()
            except FileNotFoundError:
                pass
            # A character device (1,3 = /dev/null): slurmd rejects regular files as GPU stand-ins.
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))

    def _start_munge(self, deadline: float) -> int:
        import pwd

        mu = pwd.getpwnam("munge")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.munge_dir, mu.pw_uid, mu.pw_gid)
        os.chmod(self.munge_dir, 0o700)
        key = self.munge_dir / "munge.key"
        if not key.exists() or key.stat().st_size < 32:
            key.write_bytes(os.urandom(1024))
        os.chown(key, mu.pw_uid, mu.pw_gid)
        os.chmod(key, 0o400)
        for stale in (self.munge_socket, Path(str(self.munge_socket) + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        log = self.log_dir / "munged.log"
        log.touch()
        os.chown(log, mu.pw_uid, mu.pw_gid)
        pid = self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={log}",
            f"--seed-file={self.munge_dir}/munged.seed", "--num-threads=4",
        ], user="munge")

        def munge_ok() -> bool:
            cp = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True)
            if cp.returncode != 0:
                return False
            return subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=cp.stdout,
                                  capture_output=True).returncode == 0

        self._wait(munge_ok, deadline, "munged", ["munged"], pid=pid)
        return pid

    def _mariadbd_argv(self) -> list[str]:
        return [
            "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={self.mysql_data}",
            f"--socket={self.mysql_socket}", f"--pid-file={self.mysql_run}/mariadbd.pid",
            f"--port={self.MYSQL_PORT}", "--bind-address=127.0.0.1", f"--log-error={self.mysql_run}/mariadb.err",
            "--skip-name-resolve", "--performance-schema=OFF", "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=64M", "--innodb-lock-wait-timeout=900", "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0", "--max-connections=100",
        ]

    def _start_mariadb(self, deadline: float) -> int:
        import pwd

        my = pwd.getpwnam("mysql")
        for d in (self.mysql_dir, self.mysql_run):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, my.pw_uid, my.pw_gid)
        for stale in (self.mysql_socket, self.mysql_run / "mariadbd.pid"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        marker = self.mysql_data / ".slurmlab-initialized"
        for attempt in (1, 2):
            if not marker.exists():
                shutil.rmtree(self.mysql_data, ignore_errors=True)
                cp = subprocess.run(
                    ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={self.mysql_data}",
                     "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve",
                     "--innodb-log-file-size=64M"],
                    capture_output=True, text=True, timeout=max(30, deadline - time.monotonic()),
                    cwd=str(self.mysql_dir),
                )
                if cp.returncode != 0:
                    raise SlurmLabError(f"mariadb-install-db failed:\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}")
                marker.touch()
            pid = self._spawn("mariadb", self._mariadbd_argv())
            try:
                self._wait(lambda: self._mysql_ping(), deadline, "MariaDB", ["mariadb"], pid=pid)
                return pid
            except SlurmLabError:
                if attempt == 2 or _pid_alive(pid):
                    raise
                # A data folder left half-initialised or damaged: start over once.
                marker.unlink(missing_ok=True)
                self._log_event("MariaDB failed to start; re-initialising its data folder")
        raise AssertionError("unreachable")

    def _mysql_ping(self) -> bool:
        cp = subprocess.run(["mariadb-admin", "--no-defaults", f"--socket={self.mysql_socket}", "-uroot", "ping"],
                            capture_output=True, text=True, timeout=15)
        return cp.returncode == 0 and "alive" in cp.stdout

    def _mysql(self, sql: str) -> str:
        cp = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-uroot", "-e", sql],
                            capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise SlurmLabError(f"MariaDB statement failed: {cp.stderr.strip()}")
        return cp.stdout

    # ------------------------------------------------------------------ network and hosts

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if check and cp.returncode != 0:
            raise SlurmLabError(f"ip {' '.join(args)} failed: {cp.stderr.strip()}")
        return cp

    def _setup_network(self) -> None:
        if self._ip("link", "show", self.BRIDGE, check=False).returncode != 0:
            self._ip("link", "add", self.BRIDGE, "type", "bridge")
        addrs = self._ip("-4", "-o", "addr", "show", "dev", self.BRIDGE).stdout
        if f"{self.BRIDGE_ADDR}/{self.PREFIX}" not in addrs:
            self._ip("addr", "add", f"{self.BRIDGE_ADDR}/{self.PREFIX}", "dev", self.BRIDGE)
        self._ip("link", "set", self.BRIDGE, "up")
        existing = self._ip("netns", "list").stdout.split()
        for node, ns in self.NETNS.items():
            if ns not in existing:
                self._ip("netns", "add", ns)
            veth = self.VETH[node]
            has_if = self._ip("-n", ns, "link", "show", self.IFNAME, check=False).returncode == 0
            has_veth = self._ip("link", "show", veth, check=False).returncode == 0
            if not (has_if and has_veth):
                if has_veth:
                    self._ip("link", "del", veth, check=False)
                if has_if:
                    self._ip("-n", ns, "link", "del", self.IFNAME, check=False)
                self._ip("link", "add", veth, "type", "veth", "peer", "name", self.IFNAME, "netns", ns)
            self._ip("link", "set", veth, "master", self.BRIDGE)
            self._ip("link", "set", veth, "up")
            addr = f"{self.NODE_ADDR[node]}/{self.PREFIX}"
            if addr not in self._ip("-n", ns, "-4", "-o", "addr", "show", "dev", self.IFNAME).stdout:
                self._ip("-n", ns, "addr", "add", addr, "dev", self.IFNAME)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "set", self.IFNAME, "up")
            if "default" not in self._ip("-n", ns, "route", "show").stdout:
                self._ip("-n", ns, "route", "add", "default", "via", self.BRIDGE_ADDR)
            self._write_netns_resolv(ns)

    # `ip netns exec NS` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf for what it starts
    # (slurmd, and so every job step). The machine's nameserver is not reachable from the namespaces: a
    # name that /etc/hosts lacks took 10 s to fail there, about 10 s lost in every rendezvous. A nameserver
    # on the namespace's own loopback, where nothing listens, makes such lookups fail at once.
    RESOLV_MARK = "# written by tests/cluster/slurmlab.py"

    def _write_netns_resolv(self, ns: str) -> None:
        path = Path("/etc/netns") / ns / "resolv.conf"
        if path.exists() and self.RESOLV_MARK not in path.read_text(errors="replace"):
            return  # the machine's own: left alone
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.RESOLV_MARK}\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _remove_netns_resolv(self, ns: str) -> None:
        path = Path("/etc/netns") / ns / "resolv.conf"
        try:
            if self.RESOLV_MARK in path.read_text(errors="replace"):
                path.unlink()
                path.parent.rmdir()
        except OSError:
            pass

    def _teardown_network(self) -> None:
        for ns in self.NETNS.values():
            self._ip("netns", "del", ns, check=False)
            self._remove_netns_resolv(ns)
        for veth in self.VETH.values():
            self._ip("link", "del", veth, check=False)
        self._ip("link", "del", self.BRIDGE, check=False)

    def _hosts_lines(self) -> list[str]:
        return [self.HOSTS_BEGIN] + [f"{self.NODE_ADDR[n]} {n}" for n in self.NODES] + [self.HOSTS_END]

    def _strip_hosts_block(self, text: str) -> list[str]:
        out, inside = [], False
        for line in text.splitlines():
            if line.strip() == self.HOSTS_BEGIN:
                inside = True
                continue
            if inside and line.strip() == self.HOSTS_END:
                inside = False
                continue
            if not inside:
                out.append(line)
        return out

    def _write_hosts_block(self) -> None:
        text = Path("/etc/hosts").read_text()
        lines = self._strip_hosts_block(text) + self._hosts_lines()
        new = "\n".join(lines) + "\n"
        if new != text:
            # In place, not by rename: /etc/hosts is often a bind mount.
            with open("/etc/hosts", "w") as f:
                f.write(new)

    def _remove_hosts_block(self) -> None:
        with contextlib.suppress(OSError):
            text = Path("/etc/hosts").read_text()
            if self.HOSTS_BEGIN in text:
                with open("/etc/hosts", "w") as f:
                    f.write("\n".join(self._strip_hosts_block(text)) + "\n")

    # ------------------------------------------------------------------ stop

    def _our_processes(self) -> dict[int, str]:
        """pid -> kind ("node", "slurmctld", "slurmdbd", "mariadb", "munged") of every process the lab
        started: anything inside the nodes' network namespaces (slurmd, slurmstepd, job processes)
        and the daemons recognised by their command line or SLURM_CONF."""
        ns_inodes = set()
        for ns in self.NETNS.values():
            with contextlib.suppress(OSError):
                ns_inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        with contextlib.suppress(OSError):
            ns_inodes.discard(os.stat("/proc/1/ns/net").st_ino)
        mine = _ancestors()
        root_s, conf_env = str(self.root), f"SLURM_CONF={self.conf_path}"
        found: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in mine or not _pid_alive(pid):
                continue
            argv = _cmdline(pid)
            if not argv:
                continue  # kernel thread or gone
            base = os.path.basename(argv[0]).split(":")[0]
            try:
                netino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            joined = " ".join(argv)
            if netino in ns_inodes:
                found[pid] = "node"
            elif base in _DAEMON_NAMES and (root_s in joined or _environ_has(pid, conf_env)):
                found[pid] = {"mysqld": "mariadb", "mariadbd": "mariadb"}.get(base, base)
        return found

    def _kill(self, pids: Iterable[int], grace: float) -> None:
        pids = [p for p in pids if _pid_alive(p)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.2)
        for p in pids:
            if _pid_alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.1)

    def _stop_locked(self, *, teardown_network: bool) -> None:
        state = self._load_state()
        known = {int(p) for p in state.get("pids", {}).values() if p}
        procs = self._our_processes()
        for p in known:  # pids recorded at start that still run the expected daemon
            if p not in procs and _pid_alive(p):
                for name, expected in self._expected_daemons().items():
                    if state["pids"].get(name) == p and self._daemon_alive(name, p):
                        procs[p] = name.split("-")[0]
        if procs:
            self._log_event(f"stopping {len(procs)} processes: {sorted(procs.items())}")
        # Compute nodes and jobs first, then the controller, accounting, database, munge.
        for kinds, grace in ((("node", "slurmd", "slurmstepd"), 10), (("slurmctld",), 10), (("slurmdbd",), 10),
                             (("mariadb",), 30), (("munged",), 5)):
            self._kill([p for p, k in procs.items() if k in kinds], grace)
        if teardown_network:
            self._teardown_network()
        with contextlib.suppress(OSError, ValueError):
            if self.state_file.exists():
                self._save_state(fingerprint=None, pids={})


def _parse_scontrol_line(line: str) -> dict[str, str]:
    """Parse one line of ``scontrol show job -o`` (Key=Value pairs; a value may contain spaces)."""
    out: dict[str, str] = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Start, inspect or stop the Slurm lab cluster.")
    ap.add_argument("action", choices=["start", "status", "stop", "purge", "env"])
    ap.add_argument("--root", default=os.environ.get("LAUNCHER_SLURMLAB_ROOT", DEFAULT_ROOT))
    ap.add_argument("--min-job-age", type=int)
    args = ap.parse_args(argv)
    lab = SlurmLab(args.root)
    if args.action == "start":
        lab = SlurmLab.ensure(args.root, min_job_age=args.min_job_age, keep=True)
        print(f"{'reused' if lab.reused else 'started'} in {lab.start_seconds:.1f}s; export SLURM_CONF={lab.conf_path}")
    elif args.action == "status":
        problem = lab._health_problem()
        print("healthy" if problem is None else f"not healthy: {problem}")
        return 0 if problem is None else 1
    elif args.action == "env":
        print(f"export SLURM_CONF={lab.conf_path}")
    else:
        lab.stop(purge=args.action == "purge")
        print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
