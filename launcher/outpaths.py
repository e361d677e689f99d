"""Where launcher writes what a user asked for (`--out`, `config -o`, `--write-presets`, `eval --out`): a path
that cannot be made or written (under a regular file, in /proc or /sys, a name over 255 bytes, a symlink
loop, a folder the user may not write to) is bad input, one message naming the path and the cause (exit 2).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from launcher.errors import UserError


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENAMETOOLONG:
            return "a name in it is too long (255 bytes per name at most)"
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir(exist_ok=True) over a file: EEXIST
            return "a part of it is a file, not a folder"
        return exc.strerror or str(exc)
    return str(exc)  # RuntimeError("Symlink loop from ...") of Path.resolve


def refused(path: str | os.PathLike[str], flag: str, exc: BaseException) -> UserError:
    return UserError(f"{flag} {os.fspath(path)}: cannot write there ({_cause(exc)}); choose another path",
                     field=flag)


@contextmanager
def writing(path: str | os.PathLike[str], flag: str) -> Iterator[None]:
    """OSError while making or writing `path` (or what is under it) -> UserError naming it and the cause."""
    try:
        yield
    except OSError as exc:
        raise refused(path, flag, exc) from None


def resolve(path: str | os.PathLike[str], flag: str) -> Path:
    """The absolute path, refused when it cannot name a place to write (a symlink loop, a name too long)."""
    p = Path(path).expanduser()
    try:
        resolved = p.resolve()
        if resolved.exists() and not resolved.is_dir() and not resolved.is_file():
            raise UserError(f"{flag} {p}: not a regular file or folder; choose another path", field=flag)
    except (OSError, RuntimeError) as exc:
        raise refused(p, flag, exc) from None
    for part in resolved.parts:
        if len(os.fsencode(part)) > 255:
            raise refused(p, flag, OSError(errno.ENAMETOOLONG, "File name too long"))
    # the nearest part that exists must be a folder, so that the work before the write is not spent in vain
    ancestor = next((a for a in resolved.parents if a.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise refused(p, flag, OSError(errno.ENOTDIR, "Not a directory"))
    return resolved


def make_dir(path: Path, flag: str) -> bool:
    """Create `path` (and its parents); True when launcher created it, so only then may its mode be set."""
    existed = path.is_dir()
    with writing(path, flag):
        path.mkdir(parents=True, exist_ok=True)
    return not existed


def write_text(path: Path, text: str, flag: str) -> None:
    with writing(path, flag):
        path.write_text(text, encoding="utf-8")
