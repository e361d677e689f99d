"""Key numbers of run dirs, read from their own files (spec, manifest, metrics, jobs): what `launcher runs`
lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher import yamlio
from launcher.errors import UserError
from launcher.rundir import damage
from launcher.rundir import jobs as jobs_file
from launcher.rundir import manifest as manifest_file
from launcher.rundir import metrics
from launcher.rundir.layout import OWN_FOLDERS, RunDir


def summary(run_dir: Path) -> dict[str, Any]:
    """Key numbers of one run dir, from its own files: spec, manifest, metrics, jobs."""
    rd = RunDir(Path(run_dir))
    try:
        spec = _dict(yamlio.load_file(rd.spec_path))
    except UserError as exc:  # a spec.yaml written by hand or cut off: the other files still answer
        damage.skipped(rd.spec_path, str(exc).removeprefix("invalid run spec: "))
        spec = {}
    manifest = manifest_file.read_manifest(rd.path)
    last = metrics.last_train(metrics.read_records(rd.path))
    jobs = jobs_file.read_jobs(rd.path)
    # a completed run's numbers come from the manifest (rank 0 wrote them at the end); a run still going
    # or stopped (also one started again after it completed), from its metrics log
    attempts = manifest_file.attempt_entries(manifest)
    final = _dict(manifest.get("final"))
    if attempts and attempts[-1].get("exit_reason") != "completed":
        final = {}
    if final:
        step, loss, tokens = final.get("steps"), final.get("loss"), final.get("tokens")
    else:
        step, loss = last.get("step"), last.get("loss")
        tokens = manifest_file.tokens_in_model(attempts) if attempts else None
    return {
        "run_dir": str(rd.path), "name": _text(spec.get("name")), "task": _text(spec.get("task")),
        "method": _text(_dict(spec.get("method")).get("name")), "model": _text(_dict(spec.get("model")).get("name")),
        "world_size": _num(_dict(manifest.get("plan")).get("world_size")),
        "step": _num(step), "max_steps": _num(_dict(spec.get("optim")).get("max_steps")),
        "loss": _num(loss), "tokens": _num(tokens), "eval_loss": _num(final.get("eval_loss")),
        "attempts": len(attempts), "last_exit": _text(attempts[-1].get("exit_reason")) if attempts else None,
        "jobs": len(jobs), "last_job": str(jobs[-1]["job_id"]) if jobs else None,
        "created": _num(manifest.get("created")), "final": rd.final.is_dir(),
    }


# Values from files anyone may have edited: a wrong type reads as unknown rather than breaking the listing.
def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any) -> int | float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _text(v: Any) -> str | None:
    return None if v is None else yamlio.quote(v, 60) if not isinstance(v, str) else v[:200]


def find_run_dirs(root: Path, depth: int = 3) -> list[Path]:
    """Run dirs (a spec and a manifest) at or below root, `depth` folders deep at most."""
    found = []
    rd = RunDir(root)
    if rd.spec_path.is_file() and rd.manifest_path.is_file():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name not in OWN_FOLDERS:
            found += find_run_dirs(child, depth - 1)
    return found
