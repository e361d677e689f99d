"""What keeps a run alive on every rank: the stop signal, the ranks' agreement to stop at one optimizer
step, atomic checkpoints, the markers the batch script and `launcher status` read, test-only fault
injection, and resuming on another number of ranks (DeepSpeed's universal checkpoint).

The path of a preemption: USR1 or TERM reaches a rank (from Slurm, the batch shell, torchrun or
`launcher run`) -> the handler only sets a flag (twice is harmless) -> at the end of every optimizer step
the ranks all_reduce(MAX) that flag, so all of them see it at the same step -> the Trainer saves a
checkpoint there through DeepSpeed (under a temporary name, renamed once every rank wrote its part,
completion marker last) -> all ranks barrier -> global rank 0 writes RUN_DIR/markers/requeue-JOB-aN.json
-> barrier -> every rank exits 3 (EXIT_REQUEUE). The batch script requeues on that marker, not on an
exit code (torchrun exits 1 whatever its workers returned); a restarted job resumes from the newest
complete checkpoint (output.resume: auto).

Torch, transformers and deepspeed are imported inside the functions; the rest is stdlib.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.errors import UserError

# --------------------------------------------------------------------------- identity of this rank

COMPLETE_MARKER = "launcher-complete.json"  # written last into a checkpoint, before its rename
STAGING_PREFIX = ".staging-"  # checkpoints/.staging-checkpoint-N/checkpoint-N while it is written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def node_name() -> str:
    """The node as the scheduler names it: in a job every node may share one hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def job_key() -> str:
    """The job (attempt family) the markers belong to: the batch script exports LAUNCHER_JOB_ID
    (JOBID, or ARRAYJOB_TASK), `launcher run` exports local-PID."""
    if os.environ.get("LAUNCHER_JOB_ID"):
        return os.environ["LAUNCHER_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or "local"


def attempt() -> int:
    """Which attempt of the job this is: 0 first, then one more per requeue or retry."""
    raw = os.environ.get("LAUNCHER_ATTEMPT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
    return int(raw) if raw.isdigit() else 0


def _say(msg: str) -> None:
    # os.write: also safe inside a signal handler (print could re-enter a buffered write)
    try:
        os.write(2, (msg.rstrip("\n") + "\n").encode())
    except OSError:
        pass


# --------------------------------------------------------------------------- markers

def markers_dir(out_dir: str | os.PathLike[str]) -> Path:
    return Path(out_dir) / "markers"


def write_marker(out_dir: str | os.PathLike[str], name: str, **fields: Any) -> Path:
    """OUT_DIR/markers/NAME.json, written atomically: what this rank or job did, for the batch
    script's requeue decision and `launcher status`. Keys in a fixed order (the batch script greps
    "node" and "exit_code")."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", name):
        raise ValueError(f"marker name {name!r}: use letters, digits, '.', '_' and '-'")
    record = {"name": name, "job_id": job_key(), "restart": attempt(), "rank": rank(), "node": node_name(),
              "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **fields}
    d = markers_dir(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = d / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, default=str) + "\n")
    os.replace(tmp, path)
    return path


def start_marker_name(r: int | None = None) -> str:
    return f"start-{job_key()}-a{attempt()}-rank{rank() if r is None else r}"


def exit_marker_name(r: int | None = None) -> str:
    return f"exit-{job_key()}-a{attempt()}-rank{rank() if r is None else r}"


def requeue_marker_name() -> str:
    return f"requeue-{job_key()}-a{attempt()}"


def read_marker(out_dir: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    try:
        rec = json.loads((markers_dir(out_dir) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def silent_ranks(out_dir: str | os.PathLike[str], job: str, att: int) -> list[dict[str, Any]]:
    """Start markers of this attempt whose rank wrote no exit marker: ranks that were killed (SIGKILL,
    out-of-memory killer, a node that died), as {rank, node}."""
    d = markers_dir(out_dir)
    out = []
    for p in sorted(d.glob(f"start-{job}-a{att}-rank*.json")) if d.is_dir() else []:
        r = p.name[len(f"start-{job}-a{att}-rank"):-len(".json")]
        if not (d / f"exit-{job}-a{att}-rank{r}.json").exists():
            rec = read_marker(out_dir, p.name[:-5]) or {}
            out.append({"rank": int(r) if r.isdigit() else r, "node": rec.get("node", "?")})
    return sorted(out, key=lambda x: str(x["rank"]).zfill(8))


# --------------------------------------------------------------------------- the stop signal

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
        _say(f"launcher: rank {rank()} got {name}: saving a checkpoint at the end of this optimizer step, then stopping")
    else:
        _say(f"launcher: rank {rank()} got {name} again; already stopping")


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


# --------------------------------------------------------------------------- test-only faults

FAULT_ENV = "LAUNCHER_TEST_FAULT"
FAULT_KINDS = ("kill", "oom", "hang", "kill-in-save", "signal", "stall", "gil")


@dataclass(frozen=True)
class Fault:
    """Test-only (LAUNCHER_TEST_FAULT): make a rank fail for real at an optimizer step.

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
    attempt (default 0) is the attempt it fires on, so that a requeued job does not meet it again.
    Never set it outside tests."""

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
    return [f for f in parse_faults(os.environ.get(FAULT_ENV))
            if f.kind == kind and f.rank == rank() and f.step == step and f.attempt == attempt()]


def _fault_marker(f: Fault, step: int) -> None:
    """Where and when the fault struck (tests measure how fast the other ranks leave)."""
    out = os.environ.get("LAUNCHER_OUT_DIR")
    if out:
        try:
            write_marker(out, f"fault-{job_key()}-a{attempt()}-rank{rank()}", kind=f.kind, step=step)
        except OSError:
            pass


def inject_step_faults(step: int) -> None:
    for f in _faults_here("signal", step):
        _say(f"launcher: test fault: rank {rank()} sends itself {f.sig} at step {step}")
        os.kill(os.getpid(), getattr(signal, f.sig))
    for f in _faults_here("oom", step):
        import torch

        raise torch.OutOfMemoryError(f"test fault ({FAULT_ENV}): injected out of memory on rank {rank()} at step {step}")
    for f in _faults_here("hang", step):
        _fault_marker(f, step)
        _say(f"launcher: test fault: rank {rank()} stops (SIGSTOP) at step {step}")
        os.kill(os.getpid(), signal.SIGSTOP)
    for f in _faults_here("stall", step):
        _fault_marker(f, step)
        _say(f"launcher: test fault: rank {rank()} on {node_name()} stalls (sleeps in Python) at step {step}")
        _stall_forever()
    for f in _faults_here("gil", step):
        _fault_marker(f, step)
        _say(f"launcher: test fault: rank {rank()} on {node_name()} stalls in C holding the GIL at step {step}")
        _hold_gil_forever()
    for f in _faults_here("kill", step):
        _fault_marker(f, step)
        _say(f"launcher: test fault: rank {rank()} on {node_name()} kills itself (SIGKILL) at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)


def inject_save_faults(step: int) -> None:
    for f in _faults_here("kill-in-save", step):
        _fault_marker(f, step)
        _say(f"launcher: test fault: rank {rank()} killed (SIGKILL) in the middle of saving checkpoint-{step}")
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


# --------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint-N folder is complete when, and only when, it carries launcher's completion marker:
    written last, after every rank saved its part, before the rename. Nothing else counts: the Trainer
    writes trainer_state.json on rank 0 while other ranks may still be writing their shards, so a folder
    with it but no marker may be cut off mid-save (a save stopped midway normally stays in its staging
    folder; a checkpoint-N without the marker came from elsewhere or was moved by hand)."""
    return (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    if not checkpoints.is_dir():
        return []
    found = []
    for p in checkpoints.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and is_complete(p):
            found.append((step, p))
    return sorted(found)


def incomplete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints cut off mid-save: staging folders left by a crash, and checkpoint-N folders
    without a completion marker."""
    if not checkpoints.is_dir():
        return []
    out = []
    for p in sorted(checkpoints.iterdir()):
        if p.is_dir() and p.name.startswith(STAGING_PREFIX):
            out.append(p)
        elif checkpoint_step(p) is not None and p.is_dir() and not is_complete(p):
            out.append(p)
    return out


def checkpoint_info(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads((path / COMPLETE_MARKER).read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def estimate_checkpoint_bytes(model: Any, checkpoints: Path) -> int:
    """What the next checkpoint will take: the newest complete one's size when there is one; else
    from the model: its weights twice (the Trainer's model file and DeepSpeed's module states) in
    their dtype, plus 12 bytes per trainable parameter (fp32 master copy, Adam's two moments)."""
    done = complete_checkpoints(checkpoints)
    if done:
        return dir_bytes(done[-1][1])
    weights = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        weights += n * p.element_size()
        if p.requires_grad:
            trainable += n
    return 2 * weights + 12 * trainable


def disk_shortfall(needed: int, where: Path, margin: float = 1.1) -> str | None:
    """A message when `where` has less free space than `needed` x margin; None when it fits."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= needed * margin:
        return None
    return (f"{where} has {free / 2**20:,.0f} MiB free; the checkpoint needs about {needed / 2**20:,.0f} MiB "
            f"(+10%). Free space there or lower output.keep_last")


def prune(checkpoints: Path, keep_last: int) -> list[Path]:
    """Remove complete checkpoints beyond the newest `keep_last` and every incomplete one (global rank 0,
    when no save is in progress). Returns what was removed."""
    removed = []
    done = complete_checkpoints(checkpoints)
    for _, p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in incomplete_checkpoints(checkpoints):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def trainer_class() -> type:
    """transformers.Trainer with atomic checkpoints, a free-disk check and keep-last-K.

    Every rank writes into checkpoints/.staging-checkpoint-N/checkpoint-N (the Trainer's own save:
    model, DeepSpeed's engine, optimizer and scheduler states, RNG states, trainer_state.json); after
    a barrier rank 0 writes the completion marker, renames the folder to checkpoints/checkpoint-N and
    prunes to output.keep_last; a second barrier lets no rank run ahead of the rename. A crash at any
    point leaves either the previous checkpoints untouched or a staging folder that resume ignores."""
    from transformers import Trainer

    class ResilientTrainer(Trainer):
        launcher_keep_last: int = 2
        launcher_stopping: bool = False  # set by the stop callback: this save precedes a requeue
        launcher_staging: str | None = None

        def _get_output_dir(self, trial: Any) -> str:
            return self.launcher_staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(self.args.output_dir)
            step = self.state.global_step
            name = f"checkpoint-{step}"
            staging = root / f"{STAGING_PREFIX}{name}"
            final = root / name
            if rank() == 0:
                root.mkdir(parents=True, exist_ok=True)
                short = disk_shortfall(estimate_checkpoint_bytes(self.model, root), root)
            else:
                short = None
            if agree(short is not None, self.args.device):
                if not self.launcher_stopping:
                    if rank() == 0:
                        print(f"launcher: skipping the checkpoint at step {step}: {short or 'disk short on rank 0'}",
                              flush=True)
                    return
                if rank() == 0:
                    print(f"launcher: saving the stop checkpoint at step {step} anyway: {short}", flush=True)
            if rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
            barrier()
            self.launcher_staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.launcher_staging = None
            inject_save_faults(step)
            barrier()  # every rank's shards are on disk
            if rank() == 0:
                part = staging / name
                info = {"step": step, "world_size": world_size(), "time": time.time(),
                        "zero_stage": _zero_stage(self), "job_id": job_key(), "attempt": attempt()}
                tmp = part / (COMPLETE_MARKER + ".tmp")
                with open(tmp, "w") as f:
                    f.write(json.dumps(info) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, part / COMPLETE_MARKER)
                _fsync_dir(part)
                if final.exists():  # the same step saved again (a resumed run stopping at once)
                    shutil.rmtree(final)
                os.replace(part, final)
                shutil.rmtree(staging, ignore_errors=True)
                _fsync_dir(root)
                prune(root, self.launcher_keep_last)
            barrier()  # nobody runs ahead of the rename

    return ResilientTrainer


def _zero_stage(trainer: Any) -> int | None:
    cfg = getattr(trainer.args, "deepspeed", None)
    if isinstance(cfg, dict):
        return cfg.get("zero_optimization", {}).get("stage")
    return None


def stop_callback() -> Any:
    """The per-step agreement: a TrainerCallback whose on_step_end all_reduces the stop flag and,
    when any rank was signalled, asks the Trainer to save now and stop. Test faults fire here too."""
    from transformers import TrainerCallback

    class StopAtAgreedStep(TrainerCallback):
        def __init__(self) -> None:
            self.stopped_at: int | None = None
            self.trainer: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            inject_step_faults(state.global_step)
            if state.global_step >= state.max_steps:
                return  # the run ends here anyway: a completed run, not a requeue
            if agree(stop_requested(), args.device):
                self.stopped_at = state.global_step
                if self.trainer is not None:
                    self.trainer.launcher_stopping = True
                control.should_save = True
                control.should_training_stop = True
                if rank() == 0:
                    print(f"launcher: ranks agreed to stop at step {state.global_step}/{state.max_steps} "
                          f"({STOP.signal_name or 'signal on another rank'}); saving a checkpoint", flush=True)

    return StopAtAgreedStep()


def finish_stop(out_dir: Path, step: int, checkpoint: Path | None) -> None:
    """After the stop checkpoint: all ranks barrier, rank 0 writes the requeue marker, barrier."""
    barrier()
    if rank() == 0:
        write_marker(out_dir, requeue_marker_name(), reason="requeue", exit_code=3, step=step,
                     signal=STOP.signal_name, checkpoint=str(checkpoint) if checkpoint else None,
                     message=f"stopped at step {step} on {STOP.signal_name or 'a signal'}; checkpoint saved")
    barrier()


# --------------------------------------------------------------------------- resume

def resume_notes(checkpoints: Path) -> list[str]:
    return [f"launcher: skipping {p.name}: cut off mid-save (no {COMPLETE_MARKER}); the newest complete "
            f"checkpoint is used" for p in incomplete_checkpoints(checkpoints)]


def saved_world_size(ckpt: Path) -> int | None:
    """How many ranks wrote a checkpoint: the completion marker says; else count the RNG files."""
    info = checkpoint_info(ckpt)
    if isinstance(info.get("world_size"), int):
        return int(info["world_size"])
    rng = list(ckpt.glob("rng_state_*.pth"))
    if rng:
        return len(rng)
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def universal_tag(ckpt: Path) -> str | None:
    p = ckpt / "latest_universal"
    if p.is_file():
        tag = p.read_text().strip()
        if tag and (ckpt / tag).is_dir():
            return tag
    return None


def convert_to_universal(ckpt: Path) -> str:
    """DeepSpeed's ds_to_universal on CKPT/global_stepN -> CKPT/global_stepN_universal, with
    --inject_missing_state (a Trainer checkpoint lacks universal_checkpoint_info), then
    CKPT/latest_universal. Runs on global rank 0 in a subprocess; returns the tag."""
    import subprocess

    tag = (ckpt / "latest").read_text().strip()
    out_tag = f"{tag}_universal"
    tmp = ckpt / f".{out_tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
            "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
            "--num_merge_workers", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ckpt / tag} (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    shutil.rmtree(ckpt / out_tag, ignore_errors=True)
    os.replace(tmp, ckpt / out_tag)
    (ckpt / "latest_universal").write_text(out_tag)
    return out_tag


def world_size_change_message(ckpt: Path, saved: int, now: int) -> str:
    tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else "global_stepN"
    return (f"{ckpt} was saved by {saved} rank(s) and this job runs {now}; a DeepSpeed checkpoint loads only at "
            f"the world size that wrote it. Either run {saved} rank(s) again, or convert it once to a universal "
            f"checkpoint and resume (python -m deepspeed.checkpoint.ds_to_universal "
            f"--input_folder {ckpt / tag} --output_folder {ckpt / (tag + '_universal')} --inject_missing_state "
            f"&& echo {tag}_universal > {ckpt / 'latest_universal'})")


def prepare_resume(ckpt: Path, ds_config: dict[str, Any], *, convert: bool = True) -> str | None:
    """Make `ckpt` loadable at this world size. Same world size: nothing to do (None). Another: convert it
    to a universal checkpoint (global rank 0, the others wait) and switch DeepSpeed to load it
    (ds_config['checkpoint']['load_universal']); returns a note to print. Refuses (UserError) when
    conversion is off."""
    saved, now = saved_world_size(ckpt), world_size()
    if saved is None or saved == now:
        return None
    if not convert:
        raise UserError(world_size_change_message(ckpt, saved, now))
    tag = universal_tag(ckpt)
    if tag is None:
        if rank() == 0:
            try:
                tag = convert_to_universal(ckpt)
            except Exception as exc:  # conversion failed: say how to do it by hand
                raise UserError(world_size_change_message(ckpt, saved, now) + f". Automatic conversion failed: {exc}") from None
        # the others wait for rank 0's conversion on the shared run dir (no process group yet)
        deadline = time.monotonic() + 3600
        while universal_tag(ckpt) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ckpt / 'latest_universal'} did not appear within an hour (written by global rank 0)")
            time.sleep(0.5)
        tag = universal_tag(ckpt)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return (f"resuming {ckpt.name} saved by {saved} rank(s) on {now} rank(s) through DeepSpeed's universal "
            f"checkpoint ({tag}); the data order differs from an uninterrupted run at {saved} rank(s) "
            f"(samples are sharded over the new world size), so no exact-resume guarantee here")


# --------------------------------------------------------------------------- the rank's exit

def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _is_collective_failure(exc: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = f"{type(exc).__name__}: {exc}"
    return bool(re.search(r"Connection closed by peer|Connection reset by peer|Timed out|timeout|"
                          r"ProcessGroup(Gloo|NCCL)|\bgloo\b|\bNCCL\b|c10d", text, re.I)) and isinstance(exc, RuntimeError)


def run_rank(out_dir: Path, body: Callable[[], Any]) -> Any:
    """Run this rank's training with its markers and exit codes:
    start marker; body(); exit marker. Out of memory -> exit 5; a failed collective (a rank died or
    hung, the timeout passed) -> exit 1 with one line naming this rank and node; bad input -> 2
    (raised on); anything else is a bug (raised on, traceback, exit 1)."""
    from launcher.errors import EXIT_FAILED, EXIT_OOM

    install_signal_handlers()
    os.environ["LAUNCHER_OUT_DIR"] = str(out_dir)
    try:
        write_marker(out_dir, start_marker_name())
    except OSError:
        pass
    try:
        result = body()
    except UserError as exc:
        _exit_marker(out_dir, "bad_input", 2, str(exc))
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if _is_oom(exc):
            msg = f"rank {rank()} on {node_name()}: out of memory: {exc}"
            _exit_marker(out_dir, "oom", EXIT_OOM, msg)
            _hard_exit(EXIT_OOM, f"error: {msg}. Lower optim.micro_batch or --seq-len, turn on --grad-ckpt, "
                                 f"or use a higher ZeRO stage / offload")
        if _is_collective_failure(exc):
            timeout = os.environ.get("LAUNCHER_COLLECTIVE_TIMEOUT_S", "?")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = (f"rank {rank()} on {node_name()}: a collective failed (collective timeout {timeout} s): "
                   f"another rank died or hung: {type(exc).__name__}: {first}")
            _exit_marker(out_dir, "collective_timeout", EXIT_FAILED, msg)
            _hard_exit(EXIT_FAILED, f"error: {msg}")
        _exit_marker(out_dir, "failed", EXIT_FAILED, f"{type(exc).__name__}: {exc}")
        raise
    return result


def leave_process_group() -> None:
    """For a rank's entry point once training returned on every rank (done, or stopped at the same step):
    leave the process group before the interpreter exits. Left to the exit, gloo's worker threads can
    outlive it and abort the rank (SIGABRT, "terminate called without an active exception") after a run
    that finished. Not after a failure: another rank may still be inside a collective, and destroying
    the group there can block."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_marker(out_dir: Path, reason: str, code: int, message: str, **extra: Any) -> None:
    try:
        write_marker(out_dir, exit_marker_name(), reason=reason, exit_code=code, message=message[:2000], **extra)
    except OSError:
        pass


def mark_exit(out_dir: Path, reason: str, code: int, message: str = "", **extra: Any) -> None:
    _exit_marker(out_dir, reason, code, message, **extra)


def _hard_exit(code: int, message: str) -> None:
    """Exit now: after a failed collective the process group's threads can block a normal shutdown."""
    _say(message)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
