"""RUN_DIR/checkpoints: the names of its folders, which of them are complete, and which one a run resumes
from. A checkpoint-N folder is complete when, and only when, it holds launcher's completion marker.
Stdlib only: pre-flight, `launcher run` and the ranks read it; the ranks write checkpoints (rank/checkpoint.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launcher.errors import UserError

COMPLETE_MARKER = "launcher-complete.json"  # written last into a checkpoint, before its rename
STAGING_PREFIX = ".staging-"  # checkpoints/.staging-checkpoint-N/checkpoint-N while it is written
PREFIX = "checkpoint-"  # the Trainer's own folder name (transformers' PREFIX_CHECKPOINT_DIR + "-N")
_CHECKPOINT = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def staging_name(step: int) -> str:
    return f"{STAGING_PREFIX}{checkpoint_name(step)}"


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


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint-N. A folder without the completion marker (cut off mid-save, even
    with the Trainer's trainer_state.json) is never newest."""
    found = complete_checkpoints(checkpoints)
    return found[-1][1] if found else None


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


def resume_point(value: str, checkpoints: Path) -> Path | None:
    """Where `output.resume` says to resume from: 'never' -> None, 'auto' -> the newest complete checkpoint
    in `checkpoints` (None when there is none), else the given folder, which must be complete."""
    if value == "never":
        return None
    if value == "auto":
        return newest_checkpoint(checkpoints)
    p = Path(value).expanduser()
    if not p.is_dir() or not is_complete(p):
        raise UserError(f"output.resume={value!r} is not a complete checkpoint: no {COMPLETE_MARKER} in "
                        f"it (launcher writes it last, once every rank saved; without it the save may have been cut "
                        f"off). Give a checkpoint-N folder of a launcher run, 'auto' (the newest complete one in the "
                        f"run dir) or 'never'", field="output.resume")
    return p
