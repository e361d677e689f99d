"""Atomic checkpoints on every rank: each save goes to a staging folder and is renamed once every rank
wrote its part, with launcher's completion marker written last; only complete checkpoints are resumed
from. Also the free-disk check before a save, keep-last-K pruning, and resuming on another number of
ranks through DeepSpeed's universal checkpoint.

Torch, transformers and deepspeed are imported inside the functions (or run in a subprocess); the rest
is stdlib.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from launcher import identity
from launcher.errors import UserError
from launcher.rank.stop import agree, barrier
from launcher.rundir.checkpoints import (COMPLETE_MARKER, checkpoint_info, checkpoint_name, complete_checkpoints,
                                         incomplete_checkpoints, staging_name)

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


def trainer_class(base: type | None = None) -> type:
    """transformers.Trainer (or `base`, a subclass of it: TRL's trainers) with atomic checkpoints, a free-disk
    check and keep-last-K.

    Every rank writes into checkpoints/.staging-checkpoint-N/checkpoint-N (the Trainer's own save:
    model, DeepSpeed's engine, optimizer and scheduler states, RNG states, trainer_state.json); after
    a barrier rank 0 writes the completion marker, renames the folder to checkpoints/checkpoint-N and
    prunes to output.keep_last; a second barrier lets no rank run ahead of the rename. A crash at any
    point leaves either the previous checkpoints untouched or a staging folder that resume ignores."""
    from transformers import Trainer

    class ResilientTrainer(base or Trainer):  # type: ignore[misc, valid-type]
        launcher_keep_last: int = 2
        launcher_stopping: bool = False  # set by the stop callback: this save precedes a requeue
        launcher_staging: str | None = None
        # called with the step on every rank after its part of a save is on disk, before the completion
        # marker (launcher.testing.faults cuts a save off there)
        launcher_after_save: Callable[[int], None] | None = None

        def _get_output_dir(self, trial: Any) -> str:
            return self.launcher_staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(self.args.output_dir)
            step = self.state.global_step
            name = checkpoint_name(step)
            staging = root / staging_name(step)
            final = root / name
            if identity.rank() == 0:
                root.mkdir(parents=True, exist_ok=True)
                short = disk_shortfall(estimate_checkpoint_bytes(self.model, root), root)
            else:
                short = None
            if agree(short is not None, self.args.device):
                if not self.launcher_stopping:
                    if identity.rank() == 0:
                        print(f"launcher: skipping the checkpoint at step {step}: {short or 'disk short on rank 0'}",
                              flush=True)
                    return
                if identity.rank() == 0:
                    print(f"launcher: saving the stop checkpoint at step {step} anyway: {short}", flush=True)
            if identity.rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
            barrier()
            self.launcher_staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.launcher_staging = None
            if self.launcher_after_save is not None:
                self.launcher_after_save(step)
            barrier()  # every rank's shards are on disk
            who = identity.current()
            if who.rank == 0:
                part = staging / name
                info = {"step": step, "world_size": who.world_size, "time": time.time(),
                        "zero_stage": _zero_stage(self), "job_id": who.job_key, "attempt": who.attempt}
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
    saved, now = saved_world_size(ckpt), identity.current().world_size
    if saved is None or saved == now:
        return None
    if not convert:
        raise UserError(world_size_change_message(ckpt, saved, now))
    tag = universal_tag(ckpt)
    if tag is None:
        if identity.rank() == 0:
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
