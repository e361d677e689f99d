"""The hang watchdog on every rank: a rank that finishes no optimizer step for cluster.hang_timeout_s
writes every thread's Python stack to its log (stderr), records an exit marker (reason "hang") and
exits 4, so the job ends and the batch script's retry logic (or the user) decides what comes next.

When it counts (decided here, so that slow but healthy work is never taken for a hang):
- armed when the Trainer is built (on_init_end, after the model and data are loaded), and again at the
  start of training (on_train_begin, after the DeepSpeed engine is built and a resumed checkpoint
  loaded): each of these two stretches gets FIRST_STEP_FACTOR x the limit, because they may build
  DeepSpeed's ops (or wait for another process's build), compile, autotune and open the first collectives;
- reset at the end of every optimizer step, and by every evaluation batch (evaluation is progress);
- a checkpoint save (the step's should_save) gets SAVE_FACTOR x the limit: a long save is progress,
  while a save stuck for good (a file system that stopped answering) still ends the job;
- disarmed at the end of training (the final evaluation and save_model are outside the loop);
- a rank whose training thread is blocked in a collective when its limit runs out waits a little longer
  (COLLECTIVE_GRACE_S, once): it is most likely waiting for the stuck rank, which then fires first, so
  that the first stack and marker are the culprit's; its line says which collective it waited in.

A thread stuck in C code that holds the GIL stops this thread too. For that case a backstop runs beside
it: faulthandler's own timer thread (dump_traceback_later, which needs no GIL), re-armed with every
deadline to fire two polls + BACKSTOP_SLACK_S later (for a rank given the collective grace: after it).
It writes "Timeout (H:MM:SS)!" and every thread's stack to stderr and exits 1, without a marker: Python
cannot run any more there (`launcher status` still reads it as a hang, from the log line). When this
thread can run, it fires first and cancels the backstop. SIGSTOP freezes the whole process (the other
ranks leave through the collective timeout: the test fault "hang"). The test faults "stall" (sleeps in
Python) and "gil" (sleeps in C holding the GIL) are the two cases.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from launcher import identity
from launcher.errors import EXIT_HANG
from launcher.rundir import markers

FIRST_STEP_FACTOR = 3  # the first step: compilation, autotuning, first collectives
SAVE_FACTOR = 3  # a checkpoint save after the step
COLLECTIVE_GRACE_S = 60.0  # extra wait of a rank blocked in a collective (at most the limit itself)
BACKSTOP_SLACK_S = 5.0  # the C-level backstop fires this long (plus two polls) after the watchdog's deadline
# The first line of the backstop's dump, as a log shows it, is a log sign: launcher/ops/reasons.py BACKSTOP_DUMP.


class Watchdog:
    """A daemon thread that ends the process with exit 4 when `pet` is not called in time.

    `timeout_s` <= 0 turns it off (every method is then a no-op)."""

    def __init__(self, timeout_s: float, out_dir: str | os.PathLike[str] | None = None,
                 on_fire: Callable[[str], None] | None = None) -> None:
        self.timeout_s = float(timeout_s)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_fire = on_fire  # told why, just before the exit (the run record ends the attempt with it)
        self.step: int | None = None  # the last finished optimizer step seen
        self._warm = False  # a step finished since arm(): the first-step allowance is over
        self._collective: str | None = None  # at expiry: the collective the main thread waits in ("" none)
        self._last = time.monotonic()
        self._deadline = float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    @property
    def _poll(self) -> float:
        return max(0.2, min(5.0, self.timeout_s / 20))

    def _arm_backstop(self, seconds: float) -> None:
        """(Re-)arm faulthandler's timer: `seconds` plus the slack that lets this thread fire first."""
        faulthandler.dump_traceback_later(seconds + 2 * self._poll + BACKSTOP_SLACK_S, exit=True, file=2)

    def arm(self, step: int | None = None) -> None:
        """Start watching from `step` (the resumed global step, or None); until the next step finishes
        the limit is FIRST_STEP_FACTOR x timeout_s."""
        if not self.enabled:
            return
        with self._lock:
            self.step, self._warm = step, False
        self.pet()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="launcher-hang-watchdog", daemon=True)
            self._thread.start()

    def pet(self, step: int | None = None, factor: float = 1.0) -> None:
        """Progress (`step`: the optimizer step that just finished): the next `factor` x timeout_s seconds
        are allowed before the next call; until the first step finished, at least FIRST_STEP_FACTOR x."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if step is not None and step != self.step:
                self.step, self._warm = step, True
            if not self._warm:
                factor = max(factor, FIRST_STEP_FACTOR)
            self._last = now
            self._deadline = now + self.timeout_s * factor
            self._collective = None
            self._arm_backstop(self.timeout_s * factor)

    def disarm(self) -> None:
        self._stop.set()
        with self._lock:
            self._deadline = float("inf")
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                now = time.monotonic()
                expired = now >= self._deadline
                # A rank blocked in a collective is most likely waiting for the rank that is stuck: it waits
                # COLLECTIVE_GRACE_S longer (once per stretch), so the stuck rank fires first and its stack and
                # marker are the ones that name the cause; its exit usually ends the others' collective.
                if expired and self._collective is None:
                    self._collective = _collective_of_main_thread() or ""
                    if self._collective:
                        grace = min(self.timeout_s, COLLECTIVE_GRACE_S)
                        self._deadline = now + grace
                        self._arm_backstop(grace)
                        continue
            if expired and not self._stop.is_set():
                self.fire()

    def fire(self) -> None:
        """Write the line and every thread's stack to stderr, the exit marker, then exit 4."""
        faulthandler.cancel_dump_traceback_later()  # this report, marker and record take over (may be slow)
        with self._lock:
            idle = time.monotonic() - self._last
            step = self.step
            collective = self._collective
        who = identity.current()
        where = f"last step {step}" if step is not None else "no step finished yet"
        if collective:
            where += f"; waiting in {collective}: another rank may be the one stuck"
        lock = lock_file_waited_on()
        if lock:
            where += (f"; waiting for the lock file {lock} of a torch extension build (DeepSpeed's ops): another "
                      f"process is building the op, or a build killed earlier left the lock behind: delete it and "
                      f"requeue; TORCH_EXTENSIONS_DIR on node-local storage (as `launcher slurm` renders it) avoids it")
        head = (f"launcher: rank {who.rank} on {who.node} made no progress for {idle:.0f} s "
                f"({where}); stacks of every thread follow")
        tail = (f"launcher: rank {who.rank}: the watchdog ends this rank with exit {EXIT_HANG} "
                f"(cluster.hang_timeout_s={self.timeout_s:g})")
        _flush_quietly()
        _write_stderr(f"{head}\n{_stacks()}{tail}\n")
        why = (f"rank {who.rank} on {who.node} made no progress for {idle:.0f} s ({where}, "
               f"cluster.hang_timeout_s={self.timeout_s:g}); the watchdog wrote every thread's stack to the log")
        if self.out_dir is not None:
            markers.write_exit(self.out_dir, markers.HANG, EXIT_HANG, why, step=step, watchdog=True)
        if self.on_fire is not None:
            try:
                self.on_fire(why)
            except Exception as exc:  # the exit must happen whatever the record does
                _write_stderr(f"launcher: the watchdog could not record the hang: {type(exc).__name__}: {exc}\n")
        os._exit(EXIT_HANG)


def _collective_of_main_thread() -> str | None:
    """'torch.distributed all_reduce' when the main thread (the training loop) is inside a collective,
    else None. Best effort: a CUDA collective is asynchronous and may block later, elsewhere."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    outer = None
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if name.endswith("torch/distributed/distributed_c10d.py"):
            return f"torch.distributed {frame.f_code.co_name}"
        if outer is None and ("/torch/distributed/" in name or "/deepspeed/comm/" in name):
            outer = f"a collective ({frame.f_code.co_name})"
        frame = frame.f_back
    return outer


def lock_file_waited_on(frame: Any = None) -> str | None:
    """The lock file torch's extension builder waits on (FileBaton.wait) in `frame`'s stack (default: the
    main thread's), else None. Ranks that compile an op into one folder wait there, for ever when a
    killed build left its lock behind."""
    if frame is None:
        frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None:
        if frame.f_code.co_filename.replace(os.sep, "/").endswith("torch/utils/file_baton.py"):
            path = getattr(frame.f_locals.get("self"), "lock_file_path", None)
            if path:
                return str(path)
        frame = frame.f_back
    return None


def _stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs no lock the stuck thread may hold)."""
    try:
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            return f.read()
    except (OSError, ValueError, RuntimeError) as exc:
        return f"(no stacks: {exc})\n"


def _write_stderr(text: str) -> None:
    """One write for the whole report where the pipe takes it, so that ranks that fire together (their
    logs often share one pipe) do not interleave line by line."""
    data = text.encode(errors="replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:  # stderr closed: the marker still says why
        pass


def _flush_quietly(wait_s: float = 1.0) -> None:
    """Flush Python's stdout/stderr buffers, in a helper thread: the stuck thread may hold their lock
    (a print blocked on a full pipe), and then this must not block the watchdog."""

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    t = threading.Thread(target=flush, daemon=True)
    t.start()
    t.join(wait_s)


def watchdog_callback(timeout_s: float, out_dir: str | os.PathLike[str] | None,
                      on_fire: Callable[[str], None] | None = None) -> Any:
    """A transformers TrainerCallback driving a Watchdog (see the module docstring for when it counts).
    Put it after the stop callback, so that it sees a save the stop asked for."""
    from transformers import TrainerCallback

    class HangWatchdog(TrainerCallback):
        def __init__(self) -> None:
            self.watchdog = Watchdog(timeout_s, out_dir, on_fire)

        def on_init_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.arm(None)  # engine set-up (op builds, checkpoint load) happens inside train()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.arm(state.global_step or None)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.pet(state.global_step, SAVE_FACTOR if control.should_save else 1.0)

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.pet()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.pet(factor=SAVE_FACTOR if control.should_save else 1.0)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.pet()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watchdog.disarm()

    return HangWatchdog()
