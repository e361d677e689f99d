"""A rank from start to exit: `launcher train` (train), the run wrapper with its start and exit markers and
exit codes (README "Exit codes"), and how a rank leaves its process group.

Torch and the other heavy libraries are imported inside functions, here and in the loop.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from launcher import identity
from launcher.config.spec import RunSpec
from launcher.errors import EXIT_FAILED, EXIT_OK, EXIT_OOM, EXIT_REQUEUE, UserError
from launcher.rank.loop import train as train_loop
from launcher.rank.stop import ignore_stop_signals, install_signal_handlers, tell
from launcher.rundir import markers


def train(spec: RunSpec, *, ref_only: bool = False) -> int:
    """`launcher train`: this rank's whole run (markers, the training loop, leaving the process group) and
    its exit code: 0 done, 3 stopped at the same step as every rank after a complete checkpoint (requeue
    me). Failures leave through run_rank (exit 1, 2, 5)."""
    run_dir = Path(spec.output.dir)
    result = run_rank(run_dir, lambda: train_loop(spec, ref_only=ref_only))
    ignore_stop_signals()
    leave_process_group()
    if result.stopped_at is not None:
        markers.write_exit(run_dir, markers.REQUEUED, EXIT_REQUEUE, f"stopped at step {result.stopped_at} after a "
                           f"signal; checkpoint saved", step=result.stopped_at)
        return EXIT_REQUEUE
    markers.write_exit(run_dir, markers.COMPLETED, EXIT_OK)
    return EXIT_OK


def run_rank(run_dir: Path, body: Callable[[], Any]) -> Any:
    """Run this rank's training with its markers and exit codes:
    start marker; body(); exit marker. Out of memory -> exit 5; a failed collective (a rank died or
    hung, the timeout passed) -> exit 1 with one line naming this rank and node; bad input -> 2
    (raised on); anything else is a bug (raised on, traceback, exit 1)."""
    install_signal_handlers()
    os.environ["LAUNCHER_OUT_DIR"] = str(run_dir)
    try:
        markers.write_own(run_dir, markers.START)
    except OSError:
        pass
    try:
        return body()
    except BaseException as exc:
        reason = markers.exit_reason(exc)
        if reason == markers.INTERRUPTED:
            raise
        who = identity.current()
        if reason == markers.OOM:
            msg = f"rank {who.rank} on {who.node}: out of memory: {exc}"
            markers.write_exit(run_dir, reason, EXIT_OOM, msg)
            _hard_exit(EXIT_OOM, f"error: {msg}. Lower optim.micro_batch or --seq-len, turn on --grad-ckpt, "
                                 f"or use a higher ZeRO stage / offload")
        if reason == markers.COLLECTIVE_TIMEOUT:
            timeout = os.environ.get("LAUNCHER_COLLECTIVE_TIMEOUT_S", "?")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = (f"rank {who.rank} on {who.node}: a collective failed (collective timeout {timeout} s): "
                   f"another rank died or hung: {type(exc).__name__}: {first}")
            markers.write_exit(run_dir, reason, EXIT_FAILED, msg)
            _hard_exit(EXIT_FAILED, f"error: {msg}")
        markers.write_exit(run_dir, reason, markers.EXIT_CODES[reason], str(exc) if isinstance(exc, UserError)
                  else f"{type(exc).__name__}: {exc}")
        raise


def leave_process_group() -> None:
    """For a rank's entry point once training returned on every rank (done, or stopped at the same step):
    leave the process group before the interpreter exits. Left to the exit, gloo's worker threads can
    outlive it and abort the rank (SIGABRT, "terminate called without an active exception") after a run
    that finished. Not after a failure: another rank may still be inside a collective, and destroying
    the group there can block."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(code: int) -> NoReturn:
    """End a rank whose run is over and recorded (exit marker written, process group left) without the
    interpreter's finalization. There, C++ objects that torch.distributed and DeepSpeed leave behind are
    destroyed with their threads still joinable, and now and then that calls std::terminate ("terminate
    called without an active exception", SIGABRT, exit -6) in a rank that finished: seen on a 2-rank
    ZeRO-3 run whose ranks had both written their exit markers, after leaving the process group. Python's
    buffered output and logging handlers are flushed first; nothing else is left to write."""
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _hard_exit(code: int, message: str) -> None:
    """Exit now: after a failed collective the process group's threads can block a normal shutdown."""
    tell(message)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
