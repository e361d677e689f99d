"""trackers.json: each experiment tracker's run id and the last step logged to it, so that every attempt
of a run (requeue, retry, `--then` job, resume) logs to the one tracker run the first attempt made, and a
step logged before a resume is not logged again. Global rank 0 writes it (atomically); `launcher sync`
reads it. Stdlib only.

    {"wandb": {"run_id": "1a2b3c4d", "project": "p", "entity": null, "mode": "offline", "last_step": 12},
     "mlflow": {"run_id": "...", "experiment_id": "1", "tracking_uri": "http://...", "last_step": 12}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launcher.rundir import damage
from launcher.rundir.layout import RunDir


def read_state(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every tracker's entry, or {} where there is none yet. A file that is not a JSON object of objects
    (written by hand, cut off) is said once and read as {}: the trackers then start new runs."""
    path = RunDir(Path(run_dir)).trackers_path
    try:
        return {k: v for k, v in damage.read_object(path).items() if isinstance(v, dict)}
    except (OSError, ValueError, RecursionError) as exc:
        damage.skipped(path, damage.describe(exc))
        return {}


def update_state(run_dir: str | os.PathLike, tracker: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into one tracker's entry and write the file (replaced atomically); returns the entry."""
    path = RunDir(Path(run_dir)).trackers_path
    state = read_state(run_dir)
    entry = {**state.get(tracker, {}), **fields}
    state[tracker] = entry
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return entry


def last_step(entry: dict[str, Any]) -> int:
    """The last step an entry says was logged (0 for none or a hand-edited value that is no step)."""
    v = entry.get("last_step")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def wandb_offline_runs(run_dir: str | os.PathLike, run_id: str) -> list[Path]:
    """The offline wandb run folders of one run id in the run dir, oldest first (one per attempt)."""
    root = RunDir(Path(run_dir)).wandb_dir / "wandb"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"offline-run-*-{run_id}") if p.is_dir())
