"""`launcher slurm` for full DPO: the reference job (kind ref, `launcher train --ref` on the training job's nodes
and ranks) is queued after the preparation job and before training; LoRA DPO and other tasks queue none."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from test_render_slurm import directives_of
from test_slurm_cmd import fake_bin, jobs_of, slurm  # noqa: F401  (fake_bin is a fixture)


def test_full_dpo_queues_prep_then_ref_then_train(tmp_path, fake_bin):  # noqa: F811
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--task", "dpo", "--method", "full", "--gpus-per-node", "2",
              env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert [(j["kind"], j.get("after")) for j in jobs_of(out)] == [("prep", None), ("ref", "4242"), ("train", "4243")]
    ref, job = (out / "ref.sbatch").read_text(), (out / "job.sbatch").read_text()
    assert '-m launcher train --ref "$SPEC"' in ref and "--ref" not in job
    assert directives_of(ref)["--gpus-per-node"] == directives_of(job)["--gpus-per-node"] == "2"
    assert fake_bin.calls()[1]["argv"][-1] == str(out / "ref.sbatch")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_ref_script_passes_shellcheck(tmp_path, fake_bin):  # noqa: F811
    out = tmp_path / "run"
    assert slurm("--out", str(out), "--task", "dpo", "--method", "full", env=fake_bin.env()).exit_code == 0
    proc = subprocess.run(["shellcheck", "-S", "warning", str(out / "ref.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("args", [("--task", "dpo", "--method", "lora"), ("--task", "orpo"),
                                  ("--task", "dpo", "--set", "pref.reference=in_memory")])
def test_no_ref_job_where_the_reference_is_not_precomputed(tmp_path, fake_bin, args):  # noqa: F811
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", *args, env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert [j["kind"] for j in jobs_of(out)] == ["prep", "train"] and not (out / "ref.sbatch").exists()


def test_no_ref_job_when_an_earlier_job_cached_the_reference(tmp_path, fake_bin, monkeypatch):  # noqa: F811
    """The same run submitted again (--force) after its reference log-probs were computed: prep and train only."""
    import json

    from launcher import assets
    from launcher.data.cache import reference_path
    from launcher.model.load import model_source
    from launcher.plan.plan import make_plan, settled
    from launcher.rundir.layout import RunDir
    from launcher.submit.slurm import cached_reference

    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "cache"))
    env = {**fake_bin.env(), "LAUNCHER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    args = ("--out", str(out), "--task", "dpo", "--method", "full", "--gpus-per-node", "2")
    assert slurm(*args, env=env).exit_code == 0
    base = RunDir(out).base
    base.mkdir()
    shutil.copy(assets.tiny_dir() / "config.json", base / "config.json")  # what the prep job made
    spec = RunDir(out).load_spec()
    spec = settled(spec, make_plan(spec))
    assert cached_reference(spec) is None
    ref = reference_path(spec, model_source(spec), spec.precision.dtype)  # what a ref job wrote
    assert ref.is_relative_to(tmp_path / "cache")
    ref.mkdir(parents=True)
    (ref / "meta.json").write_text(json.dumps({"rows": 1}))
    r = slurm(*args, "--submit", "--force", env=env)
    assert r.exit_code == 0, r.output
    assert [j["kind"] for j in jobs_of(out)] == ["prep", "train"] and "no reference job" in r.output
