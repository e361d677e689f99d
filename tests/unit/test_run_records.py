"""Run records: the manifest says what produced a run, `--from` reproduces it, `runs` lists runs."""

from __future__ import annotations

import json

import yaml


def _without_paths(spec_text: str) -> dict:
    tree = yaml.safe_load(spec_text)
    tree["output"].pop("dir")
    return tree


def test_manifest_records_what_produced_the_run(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n' * 20)
    run = tmp_path / "a"
    cli("slurm", "--data", str(data), "--seq-len", "64", "--set", "optim.seed=7", "--out", str(run), check=True)
    m = json.loads((run / "manifest.json").read_text())
    assert m["packages"]["transformers"] and m["packages"]["deepspeed"] and m["launcher_version"]
    assert m["seed"] == 7 and m["plan"]["world_size"] == 1
    [fp] = m["data"]
    assert fp["path"] == str(data) and fp["bytes"] == data.stat().st_size and len(fp["sha256"]) == 64


def test_from_reproduces_spec_and_deepspeed_config(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("slurm", "--zero", "3", "--nproc", "2", "--global-batch", "8", "--set", "optim.lr=3e-4",
        "--set", "cluster.time=2:00:00", "--out", str(a), check=True)
    cli("slurm", "--from", str(a), "--out", str(b), check=True)
    assert _without_paths((a / "spec.yaml").read_text()) == _without_paths((b / "spec.yaml").read_text())
    assert (a / "ds_config.json").read_text() == (b / "ds_config.json").read_text()
    assert yaml.safe_load((b / "spec.yaml").read_text())["output"]["dir"] == str(b)
    assert (b / "job.sbatch").read_text().replace(str(b), "RUN") == (a / "job.sbatch").read_text().replace(str(a), "RUN")


def test_from_with_a_flag_changes_only_that(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("slurm", "--out", str(a), check=True)
    cli("slurm", "--from", str(a), "--max-steps", "7", "--out", str(b), check=True)
    ta, tb = _without_paths((a / "spec.yaml").read_text()), _without_paths((b / "spec.yaml").read_text())
    assert tb["optim"].pop("max_steps") == 7 and ta["optim"].pop("max_steps") == 100
    assert ta == tb


def test_from_refuses_a_non_run_dir_and_spec_together(cli, tmp_path):
    proc = cli("slurm", "--from", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not a run dir" in proc.stderr
    spec = tmp_path / "s.yaml"
    spec.write_text("{}\n")
    cli("slurm", "--out", str(tmp_path / "a"), check=True)
    proc = cli("slurm", str(spec), "--from", str(tmp_path / "a"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_runs_lists_run_dirs_with_key_numbers(cli, tmp_path):
    root = tmp_path / "runs"
    cli("slurm", "--name", "alpha", "--out", str(root / "a"), check=True)
    cli("slurm", "--name", "beta", "--method", "lora", "--out", str(root / "nested" / "b"), check=True)
    (root / "a" / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 2.5}) + "\n")
    rows = [json.loads(x) for x in cli("runs", str(root), "--json", check=True).stdout.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"alpha", "beta"}
    assert (by_name["alpha"]["step"], by_name["alpha"]["loss"]) == (5, 2.5)
    assert by_name["beta"]["method"] == "lora"
    table = cli("runs", str(root), check=True).stdout
    assert "alpha" in table and "2.5000" in table
