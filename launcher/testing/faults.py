"""Test-only hooks of the training ranks: real faults injected at an optimizer step, and dumps of the
weights a run starts from and ends with. The ranks import this module only when one of its variables
(all named LAUNCHER_TEST_..., see launcher.rank.loop.TEST_ONLY_PREFIX) is set; never set them in a real run.

  LAUNCHER_TEST_FAULT               faults to inject (`Fault`)
  LAUNCHER_TEST_DUMP_FINAL_WEIGHTS  rank 0 writes the weights the run ended with (gathered from all ranks
                                    under ZeRO-3; trainable parameters only for LoRA/QLoRA, everything for
                                    full) to this torch file, to compare the saved final model with them
  LAUNCHER_TEST_DUMP_START_WEIGHTS  the same for the weights training starts from, after a resumed
                                    checkpoint was loaded (a resume on another number of ranks must start
                                    from the weights the checkpoint holds)
  LAUNCHER_TEST_SAMPLE_LOG          a mixture's training dataset appends "index source block" to this file
                                    for every sample a rank reads (the block order of a run)

Torch, transformers and deepspeed are imported inside the functions.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

from launcher import identity
from launcher.rank.stop import tell
from launcher.rundir import markers

FAULT_ENV = "LAUNCHER_TEST_FAULT"
TEST_DUMP_ENV = "LAUNCHER_TEST_DUMP_FINAL_WEIGHTS"
TEST_DUMP_START_ENV = "LAUNCHER_TEST_DUMP_START_WEIGHTS"
TEST_SAMPLE_LOG_ENV = "LAUNCHER_TEST_SAMPLE_LOG"
TEST_ONLY_ENV = (FAULT_ENV, TEST_DUMP_ENV, TEST_DUMP_START_ENV, TEST_SAMPLE_LOG_ENV)
FAULT_KINDS = ("kill", "oom", "hang", "kill-in-save", "signal", "stall", "gil")


# --------------------------------------------------------------------------- faults

@dataclass(frozen=True)
class Fault:
    """Make a rank fail for real at an optimizer step (LAUNCHER_TEST_FAULT).

    LAUNCHER_TEST_FAULT=KIND:rank=R:step=S[:attempt=A][:sig=NAME], several separated by ','.
      kill          SIGKILL of the rank at the end of step S (a rank that dies)
      oom           torch.OutOfMemoryError raised on the rank at the end of step S (exit 5)
      hang          SIGSTOP of the rank at the end of step S (the others time out in the next collective)
      kill-in-save  SIGKILL of the rank in the checkpoint save at step S, after the data, before the
                    completion marker (a checkpoint cut off mid-save)
      signal        the rank sends itself sig (default USR1) at the end of step S (a preemption)
      stall         the rank sleeps in Python at the end of step S, for ever (its threads still run:
                    the hang watchdog's case, exit 4, with `_stall_forever` in the stack it writes)
      gil           the rank sleeps in C at the end of step S, for ever, holding the GIL (no Python thread
                    runs: the watchdog's faulthandler backstop, exit 1, `_hold_gil_forever` in its stack)
    attempt (default 0) is the attempt it fires on, so that a requeued job does not meet it again."""

    kind: str
    rank: int = 0
    step: int = 1
    attempt: int = 0
    sig: str = "SIGUSR1"


def parse_faults(value: str | None) -> list[Fault]:
    faults = []
    for item in (value or "").split(","):
        if not item.strip():
            continue
        kind, *pairs = item.strip().split(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} (one of {', '.join(FAULT_KINDS)})")
        kw: dict[str, Any] = {}
        for pair in pairs:
            k, _, v = pair.partition("=")
            if k in ("rank", "step", "attempt"):
                kw[k] = int(v)
            elif k == "sig":
                kw[k] = v if v.startswith("SIG") else "SIG" + v
            else:
                raise ValueError(f"{FAULT_ENV}: unknown key {k!r} in {item!r}")
        faults.append(Fault(kind, **kw))
    return faults


def _faults_here(kind: str, step: int) -> list[Fault]:
    who = identity.current()
    return [f for f in parse_faults(os.environ.get(FAULT_ENV))
            if f.kind == kind and f.rank == who.rank and f.step == step and f.attempt == who.attempt]


def _fault_marker(f: Fault, step: int) -> None:
    """Where and when the fault struck (tests measure how fast the other ranks leave)."""
    out = os.environ.get("LAUNCHER_OUT_DIR")
    if out:
        try:
            markers.write_own(out, markers.FAULT, kind=f.kind, step=step)
        except OSError:
            pass


def inject_step_faults(step: int) -> None:
    who = identity.current()
    for f in _faults_here("signal", step):
        tell(f"launcher: test fault: rank {who.rank} sends itself {f.sig} at step {step}")
        os.kill(os.getpid(), getattr(signal, f.sig))
    for f in _faults_here("oom", step):
        import torch

        raise torch.OutOfMemoryError(f"test fault ({FAULT_ENV}): injected out of memory on rank {who.rank} at step {step}")
    for f in _faults_here("hang", step):
        _fault_marker(f, step)
        tell(f"launcher: test fault: rank {who.rank} stops (SIGSTOP) at step {step}")
        os.kill(os.getpid(), signal.SIGSTOP)
    for f in _faults_here("stall", step):
        _fault_marker(f, step)
        tell(f"launcher: test fault: rank {who.rank} on {who.node} stalls (sleeps in Python) at step {step}")
        _stall_forever()
    for f in _faults_here("gil", step):
        _fault_marker(f, step)
        tell(f"launcher: test fault: rank {who.rank} on {who.node} stalls in C holding the GIL at step {step}")
        _hold_gil_forever()
    for f in _faults_here("kill", step):
        _fault_marker(f, step)
        tell(f"launcher: test fault: rank {who.rank} on {who.node} kills itself (SIGKILL) at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)


def inject_save_faults(step: int) -> None:
    for f in _faults_here("kill-in-save", step):
        _fault_marker(f, step)
        tell(f"launcher: test fault: rank {identity.rank()} killed (SIGKILL) in the middle of saving checkpoint-{step}")
        os.kill(os.getpid(), signal.SIGKILL)


def _stall_forever() -> None:
    """Test fault "stall": no progress, threads alive (the watchdog ends the rank); named for its stack."""
    while True:
        time.sleep(1)


def _hold_gil_forever() -> None:
    """Test fault "gil": libc's sleep called through ctypes.PyDLL, which keeps the GIL for the call."""
    import ctypes

    while True:
        ctypes.PyDLL(None).sleep(3600)


# --------------------------------------------------------------------------- weight dumps

def dump_weights(model: Any, path: str) -> None:
    """The model's weights, gathered under ZeRO-3, to a torch file on rank 0. Every rank calls it."""
    import deepspeed
    import torch

    named = [(n, p) for n, p in model.named_parameters()]
    peft = hasattr(model, "peft_config")
    if peft:
        named = [(n, p) for n, p in named if p.requires_grad]
    out: dict[str, Any] = {}
    rank0 = identity.rank() == 0
    for n, p in named:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank0:
                out[n] = p.detach().to("cpu", copy=True)
    if rank0:
        torch.save(out, path)


# --------------------------------------------------------------------------- what the loop hooks in

def step_callbacks() -> list[Any]:
    """TrainerCallbacks that go before the stop callback: the faults of LAUNCHER_TEST_FAULT fire at the
    end of their step, before the ranks agree on a stop."""
    if not os.environ.get(FAULT_ENV):
        return []
    from transformers import TrainerCallback

    class StepFaults(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            inject_step_faults(state.global_step)

    return [StepFaults()]


def after_save() -> Callable[[int], None] | None:
    """The checkpoint save's hook after a rank's part is on disk (kill-in-save), or None."""
    return inject_save_faults if os.environ.get(FAULT_ENV) else None


def start_callbacks() -> list[Any]:
    """TrainerCallbacks added last: LAUNCHER_TEST_DUMP_START_WEIGHTS at on_train_begin, which runs after
    the Trainer loaded the checkpoint."""
    path = os.environ.get(TEST_DUMP_START_ENV)
    if not path:
        return []
    from transformers import TrainerCallback

    class DumpAtStart(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            dump_weights(model, path)

    return [DumpAtStart()]


def at_end(model: Any) -> None:
    """After training and the final evaluation, before the final model is saved: LAUNCHER_TEST_DUMP_FINAL_WEIGHTS."""
    path = os.environ.get(TEST_DUMP_ENV)
    if path:
        dump_weights(model, path)


class _LoggedSamples:
    """A mixture dataset that appends each sample it hands out (index, source, block) to a file."""

    def __init__(self, ds: Any, path: str):
        self.ds, self.path = ds, path
        self.schedule = ds.schedule

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, n: int) -> Any:
        k, j = self.ds.locate(int(n))
        with open(self.path, "a") as f:
            f.write(f"{int(n)} {k} {j}\n")
        return self.ds[n]


def logged_samples(ds: Any) -> Any:
    """`ds` itself, or wrapped to log its samples when LAUNCHER_TEST_SAMPLE_LOG is set (mixtures only)."""
    path = os.environ.get(TEST_SAMPLE_LOG_ENV)
    return _LoggedSamples(ds, path) if path and hasattr(ds, "locate") else ds
