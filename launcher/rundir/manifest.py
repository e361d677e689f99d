"""RUN_DIR/manifest.json: what produced a run (written where it is launched), one entry per attempt (written
by global rank 0) and the run's final numbers. Every write replaces the file atomically."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import __version__, assets
from launcher.config.resolve import deep_merge
from launcher.errors import UserError
from launcher.rundir import damage
from launcher.rundir.layout import RunDir

if TYPE_CHECKING:
    from launcher.config.spec import RunSpec
    from launcher.plan.plan import Plan

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "flash_attn",
            "flash-attn", "tokenizers", "pydantic", "click")


def package_versions(names: tuple[str, ...] = PACKAGES, *, missing: bool = False) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported); `missing`: keep a package that
    is not installed, as None (doctor compares nodes by it)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing:
                out[name.replace("-", "_")] = None
    return out


def launcher_commit() -> str | None:
    """The git commit of the launcher source, when it runs from a checkout."""
    import subprocess

    root = assets.PACKAGE_PARENT
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) or None


def launch_manifest(spec: RunSpec, plan: Plan, data: list[dict[str, Any]]) -> dict[str, Any]:
    """What produced this run, as known where it is launched (`data`: the data files' fingerprints).
    Ranks add devices, times and metrics."""
    return {
        "name": spec.name,
        "created": time.time(),
        "launcher_version": __version__,
        "launcher_commit": launcher_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": platform.node(),
        "spec_sha256": hashlib.sha256(spec.to_yaml().encode()).hexdigest(),
        "seed": spec.optim.seed,
        "data": data,
        "plan": {"world_size": plan.world_size, "nodes": plan.nodes, "micro_batch": plan.micro_batch,
                 "grad_accum": plan.grad_accum, "global_batch": plan.global_batch,
                 "tokens_per_step": plan.tokens_per_step, "max_steps": plan.max_steps},
    }


def read_manifest(run_dir: str | os.PathLike, *, strict: bool = False) -> dict[str, Any]:
    """The manifest, or {} where the run dir has none yet. One that cannot be read as a JSON object (written
    by hand, cut off): said on stderr and {} for a reader; with `strict` (a writer about to merge into it),
    UserError naming the file and the fix."""
    path = RunDir(Path(run_dir)).manifest_path
    try:
        return damage.read_object(path)
    except (OSError, ValueError, RecursionError) as exc:
        why = damage.describe(exc)
        if strict:
            raise UserError(f"{path} is not a manifest launcher can read ({why}); move it away (or delete it) "
                            f"and run again", field="manifest.json") from None
        damage.skipped(path, why)
        return {}


def attempt_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's attempt entries, oldest first."""
    return [a for a in manifest.get("attempts") or [] if isinstance(a, dict)]


def _write(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def update_manifest(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Merge fields into the manifest (the launch writes what produced the run, rank 0 the final numbers)."""
    _write(RunDir(Path(run_dir)).manifest_path, deep_merge(read_manifest(run_dir, strict=True), fields))


def record_attempt(run_dir: str | os.PathLike, job_id: str, attempt: int, **fields: Any) -> dict[str, Any]:
    """Add or update one attempt in the manifest's "attempts", keyed by job id and attempt number: a
    requeued or retried job appends its own entry, an earlier attempt is never overwritten. Global rank 0
    of the training ranks writes (start, devices, end); returns the entry."""
    current = read_manifest(run_dir, strict=True)
    entries = attempt_entries(current)
    for entry in entries:
        if entry.get("job_id") == str(job_id) and entry.get("attempt") == attempt:
            entry.update(deep_merge(entry, fields))
            break
    else:
        entry = {"job_id": str(job_id), "attempt": attempt, **fields}
        entries.append(entry)
    current["attempts"] = entries
    _write(RunDir(Path(run_dir)).manifest_path, current)
    return entry


def tokens_in_model(attempts: list[dict[str, Any]]) -> int:
    """Tokens the final weights were trained on, over the chain of attempts that led to them: walking back
    from the last attempt, each earlier one counts only up to the step the next resumed from (steps after
    its last checkpoint were redone). An attempt with no recorded end (killed) is taken to have reached
    the next one's start. Each attempt counts at its own tokens per step (the world size may change)."""
    total, cursor = 0, None
    for a in reversed(attempts):
        start = _whole(a.get("start_step")) or 0
        end = _whole(a.get("end_step"))
        end = cursor if end is None else (end if cursor is None else min(end, cursor))
        if end is None or (cursor is not None and start >= cursor):
            continue
        total += max(0, end - start) * (_whole(a.get("tokens_per_step")) or 0)
        cursor = start
    return total


def _whole(v: Any) -> int | None:
    """A whole number from the manifest, or None where a hand-edited one holds something else."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        return None
    return int(v)
