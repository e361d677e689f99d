"""Hugging Face hub names and huggingface_hub's cache layout: which names are hub repositories, which cache
a spec's jobs read, and the snapshot folder an offline load of a repository uses. Stdlib only."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'name' or 'org/name'
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubItem:
    """One hub repository a spec names: kind 'model' (weights and tokenizer) or 'dataset'."""

    kind: str
    repo_id: str
    revision: str | None
    field: str  # the spec field that names it

    @property
    def repo_type(self) -> str:
        return "model" if self.kind == "model" else "dataset"


def hf_home(spec: RunSpec, flag: str | None = None) -> tuple[Path, str]:
    """(the cache folder, where it came from): --hf-home, else cluster.hf_home, else $HF_HOME, else
    huggingface_hub's default ~/.cache/huggingface."""
    for value, source in ((flag, "--hf-home"), (spec.cluster.hf_home, "cluster.hf_home"),
                          (os.environ.get("HF_HOME"), "HF_HOME")):
        if value:
            return Path(value).expanduser().resolve(), source
    return Path("~/.cache/huggingface").expanduser().resolve(), "the default (no --hf-home, cluster.hf_home or HF_HOME)"


def repo_folder(home: Path, item: HubItem) -> Path:
    """HF_HOME/hub/models--ORG--NAME (or datasets--...), huggingface_hub's cache layout."""
    return home / "hub" / f"{item.repo_type}s--{item.repo_id.replace('/', '--')}"


def cached_snapshot(home: Path, item: HubItem) -> Path | None:
    """The snapshot folder an offline load would use: snapshots/REVISION for a commit, else the commit that
    refs/REVISION (default main) names. None when the cache does not have it."""
    repo = repo_folder(home, item)
    rev = item.revision or "main"
    if COMMIT.fullmatch(rev):
        snap = repo / "snapshots" / rev
        return snap if snap.is_dir() else None
    try:
        commit = (repo / "refs" / rev).read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    return snap if commit and snap.is_dir() else None
