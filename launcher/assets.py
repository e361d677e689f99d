"""Where the shipped data lives: ds_configs/, slurm/ and the embedded tiny model, in a wheel or a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
# The folder that holds the launcher package: a checkout's root in an editable install, where ranks
# started with PYTHONPATH set to it import this same source.
PACKAGE_PARENT = _PKG.parent


def _data_dir(name: str) -> Path:
    # In a wheel the top-level folders are copied to launcher/_data/<name>; in a source checkout
    # (editable install, tests) they sit beside the package.
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"launcher's data folder {name!r} is missing from this installation")


def ds_configs_dir() -> Path:
    return _data_dir("ds_configs")


def slurm_templates_dir() -> Path:
    return _data_dir("slurm")


def tiny_dir() -> Path:
    """The embedded tiny model: config.json, tokenizer files, corpus."""
    return _PKG / "tiny"
