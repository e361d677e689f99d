"""Fixtures for tests/cluster: one real Slurm cluster per test session (see slurmlab.py).

Every test in this folder is marked ``cluster``. When the machine cannot run the cluster (not root,
packages not installable, no network namespaces) the tests are skipped with the reason, except when
the environment variable CI is set (non-empty): then they fail, because CI must run them.
At the end of the session the cluster is stopped, unless LAUNCHER_KEEP_SLURMLAB=1 (the next session
then reuses it in well under a second) or another live process (a concurrent test session on this
machine) still holds a lease on it, or it was started by hand (``python3 tests/cluster/slurmlab.py
start``; ``... stop`` stops it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from slurmlab import SlurmLab  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            item.path.resolve().relative_to(_HERE)
        except ValueError:
            continue
        item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def slurm_lab():
    """A healthy SlurmLab (started or reused), left (stopped if last user) at the end of the session."""
    ok, reason = SlurmLab.available()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Slurm cluster tests must run, but: {reason}", pytrace=False)
        pytest.skip(f"Slurm lab cluster unavailable: {reason}")
    lab = SlurmLab.ensure()
    try:
        yield lab
    finally:
        if os.environ.get("LAUNCHER_KEEP_SLURMLAB") != "1":
            lab.leave()
