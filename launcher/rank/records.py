"""What global rank 0 adds to the run's manifest.json: one entry per attempt (job id and attempt number,
Slurm job id and node list, devices, CUDA and driver versions, the packages on the node, start and end
time, why it ended, the steps and tokens it trained, its last loss and eval numbers), and the run's final
numbers once training completes. A requeued or retried job appends its own entry; nothing is overwritten.

Only global rank 0 writes; `gather_devices` is the one collective (every rank calls it). Torch is
imported inside the functions.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher.errors import UserError


# --------------------------------------------------------------------------- pure parts

def slurm_fields(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Slurm job and its node list when the rank runs in one (None outside Slurm)."""
    env = dict(os.environ) if env is None else env
    return {"slurm_job_id": env.get("SLURM_JOB_ID") or None,
            "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID") or None,
            "nodes": env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or None}


def last_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged train loss and the last evaluation (loss, perplexity) from the Trainer's log."""
    out: dict[str, Any] = {}
    for rec in log_history:
        if "loss" in rec:
            out["loss"], out["loss_step"] = float(rec["loss"]), rec.get("step")
        if "eval_loss" in rec:
            loss = float(rec["eval_loss"])
            out["eval_loss"], out["eval_step"] = loss, rec.get("step")
            out["perplexity"] = math.exp(loss) if loss < 50 else float("inf")
    return out


def tokens_in_model(attempts: list[dict[str, Any]]) -> int:
    """Tokens the final weights were trained on, over the chain of attempts that led to them: walking back
    from the last attempt, each earlier one counts only up to the step the next resumed from (steps after
    its last checkpoint were redone). An attempt with no recorded end (killed) is taken to have reached
    the next one's start. Each attempt counts at its own tokens per step (the world size may change)."""
    total, cursor = 0, None
    for a in reversed(attempts):
        start = int(a.get("start_step") or 0)
        end = a.get("end_step")
        end = cursor if end is None else (int(end) if cursor is None else min(int(end), cursor))
        if end is None or (cursor is not None and start >= cursor):
            continue
        total += max(0, end - start) * int(a.get("tokens_per_step") or 0)
        cursor = start
    return total


def exit_reason(exc: BaseException) -> str:
    """The word jobs/status and the markers use for how a rank ended."""
    from launcher.rank import resilience

    if isinstance(exc, UserError):
        return "bad_input"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    if resilience._is_oom(exc):
        return "oom"
    if resilience._is_collective_failure(exc):
        return "collective_timeout"
    return "failed"


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

    from launcher.rundir.layout import package_versions

    env: dict[str, Any] = {"python": sys.version.split()[0], "packages": package_versions(), "device": device}
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

    from launcher.rank.resilience import node_name, rank

    mine = (rank(), node_name(), local_device_name(device))
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

    def __init__(self, run_dir: Path, *, tokens_per_step: int, world_size: int, max_steps: int, device: str):
        from launcher.rank.resilience import attempt, job_key, rank

        self.run_dir = Path(run_dir)
        self.key = (job_key(), attempt())
        self.writer = rank() == 0
        self.tokens_per_step, self.world_size, self.max_steps, self.device = tokens_per_step, world_size, max_steps, device
        self.start_step = 0
        self.trainer: Any = None  # set once built: the end record reads its state
        self.ended = False

    def _write(self, **fields: Any) -> None:
        if not self.writer:
            return
        from launcher.rundir.layout import record_attempt

        try:
            record_attempt(self.run_dir, *self.key, **fields)
        except (OSError, ValueError) as exc:  # the run matters more than its record
            print(f"launcher: could not update {self.run_dir / 'manifest.json'}: {exc}", file=sys.stderr, flush=True)

    def start(self, resume: Path | None, resume_step: int | None) -> None:
        self.start_step = resume_step or 0
        if not self.writer:
            return
        from launcher.rank.resilience import node_name

        try:
            env = environment(self.device)
        except Exception as exc:  # the run matters more than its record
            env = {"error": f"{type(exc).__name__}: {exc}"}
        self._write(start=time.time(), end=None, exit_reason=None, host=node_name(), **slurm_fields(),
                    world_size=self.world_size, tokens_per_step=self.tokens_per_step, max_steps=self.max_steps,
                    resumed_from=str(resume) if resume is not None else None, start_step=self.start_step,
                    environment=env)

    def devices(self) -> None:
        found = gather_devices(self.device)  # every rank takes part
        self._write(devices=found)

    def end(self, reason: str, *, message: str = "") -> None:
        if self.ended:
            return
        self.ended = True
        state = getattr(self.trainer, "state", None)
        # before the Trainer loads the checkpoint its step is 0: the attempt is still at its start step
        step = max(int(state.global_step), self.start_step) if state is not None else None
        metrics = last_metrics(list(state.log_history)) if state is not None else {}
        fields: dict[str, Any] = dict(end=time.time(), exit_reason=reason, end_step=step, metrics=metrics)
        if step is not None:
            fields["steps"] = max(0, step - self.start_step)
            fields["tokens"] = fields["steps"] * self.tokens_per_step
        if message:
            fields["message"] = message[:2000]
        self._write(**fields)
        if reason == "completed" and self.writer:
            self._final(step, metrics)

    def _final(self, step: int | None, metrics: dict[str, Any]) -> None:
        import json

        from launcher.rundir.layout import update_manifest

        try:
            manifest = json.loads((self.run_dir / "manifest.json").read_text())
            attempts = manifest.get("attempts") or []
            final = {"steps": step, "tokens": tokens_in_model(attempts), "attempts": len(attempts),
                     "started": min((a["start"] for a in attempts if a.get("start")), default=None),
                     "ended": time.time(), **{k: metrics[k] for k in ("loss", "eval_loss", "perplexity") if k in metrics}}
            update_manifest(self.run_dir, final=final)
        except (OSError, ValueError) as exc:
            print(f"launcher: could not update {self.run_dir / 'manifest.json'}: {exc}", file=sys.stderr, flush=True)
