"""The stop signal on every rank: USR1 or TERM asks for a stop, the ranks agree on one optimizer step,
save a checkpoint there and exit 3 (requeue me).

The path of a preemption: USR1 or TERM reaches a rank (from Slurm, the batch shell, torchrun or
`launcher run`) -> the handler only sets a flag (twice is harmless) -> at the end of every optimizer step
the ranks all_reduce(MAX) that flag, so all of them see it at the same step -> the Trainer saves a
checkpoint there (rank/checkpoint.py: atomic, completion marker last) -> all ranks barrier -> global
rank 0 writes the requeue marker (RUN_DIR/markers/requeue-JOB-aN.json) -> barrier -> every rank exits 3
(EXIT_REQUEUE). The batch script requeues on that marker, not on an exit code (torchrun exits 1 whatever
its workers returned); a restarted job resumes from the newest complete checkpoint (output.resume: auto).

Torch and transformers are imported inside the functions; the rest is stdlib.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.errors import EXIT_REQUEUE
from launcher.rundir import markers

STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


def tell(msg: str) -> None:
    """One line to stderr through os.write: safe inside a signal handler (print could re-enter a
    buffered write)."""
    try:
        os.write(2, (msg.rstrip("\n") + "\n").encode())
    except OSError:
        pass


@dataclass
class _StopState:
    signal_name: str | None = None
    count: int = 0
    installed: bool = False


STOP = _StopState()


def _on_signal(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    STOP.count += 1
    if STOP.signal_name is None:
        STOP.signal_name = name
        tell(f"launcher: rank {identity.rank()} got {name}: saving a checkpoint at the end of this optimizer step, "
             f"then stopping")
    else:
        tell(f"launcher: rank {identity.rank()} got {name} again; already stopping")


def install_signal_handlers() -> None:
    """USR1 (Slurm's warning before the time limit) and TERM (preemption, scancel) ask for a stop.
    The handler only sets a flag; the training loop acts on it at the next optimizer step."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), _on_signal)
    STOP.installed = True


def ignore_stop_signals() -> None:
    """Once the rank is done (stopped and saved, or finished): a late USR1/TERM must not kill it while the
    interpreter shuts down, when Python's own handlers are gone and the default action would end it with
    -10/-15 instead of its exit code."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def stop_requested() -> bool:
    return STOP.signal_name is not None


def agree(flag: bool, device: Any = None) -> bool:
    """True on every rank when it is True on any rank: one all_reduce(MAX) of one integer."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def stop_callback() -> Any:
    """The per-step agreement: a TrainerCallback whose on_step_end all_reduces the stop flag and,
    when any rank was signalled, asks the Trainer to save now and stop."""
    from transformers import TrainerCallback

    class StopAtAgreedStep(TrainerCallback):
        def __init__(self) -> None:
            self.stopped_at: int | None = None
            self.trainer: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step >= state.max_steps:
                return  # the run ends here anyway: a completed run, not a requeue
            if agree(stop_requested(), args.device):
                self.stopped_at = state.global_step
                if self.trainer is not None:
                    self.trainer.launcher_stopping = True
                control.should_save = True
                control.should_training_stop = True
                if identity.rank() == 0:
                    print(f"launcher: ranks agreed to stop at step {state.global_step}/{state.max_steps} "
                          f"({STOP.signal_name or 'signal on another rank'}); saving a checkpoint", flush=True)

    return StopAtAgreedStep()


def finish_stop(run_dir: Path, step: int, checkpoint: Path | None) -> None:
    """After the stop checkpoint: all ranks barrier, rank 0 writes the requeue marker, barrier."""
    barrier()
    if identity.rank() == 0:
        markers.write_own(run_dir, markers.REQUEUE, reason=markers.REQUEUED, exit_code=EXIT_REQUEUE, step=step,
                          signal=STOP.signal_name, checkpoint=str(checkpoint) if checkpoint else None,
                          message=f"stopped at step {step} on {STOP.signal_name or 'a signal'}; checkpoint saved")
    barrier()
