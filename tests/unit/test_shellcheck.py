"""Every golden batch script passes `shellcheck -S warning`: no finding at warning level or above.

shellcheck comes from Debian's packages (tests/run.sh installs it as root). Where it is missing the test
skips with the reason, except under CI (the CI variable set), where a missing shellcheck fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "slurm"
SCRIPTS = sorted(GOLDEN.glob("*.sbatch"))


@pytest.fixture(scope="module")
def shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    reason = "shellcheck is not installed (apt-get install shellcheck; tests/run.sh does it as root)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the shellcheck test must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


def test_there_are_golden_scripts_to_check():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_golden_script_passes_shellcheck_at_warning_level(shellcheck, path):
    proc = subprocess.run([shellcheck, "--severity=warning", "--shell=bash", "--format=gcc", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
