"""What global rank 0 adds to the run's manifest.json: one entry per attempt (job id and attempt number,
Slurm job id and node list, devices, CUDA and driver versions, the packages on the node, start and end
time, why it ended, the steps and tokens it trained, its last loss and eval numbers), and the run's final
numbers once training completes. A requeued or retried job appends its own entry; nothing is overwritten.

Only global rank 0 writes; `gather_devices` is the one collective (every rank calls it). Torch is
imported inside the functions.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.rundir import manifest as manifest_file
from launcher.rundir import markers
from launcher.rundir.layout import RunDir
from launcher.rundir.metrics import PREFERENCE_EVAL_KEYS, eval_numbers


# --------------------------------------------------------------------------- pure parts

def slurm_fields(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Slurm job and its node list when the rank runs in one (None outside Slurm)."""
    env = dict(os.environ) if env is None else env
    return {"slurm_job_id": env.get("SLURM_JOB_ID") or None,
            "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID") or None,
            "nodes": env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or None}


def last_metrics(log_history: list[dict[str, Any]], *, preference: bool = False) -> dict[str, Any]:
    """The last logged train loss and the last evaluation from the Trainer's log: its loss and perplexity,
    or for a preference task (`preference`) its loss, reward accuracy and margin (metrics.eval_numbers)."""
    out: dict[str, Any] = {}
    for rec in log_history:
        if "loss" in rec:
            out["loss"], out["loss_step"] = float(rec["loss"]), rec.get("step")
        if "eval_loss" in rec:
            out["eval_loss"], out["eval_step"] = float(rec["eval_loss"]), rec.get("step")
            ppl, extra = eval_numbers(rec, preference)
            for k in ("perplexity", *PREFERENCE_EVAL_KEYS):  # the last evaluation's own, not an older one's
                out.pop(k, None)
            if ppl is not None:
                out["perplexity"] = ppl
            out.update(extra)
    return out


# --------------------------------------------------------------------------- what this node has

def driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi; pynvml when installed), or None."""
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0].strip() if out else None


def environment(device: str) -> dict[str, Any]:
    """Versions as this node sees them (the submitting host may differ): Python, packages (flash_attn when
    installed), CUDA runtime, NCCL and driver on GPU nodes."""
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "packages": manifest_file.package_versions(),
                           "device": device}
    if device == "cuda" and torch.cuda.is_available():
        try:
            nccl = torch.cuda.nccl.version()
        except Exception:  # a build without NCCL
            nccl = None
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=driver_version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
    return env


def local_device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def gather_devices(device: str) -> list[dict[str, Any]]:
    """Every rank's node and device, grouped: [{"node", "device", "ranks"}]. A collective: all ranks call it."""
    import torch.distributed as dist

    who = identity.current()
    mine = (who.rank, who.node, local_device_name(device))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    groups: dict[tuple[str, str], list[int]] = {}
    for r, node, name in everyone:
        groups.setdefault((node, name), []).append(r)
    return [{"node": node, "device": name, "ranks": sorted(ranks)} for (node, name), ranks in groups.items()]


# --------------------------------------------------------------------------- this attempt

class Attempt:
    """This attempt's entry in manifest.json, written by global rank 0 (a no-op on the other ranks):
    `start` as soon as the rank knows where it resumes from, `devices` once the process group is up,
    `end` when it completes, stops on a signal or fails. Writing never fails the run."""

    def __init__(self, run_dir: Path, *, tokens_per_step: int, world_size: int, max_steps: int, device: str,
                 preference: bool = False):
        who = identity.current()
        self.run_dir = Path(run_dir)
        self.key = (who.job_key, who.attempt)
        self.writer = who.rank == 0
        self.tokens_per_step, self.world_size, self.max_steps, self.device = tokens_per_step, world_size, max_steps, device
        self.preference = preference  # the task's: how its evaluations read (last_metrics)
        self.start_step = 0
        self.trainer: Any = None  # set once built: the end record reads its state
        self.mixture: Any = None  # a mixture's Schedule: the final record gets the tokens per source
        self.ended = False
        # The hang watchdog may end the attempt from its thread just as the main thread does (a rank whose
        # collective failed when its peer died, at the deadline of its own watchdog): one end is written,
        # whole, before the watchdog's exit.
        self._ending = threading.Lock()

    def _write(self, **fields: Any) -> None:
        if not self.writer:
            return
        try:
            manifest_file.record_attempt(self.run_dir, *self.key, **fields)
        except (OSError, ValueError) as exc:  # the run matters more than its record
            self._could_not_update(exc)

    def _could_not_update(self, exc: Exception) -> None:
        print(f"launcher: could not update {RunDir(self.run_dir).manifest_path}: {exc}", file=sys.stderr, flush=True)

    def start(self, resume: Path | None, resume_step: int | None) -> None:
        self.start_step = resume_step or 0
        if not self.writer:
            return
        try:
            env = environment(self.device)
        except Exception as exc:  # the run matters more than its record
            env = {"error": f"{type(exc).__name__}: {exc}"}
        self._write(start=time.time(), end=None, exit_reason=None, host=identity.current().node, **slurm_fields(),
                    world_size=self.world_size, tokens_per_step=self.tokens_per_step, max_steps=self.max_steps,
                    resumed_from=str(resume) if resume is not None else None, start_step=self.start_step,
                    environment=env)

    def devices(self) -> None:
        found = gather_devices(self.device)  # every rank takes part
        self._write(devices=found)

    def end(self, reason: str, *, message: str = "") -> None:
        # Waits (a bounded time: the writer may itself be what hangs) for an end being written elsewhere.
        if not self._ending.acquire(timeout=10):
            return
        try:
            self._end(reason, message)
        finally:
            self._ending.release()

    def _end(self, reason: str, message: str) -> None:
        if self.ended:
            return
        self.ended = True
        state = getattr(self.trainer, "state", None)
        # before the Trainer loads the checkpoint its step is 0: the attempt is still at its start step
        step = max(int(state.global_step), self.start_step) if state is not None else None
        metrics = last_metrics(list(state.log_history), preference=self.preference) if state is not None else {}
        fields: dict[str, Any] = dict(end=time.time(), exit_reason=reason, end_step=step, metrics=metrics)
        if step is not None:
            fields["steps"] = max(0, step - self.start_step)
            fields["tokens"] = fields["steps"] * self.tokens_per_step
        if message:
            fields["message"] = message[:2000]
        self._write(**fields)
        if reason == markers.COMPLETED and self.writer:
            self._final(step, metrics)

    def _final(self, step: int | None, metrics: dict[str, Any]) -> None:
        try:
            attempts = manifest_file.attempt_entries(manifest_file.read_manifest(self.run_dir))
            final = {"steps": step, "tokens": manifest_file.tokens_in_model(attempts), "attempts": len(attempts),
                     "started": min((a["start"] for a in attempts if a.get("start")), default=None),
                     "ended": time.time(), **{k: metrics[k] for k in ("loss", "eval_loss", "perplexity") if k in metrics}}
            if self.mixture is not None and step is not None:
                seq_len = self.tokens_per_step // self.mixture.g
                final["tokens_by_source"] = self.mixture.tokens_by_source(step, seq_len)
            manifest_file.update_manifest(self.run_dir, final=final)
        except (OSError, ValueError) as exc:
            self._could_not_update(exc)
