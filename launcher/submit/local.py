"""Local launch: prepare the data here, write the run dir, spawn the ranks through the deepspeed launcher,
stream their output to the terminal and to RUN_DIR/logs/, and return their exit code.

Launcher choice: DeepSpeed's per-node launcher runs the ranks, the process the `deepspeed` command starts on
each node: `python -m deepspeed.launcher.launch --world_info=B64 --node_rank=0 ... --no_local_rank --module
launcher train SPEC`, run through `launcher.submit.nodelaunch` (the same module, without mlflow's import).
It sets each rank's RANK, LOCAL_RANK, WORLD_SIZE and visible devices from the world info, and stops every
rank when one fails. The world info ({"localhost": [device ids]}) is built here, which
is all DeepSpeed's runner (`deepspeed`, `deepspeed.launcher.runner`) does on one node before it starts this
launcher and waits: the runner would be one more resident process that imports torch and DeepSpeed, seconds
of start-up on a busy CPU and memory beside the ranks for the whole run (benchmarks/README.md measured a rank
slower beside such idle processes). On CPU the same launcher works unchanged: N ids make N slots whatever
the CPU "accelerator" count is, and each rank talks gloo. `--bind_cores_to_rank` needs numactl, which plain
machines lack, so the threads per rank are set here instead (OMP_NUM_THREADS = cores / ranks; otherwise
accelerate sets 2 per rank and 2 ranks oversubscribe 2 cores). Slurm jobs use torchrun or srun
(render/slurm.py), which forward signals; `launcher train` is the same entry point.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher import assets, yamlio
from launcher.cli import REF_ENTRY, TRAIN_ENTRY
from launcher.config.spec import RunSpec
from launcher.data import shardprep as data_mod
from launcher.data.cache import cache_dir
from launcher.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_HANG, EXIT_OOM, EXIT_REQUEUE, RunFailed, UserError
from launcher.model.load import ensure_tiny_base
from launcher.ops.reasons import BACKSTOP_DUMP
from launcher.plan.plan import make_plan, Plan, settled
from launcher.rank.loop import check_environment
from launcher.rundir import markers
from launcher.rundir.checkpoints import complete_checkpoints
from launcher.rundir.jobs import record_job
from launcher.rundir.layout import RunDir
from launcher.submit import nodelaunch, preflight
from launcher.submit.rundir import create

_PACKAGE_ROOT = assets.PACKAGE_PARENT
NODE_LAUNCH = nodelaunch.__name__  # DeepSpeed's per-node launcher, mlflow kept out
_KNOWN_EXITS = {EXIT_BAD_INPUT, EXIT_REQUEUE, EXIT_HANG, EXIT_OOM}
# What DeepSpeed's per-node launcher says about itself (the world info, each process spawned and its exit;
# `runner` covers the lines of its runner, which launcher no longer starts, should a user's wrapper run it) and
# its JIT op loader's progress: nothing a user of the quickstart can act on. With `quiet` these lines go to the
# launch log only.
DEEPSPEED_CHATTER = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(?:DEBUG|INFO|WARNING)\] \[(?:runner|launch|real_accelerator|constants)\.py:\d+:"
    r"|^DeepSpeed \S+ built successfully$|^(?:Using \S+ as PyTorch extensions root|Loading extension module \S+|"
    r"Time to load \S+ op: [\d.]+ seconds|ninja: no work to do|Emitting ninja build file \S+|Building extension module \S+|"
    r"Detected CUDA files, patching ldflags|Allowing ninja to set a default number of workers).*$")


def launch_command(run_dir: str | Path, plan: Plan, nproc: int, *, master_port: int = 29500,
                   base_env: dict[str, str] | None = None, cpu_count: int | None = None,
                   quiet: bool = False,
                   entry: tuple[str, ...] = TRAIN_ENTRY) -> tuple[list[str], dict[str, str]]:
    """argv and environment that start `nproc` ranks of `launcher train RUN_DIR/spec.yaml`. Pure.

    `quiet` drops the launcher's INFO lines and Python FutureWarnings (quickstart output). `entry`:
    the module and arguments each rank runs, the spec's path after them (`launcher bench` runs its
    measuring entry)."""
    run_dir = Path(run_dir)
    env = dict(os.environ if base_env is None else base_env)
    world = {"localhost": device_ids(plan, nproc, env)}
    argv = [
        sys.executable, "-u", "-m", NODE_LAUNCH,
        "--world_info=" + base64.urlsafe_b64encode(json.dumps(world).encode()).decode(),
        "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={master_port}",
        "--no_local_rank",
        *(["--log_level=warning"] if quiet else []),
        "--module", *entry, str(RunDir(run_dir).spec_path),
    ]
    if quiet:
        env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::UserWarning"
    # The ranks import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["LAUNCHER_RUN_DIR"] = str(run_dir)
    env["DS_ACCELERATOR"] = "cuda" if plan.device == "cuda" else "cpu"  # DeepSpeed does not guess (and say so)
    if plan.device == "cpu":
        cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        threads = str(max(1, cores // max(nproc, 1)))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return argv, env


def device_ids(plan: Plan, nproc: int, env: dict[str, str]) -> list[int | str]:
    """The local device of each rank, in rank order: the world info's list, from which DeepSpeed's launcher
    sets every rank's CUDA_VISIBLE_DEVICES (each rank then takes the LOCAL_RANK-th). Where the user made some
    GPUs visible, the first N of those, as written (indices, GPU or MIG UUIDs); else GPUs 0..N-1. CPU ranks are
    slots, not devices: 0..N-1."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if plan.device != "cuda" or visible is None:
        return list(range(nproc))
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    if not ids:
        raise UserError("CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU from a GPU run; unset it or "
                        "list the GPUs to use (e.g. CUDA_VISIBLE_DEVICES=0,1)", field="CUDA_VISIBLE_DEVICES")
    if len(ids) < nproc:
        raise UserError(f"CUDA_VISIBLE_DEVICES={yamlio.quote(visible, 200)} makes {len(ids)} GPU(s) visible and the "
                        f"run starts {nproc} rank(s), one per GPU; list more GPUs or use --nproc {len(ids)}",
                        field="CUDA_VISIBLE_DEVICES")
    return [int(x) if x.isdigit() else x for x in ids[:nproc]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_gpu_memory(plan: Plan) -> int | None:
    if plan.device != "cuda":
        return None
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def prepare_run(spec: RunSpec, out: str | Path, *, force: bool = False,
                ignore_fit: bool = False) -> tuple[RunDir, RunSpec, Plan, Path]:
    """Everything before the ranks start, in this process: pre-flight (spec, model, a data sample,
    clashes, memory fit: exit 2 before any run dir or rank), write the run dir, tokenize the data,
    make the tiny base model."""
    if spec.cluster.nodes > 1:
        raise UserError(f"`launcher run` starts ranks on this machine only; cluster.nodes={spec.cluster.nodes}. "
                        f"Use `launcher slurm` for several nodes, or --nodes 1")
    plan0 = make_plan(spec)
    # DeepSpeed's accelerator, explicitly: it is imported in this process too, and guesses (and says so) otherwise
    os.environ.setdefault("DS_ACCELERATOR", plan0.device)
    for note in preflight.check(spec, ignore_fit=ignore_fit, device_memory=local_gpu_memory(plan0)):
        print(f"note: {note}", file=sys.stderr, flush=True)
    check_environment(spec, plan0)  # GPUs, precision, attention kernel: before any rank
    device_ids(plan0, plan0.nproc_per_node, dict(os.environ))  # the GPUs the user made visible
    rd, spec, plan = create(out, spec, force=force)
    prepared = data_mod.prepare(spec)  # full check (chat template too) + tokenize into the cache, unless cached
    if spec.model.name == "tiny":
        ensure_tiny_base(rd.path, spec.optim.seed, cache=cache_dir(spec))
    return rd, spec, plan, prepared


def rank_processes(root_pid: int) -> list[int]:
    """The rank processes under a local launch (`... -m launcher train ...`), not the launcher's own."""
    import psutil  # a dependency of deepspeed

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "launcher" in argv and "train" in argv and \
                not {"deepspeed.launcher.runner", nodelaunch.DEEPSPEED_LAUNCH, NODE_LAUNCH} & set(argv):
            out.append(child.pid)
    return out


def run_ranks(rd: RunDir, plan: Plan, *, echo: bool = True, quiet: bool = False,
              entry: tuple[str, ...] = TRAIN_ENTRY, kind: str = "local") -> int:
    """Spawn the ranks, tee their output to RUN_DIR/logs/launch.log, return the exit code.

    USR1 and TERM to this process go to the ranks themselves (they save a checkpoint at one optimizer
    step and exit 3); the deepspeed launcher would kill them at once on TERM and dies of USR1.
    Ctrl-C (INT) stops the whole launch tree now. `entry` and `kind`: the reference job of full DPO runs
    `launcher train --ref` as kind "ref" in jobs.jsonl."""
    argv, env = launch_command(rd.path, plan, plan.nproc_per_node, master_port=free_port(), quiet=quiet, entry=entry)
    job = f"{kind}-{os.getpid()}-{int(time.time())}"
    env["LAUNCHER_JOB_ID"] = job
    env["LAUNCHER_ATTEMPT"] = "0"
    rd.logs.mkdir(parents=True, exist_ok=True)
    log_path = rd.launch_log
    started = time.time()
    backstop = False  # a rank's watchdog backstop dumped its stacks (a hang holding the GIL: it leaves no marker)
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        record_job(rd.path, job, kind, "started", nproc=plan.nproc_per_node, pid=proc.pid)

        def forward(signum: int, frame: object) -> None:  # Ctrl-C reaches the whole launch tree
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

        def to_ranks(signum: int, frame: object) -> None:
            pids = rank_processes(proc.pid)
            msg = (f"launcher: got {signal.Signals(signum).name}; passing it to {len(pids)} rank(s): they save a "
                   f"checkpoint and stop\n")
            sys.stderr.write(msg)
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        old = {signal.SIGINT: signal.signal(signal.SIGINT, forward)}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            old[s] = signal.signal(s, to_ranks)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                backstop = backstop or bool(BACKSTOP_DUMP.match(line))
                log.write(line)
                log.flush()
                if echo and not (quiet and DEEPSPEED_CHATTER.match(line)):
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    requeue = markers.marker_name(markers.REQUEUE, job, 0)
    if code not in (0, EXIT_REQUEUE) and markers.read_marker(rd.path, requeue) is not None:
        # every rank passed the barrier after the stop checkpoint and its marker: a rank that then died in
        # its own teardown (a late signal) changes nothing
        code = EXIT_REQUEUE
    hung = [r for r, rec in markers.rank_markers(rd.path, markers.EXIT, job, 0).items()
            if rec.get("exit_code") == EXIT_HANG]
    if (hung or backstop) and code not in _KNOWN_EXITS | {0}:
        code = EXIT_HANG  # a rank's watchdog fired; the others' failed collectives (exit 1) are its echo
    record_job(rd.path, job, kind, f"exit {code}", exit_code=code, seconds=round(time.time() - started, 1))
    rd_note = _failure_note(rd, job, backstop) if code not in (0, EXIT_REQUEUE) else ""
    if rd_note:
        sys.stderr.write(rd_note + "\n")
        with log_path.open("a") as log:
            log.write(rd_note + "\n")
    return code


def _failure_note(rd: RunDir, job: str, backstop: bool = False) -> str:
    """Which rank failed and where, from the markers the ranks wrote (a rank that wrote none was killed, or
    ended by its watchdog's backstop when `backstop`: the log has its dump)."""
    lines = []
    for s in markers.silent_ranks(rd.path, job, 0):
        lines.append(f"launcher: rank {s['rank']} on {s['node']} ended without an exit record: " +
                     ("its watchdog's backstop ended a hang in code holding the GIL (\"Timeout (...)!\" and every "
                      "thread's stack in the log)" if backstop else "killed (SIGKILL, the out-of-memory killer) or its node failed"))
    for rec in markers.rank_markers(rd.path, markers.EXIT, job, 0).values():
        if rec.get("exit_code") not in (0, EXIT_REQUEUE, None):
            lines.append(f"launcher: rank {rec.get('rank')} on {rec.get('node')}: {rec.get('reason')}: {rec.get('message')}")
    return "\n".join(lines)


def needs_reference_job(spec: RunSpec) -> bool:
    """Whether the run's loss reads reference log-probs computed before training (full DPO), made by their own
    job unless the cache holds them (data/cache.py reference_key)."""
    from launcher.config.spec import reference_mode
    from launcher.rank.preference import reference_path

    if reference_mode(spec) != "precomputed":
        return False
    return not (reference_path(spec) / "meta.json").is_file()


def resume_hint(rd: RunDir) -> str:
    return f"launcher run {rd.spec_path} --out {rd.path} --force"


def run(spec: RunSpec, out: str | Path, *, force: bool = False, echo: bool = True, quiet: bool = False,
        ignore_fit: bool = False) -> RunDir:
    """`launcher run`: prepare, write the run dir, train on this machine. RunFailed when a rank fails,
    with exit code 3 when the ranks stopped on USR1/TERM after a complete checkpoint."""
    rd, spec, plan, _ = prepare_run(spec, out, force=force, ignore_fit=ignore_fit)
    if echo:
        print("\n".join(plan.summary()), flush=True)
        print(f"run dir      {rd.path}", flush=True)
    if needs_reference_job(settled(spec, plan)):
        # full DPO: the reference log-probs by their own job, on the same ranks, before training
        code = run_ranks(rd, plan, echo=echo, quiet=quiet, entry=REF_ENTRY, kind="ref")
        if code != 0:
            exit_code = code if code in _KNOWN_EXITS else EXIT_FAILED
            raise RunFailed(f"the reference job failed (exit {code}); logs: {rd.launch_log}", exit_code=exit_code)
    code = run_ranks(rd, plan, echo=echo, quiet=quiet)
    if code == EXIT_REQUEUE:
        done = complete_checkpoints(rd.checkpoints)
        where = f"{done[-1][1]} (step {done[-1][0]})" if done else "the newest checkpoint"
        raise RunFailed(f"stopped on a signal after saving {where}. Resume with: {resume_hint(rd)} "
                        f"(the run dir's own spec; output.resume=auto picks the newest complete checkpoint)",
                        exit_code=EXIT_REQUEUE)
    if code != 0:
        exit_code = code if code in _KNOWN_EXITS else EXIT_FAILED
        why = (": a rank made no progress for cluster.hang_timeout_s and its watchdog stopped it, after writing "
               "every thread's stack to the log" if exit_code == EXIT_HANG else "")
        raise RunFailed(f"training failed (exit {code}{why}); logs: {rd.launch_log}", exit_code=exit_code)
    return rd
