"""Key numbers of run dirs, read from their own files (spec, manifest, metrics, jobs): what `launcher runs`
lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.rundir import jobs as jobs_file
from launcher.rundir import manifest as manifest_file
from launcher.rundir import metrics
from launcher.rundir.layout import OWN_FOLDERS, RunDir


def summary(run_dir: Path) -> dict[str, Any]:
    """Key numbers of one run dir, from its own files: spec, manifest, metrics, jobs."""
    rd = RunDir(Path(run_dir))
    import yaml

    spec = yaml.safe_load(rd.spec_path.read_text()) or {}
    manifest = manifest_file.read_manifest(rd.path)
    last = metrics.last_train(metrics.read_records(rd.path))
    jobs = jobs_file.read_jobs(rd.path)
    # a completed run's numbers come from the manifest (rank 0 wrote them at the end); a run still going
    # or stopped (also one started again after it completed), from its metrics log
    attempts = manifest_file.attempt_entries(manifest)
    final = manifest.get("final") or {}
    if attempts and attempts[-1].get("exit_reason") != "completed":
        final = {}
    if final:
        step, loss, tokens = final.get("steps"), final.get("loss"), final.get("tokens")
    else:
        step, loss = last.get("step"), last.get("loss")
        tokens = manifest_file.tokens_in_model(attempts) if attempts else None
    return {
        "run_dir": str(rd.path), "name": spec.get("name"), "task": spec.get("task"),
        "method": (spec.get("method") or {}).get("name"), "model": (spec.get("model") or {}).get("name"),
        "world_size": (manifest.get("plan") or {}).get("world_size"),
        "step": step, "max_steps": (spec.get("optim") or {}).get("max_steps"),
        "loss": loss, "tokens": tokens, "eval_loss": final.get("eval_loss"),
        "attempts": len(attempts), "last_exit": attempts[-1].get("exit_reason") if attempts else None,
        "jobs": len(jobs), "last_job": jobs[-1]["job_id"] if jobs else None,
        "created": manifest.get("created"), "final": rd.final.is_dir(),
    }


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
