"""The wheel carries ds_configs/, slurm/ and the embedded tiny model, and works from a fresh venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_wheel_installs_into_a_fresh_venv_and_finds_its_data(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, timeout=600)
    (wheel,) = dist.glob("launcher-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("launcher/_data/ds_configs/zero3_offload_bf16.json", "launcher/tiny/config.json",
                     "launcher/tiny/tokenizer.json", "launcher/tiny/corpus.txt",
                     "launcher/plan/known_models.json"):  # the known models' table (offline estimates)
        assert required in names, required
    assert any(n.startswith("launcher/_data/slurm/") for n in names)

    # The venv must see only the wheel: no PYTHONPATH pointing at a checkout.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # no system site-packages: only the wheel's files
    py = env_dir / "bin" / "python"
    # The light dependencies only: enough for config/spec, which must not need torch anyway.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600, env=clean)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "click", "pydantic", "pyyaml", "jinja2"],
                   check=True, timeout=600, env=clean)
    probe = (
        "import json, launcher.assets as a\n"
        "print(json.dumps({'ds': str(a.ds_configs_dir()), 'slurm': str(a.slurm_templates_dir()),"
        " 'tiny': sorted(p.name for p in a.tiny_dir().iterdir()),"
        " 'presets': len(list(a.ds_configs_dir().glob('*.json')))}))\n"
    )
    out = json.loads(subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                                    check=True, env=clean).stdout)
    assert str(env_dir) in out["ds"] and str(env_dir) in out["slurm"]  # from the install, not this checkout
    assert out["presets"] >= 13
    assert {"config.json", "tokenizer.json", "corpus.txt"} <= set(out["tiny"])
    cfg = subprocess.run([str(env_dir / "bin" / "launcher"), "config", "--zero", "3"], cwd=tmp_path,
                         capture_output=True, text=True, check=True, env=clean).stdout
    assert json.loads(cfg)["zero_optimization"]["stage"] == 3
