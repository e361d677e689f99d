"""Local launch: prepare the data here, write the run dir, spawn the ranks through the deepspeed
launcher, stream their output to the terminal and to RUN_DIR/logs/, and return their exit code.

Launcher choice. The issue asks for the deepspeed launcher, and that is what runs:
`python -m deepspeed.launcher.runner --num_gpus N --no_local_rank --module launcher train SPEC`
(the `deepspeed` command, through this interpreter). On CPU it works unchanged: `--num_gpus N` makes N
slots whatever the CPU "accelerator" count is (1 here, one NUMA node), and each rank talks gloo.
`--bind_cores_to_rank` needs numactl, which plain machines lack, so the threads per rank are set
here instead (OMP_NUM_THREADS = cores / ranks; otherwise accelerate sets 2 per rank and 2 ranks
oversubscribe 2 cores). Measured on 2 busy cores (2 ranks, a script that only joins a gloo group,
3 runs each): torchrun 5.5-8.1 s, deepspeed launcher 16.8-22.9 s; the difference is the two extra
processes (runner, per-node launch) that each import deepspeed and torch. That is a fixed cost of
seconds per launch, small beside a real run, so the documented launcher stays. Slurm jobs use
torchrun or srun (render/slurm.py), which forward signals; `launcher train` is the same entry point.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_HANG, EXIT_OOM, EXIT_REQUEUE, RunFailed, UserError
from launcher.plan import Plan
from launcher.rundir import RunDir
from launcher.spec import RunSpec

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_KNOWN_EXITS = {EXIT_BAD_INPUT, EXIT_REQUEUE, EXIT_HANG, EXIT_OOM}


def launch_command(run_dir: str | Path, plan: Plan, nproc: int, *, master_port: int = 29500,
                   base_env: dict[str, str] | None = None, cpu_count: int | None = None,
                   quiet: bool = False) -> tuple[list[str], dict[str, str]]:
    """argv and environment that start `nproc` ranks of `launcher train RUN_DIR/spec.yaml`. Pure.

    `quiet` drops the launcher's INFO lines and Python FutureWarnings (quickstart output)."""
    run_dir = Path(run_dir)
    env = dict(os.environ if base_env is None else base_env)
    argv = [
        sys.executable, "-u", "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(nproc),
        "--master_addr", "127.0.0.1",
        "--master_port", str(master_port),
        "--no_local_rank",
        *(["--log_level", "warning"] if quiet else []),
        "--module", "launcher", "train", str(run_dir / "spec.yaml"),
    ]
    if quiet:
        env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::UserWarning"
    # The ranks import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["LAUNCHER_RUN_DIR"] = str(run_dir)
    if plan.device == "cpu":
        cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        threads = str(max(1, cores // max(nproc, 1)))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return argv, env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_run(spec: RunSpec, out: str | Path, *, force: bool = False) -> tuple[RunDir, RunSpec, Plan, Path]:
    """Everything before the ranks start, in this process: check and tokenize the data (bad data
    fails here, exit 2, before any run dir or rank), write the run dir, make the tiny base model."""
    from launcher import rundir
    from launcher.plan import make_plan
    from launcher.train import data as data_mod
    from launcher.train.loop import check_environment

    if spec.cluster.nodes > 1:
        raise UserError(f"`launcher run` starts ranks on this machine only; cluster.nodes={spec.cluster.nodes}. "
                        f"Use `launcher slurm` for several nodes, or --nodes 1")
    data_mod.check_data(spec)  # cheap, stdlib only: refuses a missing/empty/malformed file at once
    check_environment(spec, make_plan(spec))  # GPUs, precision, attention kernel: before any rank
    rd, spec, plan = rundir.create(out, spec, force=force)
    prepared = data_mod.prepare(spec)  # full check (chat template too) + tokenize into the cache
    if spec.model.name == "tiny":
        from launcher.train.model import ensure_tiny_base

        ensure_tiny_base(rd.path, spec.optim.seed)
    return rd, spec, plan, prepared


def run_ranks(rd: RunDir, plan: Plan, *, echo: bool = True, quiet: bool = False) -> int:
    """Spawn the ranks, tee their output to RUN_DIR/logs/launch.log, return the exit code."""
    argv, env = launch_command(rd.path, plan, plan.nproc_per_node, master_port=free_port(), quiet=quiet)
    rd.logs.mkdir(parents=True, exist_ok=True)
    log_path = rd.logs / "launch.log"
    started = time.time()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        rd.record_job(f"local-{proc.pid}", "local", "started", nproc=plan.nproc_per_node)

        def forward(signum: int, frame: object) -> None:  # Ctrl-C / TERM reach the whole launch tree
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    rd.record_job(f"local-{proc.pid}", "local", f"exit {code}", exit_code=code, seconds=round(time.time() - started, 1))
    return code


def run(spec: RunSpec, out: str | Path, *, force: bool = False, echo: bool = True, quiet: bool = False) -> RunDir:
    """`launcher run`: prepare, write the run dir, train on this machine. RunFailed when a rank fails."""
    rd, spec, plan, _ = prepare_run(spec, out, force=force)
    if echo:
        print("\n".join(plan.summary()), flush=True)
        print(f"run dir      {rd.path}", flush=True)
    code = run_ranks(rd, plan, echo=echo, quiet=quiet)
    if code != 0:
        exit_code = code if code in _KNOWN_EXITS else EXIT_FAILED
        raise RunFailed(f"training failed (exit {code}); logs: {rd.logs / 'launch.log'}", exit_code=exit_code)
    return rd
