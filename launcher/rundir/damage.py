"""What a reader of a run dir skipped: a file or a line written by hand, by another version of launcher, or
cut off by a killed process. Each is said once on stderr, naming the file and line; the reader goes on
with the rest (`status`, `logs`, `cost`, `runs` answer for everything else the run dir holds)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_said: set[str] = set()


def skipped(path: str | os.PathLike[str], why: str, line: int | None = None) -> None:
    """Say once that `path` (at `line`) was skipped and why."""
    where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
    text = f"warning: {where}: {why}; skipped"
    if text not in _said:
        _said.add(text)
        print(text, file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    """A short cause for a file that could not be read or parsed."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "..."


def read_object(path: Path) -> dict[str, Any]:
    """A run-dir JSON file that holds one object: {} where it does not exist; OSError, ValueError or
    RecursionError (for `describe`) where it cannot be read or is not an object."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data
