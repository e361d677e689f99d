"""`launcher slurm`: run dir creation, refusals before anything is written or queued, sweeps, secrets,
and the chain of jobs it queues (prep before training when the data is not prepared, --then after)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from test_render_slurm import directives_of


class _Main:
    """launcher.cli.main (real exit codes: 2 for bad input) behind CliRunner's interface."""

    name = "launcher"

    def main(self, args, prog_name=None, **_):
        from launcher.cli import main

        main(["slurm", *args])


def slurm(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(_Main(), list(args), env=env)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture
def fake_bin(tmp_path: Path):
    """A PATH folder with recording stand-ins for sbatch/srun/scontrol/scancel (tests of our own)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch-calls.jsonl"

    def add(name: str, body: str) -> None:
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)

    recorder = tmp_path / "record.py"
    recorder.write_text("import json, os, sys\n"
                        f"with open({str(log)!r}, 'a') as f:\n"
                        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}) + '\\n')\n")
    # job ids 4242, 4243, ... in submission order
    add("sbatch", f"""{sys.executable} {recorder} "$@"
n=0; while IFS= read -r _; do n=$((n + 1)); done < {log}  # bash only: PATH holds just the stand-ins
echo "${{FAKE_SBATCH_OUT:-$((4241 + n));lab}}"
exit "${{FAKE_SBATCH_RC:-0}}"
""")
    add("srun", 'echo "usage: srun [--container-image=IMAGE] ..."\n')
    add("scontrol", "exit 0\n")
    add("scancel", "exit 0\n")

    class Bin:
        path = bin_dir
        calls_file = log

        cache = tmp_path / "cache"

        @staticmethod
        def env(**extra: str) -> dict[str, str]:
            # only the stand-ins: the real Slurm tools stay out of reach; an empty data cache of its own
            return {"PATH": str(bin_dir), "LAUNCHER_CACHE": str(tmp_path / "cache"), **extra}

        @staticmethod
        def calls() -> list[dict]:
            return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

        @staticmethod
        def remove(name: str) -> None:
            (bin_dir / name).unlink()

        add_tool = staticmethod(add)

    return Bin


# --------------------------------------------------------------------------- writing

def test_writes_the_run_dir_and_a_valid_script(tmp_path):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--nodes", "2", "--nproc", "1", "--net-ifname", "eth0", "--max-steps", "3")
    assert r.exit_code == 0, r.output
    for name in ("job.sbatch", "spec.yaml", "ds_config.json", "plan.txt", "manifest.json", "logs", "checkpoints"):
        assert (out / name).exists(), name
    assert r.stdout.strip() == str(out / "job.sbatch")
    script = (out / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(out / "job.sbatch")]).returncode == 0
    assert f"RUN_DIR={out}" in script and f"PYTHON={sys.executable}" in script
    d = directives_of(script)
    assert d["--nodes"] == "2" and d["--output"] == f"{out}/logs/%x-%j.out"
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["output"]["dir"] == str(out) and spec["cluster"]["net_ifname"] == "eth0"


def test_refuses_a_non_empty_run_dir_unless_forced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = slurm("--out", str(out))
    assert r.exit_code == 2 and "--force" in r.stderr
    assert tree(out) == ["notes.txt"]
    r = slurm("--out", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert (out / "job.sbatch").exists() and (out / "notes.txt").read_text() == "mine"


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--dry-run", "--name", "probe")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("#!/bin/bash\n") and "#SBATCH --job-name=probe" in r.stdout
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--zero", "0", "--offload-optimizer", "cpu"], "ZeRO stage"),
    (["--name", "a\nb"], "control character"),
    (["--nodes", "2", "--global-batch", "3"], "not divisible"),
    (["--data", "./missing.jsonl"], "does not exist"),
    (["--sweep", "optim.lr=1e-4,-5"], "sweep task 1"),
    (["--sweep", "cluster.nodes=1,2"], "separate `launcher slurm` runs"),
    (["--sweep", "optim.lr"], "dotted.key=v1,v2"),
    (["--set", "cluster.array=0-3"], "--sweep"),
    (["--set", "cluster.env.HF_TOKEN=hf_x"], "secrets are not written"),
    (["--dry-run"], "drop one of --dry-run and --submit"),
    # chains: merge needs an adapter that folds into the weights
    (["--method", "full", "--then", "merge"], "method 'full' trains every weight, so there is no adapter to merge"),
    (["--method", "prefix", "--then", "merge"], "drop --then merge"),
    (["--method", "lora", "--then", "eval", "--then", "eval"], "--then eval is given 2 times"),
    (["--method", "lora", "--then", "eval", "--sweep", "optim.lr=1e-4,2e-4"], "--then with --sweep"),
    (["--then", "deploy"], "Invalid value for '--then'"),
])
def test_bad_input_exits_2_and_writes_or_queues_nothing(tmp_path, fake_bin, args, words):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", *args, env=fake_bin.env())
    assert r.exit_code == 2, r.output
    assert words in r.stderr and "Traceback" not in r.output
    assert not out.exists() and fake_bin.calls() == []


# --------------------------------------------------------------------------- submitting

def jobs_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "jobs.jsonl").read_text().splitlines()]


def test_submit_prints_and_records_the_job_id(tmp_path, fake_bin):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--no-prep", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines() == ["4242"]
    assert [(j["job_id"], j["kind"]) for j in jobs_of(out)] == [("4242", "train")]
    [call] = fake_bin.calls()
    assert call["argv"] == ["--parsable", "--export=ALL", str(out / "job.sbatch")]
    assert "the ranks exit 2 unless it is prepared" in r.stderr  # --no-prep, and nothing in the cache here
    assert not (out / "prepare.sbatch").exists()


def test_unprepared_data_queues_a_prep_job_that_training_waits_for(tmp_path, fake_bin):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--name", "demo", "--set", "cluster.prep.cpus=2", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines() == ["4242", "4243"]  # every job id, in the order queued
    assert [(j["job_id"], j["kind"], j.get("after")) for j in jobs_of(out)] == [
        ("4242", "prep", None), ("4243", "train", "4242")]
    prep_call, train_call = fake_bin.calls()
    assert prep_call["argv"] == ["--parsable", "--export=ALL", str(out / "prepare.sbatch")]
    assert train_call["argv"] == ["--parsable", "--export=ALL", "--dependency=afterok:4242",
                                  "--kill-on-invalid-dep=yes", str(out / "job.sbatch")]
    d = directives_of((out / "prepare.sbatch").read_text())
    assert d["--job-name"] == "demo-prep" and d["--cpus-per-task"] == "2" and "--gpus-per-node" not in d
    assert f'RUN_DIR={out}' in (out / "prepare.sbatch").read_text()
    assert "-m launcher prepare" not in (out / "job.sbatch").read_text()  # the ranks only read the cache


def test_prepared_data_queues_no_prep_job(tmp_path, fake_bin, monkeypatch):
    from launcher.commands.common import resolve_from_cli
    from launcher.data.cache import prepared_path

    monkeypatch.setenv("LAUNCHER_CACHE", str(fake_bin.cache))
    entry = prepared_path(resolve_from_cli({"seq_len": 64}))  # what `launcher prepare --seq-len 64` fills
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text("{}")
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--seq-len", "64", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert [j["kind"] for j in jobs_of(out)] == ["train"] and "already prepared" in r.stderr
    assert len(fake_bin.calls()) == 1 and not (out / "prepare.sbatch").exists()


def test_then_merge_and_eval_follow_training_in_order(tmp_path, fake_bin):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--method", "lora", "--then", "merge", "--then", "eval",
              env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines() == ["4242", "4243", "4244", "4245"]
    assert [(j["job_id"], j["kind"], j.get("after")) for j in jobs_of(out)] == [
        ("4242", "prep", None), ("4243", "train", "4242"), ("4244", "merge", "4243"), ("4245", "eval", "4244")]
    files = [c["argv"][-1] for c in fake_bin.calls()]
    assert files == [str(out / f) for f in ("prepare.sbatch", "job.sbatch", "merge.sbatch", "eval.sbatch")]
    assert [c["argv"][2:-1] for c in fake_bin.calls()][1:] == [
        [f"--dependency=afterok:{j}", "--kill-on-invalid-dep=yes"] for j in ("4242", "4243", "4244")]
    assert '-m launcher merge "$RUN_DIR" --out "$RUN_DIR/merged"' in (out / "merge.sbatch").read_text()
    assert '-m launcher eval "$RUN_DIR"' in (out / "eval.sbatch").read_text()


def test_a_refused_submission_mid_chain_names_the_jobs_already_queued(tmp_path, fake_bin):
    # sbatch accepts the prep job, then refuses the training job
    fake_bin.add_tool("sbatch", """case "$*" in *job.sbatch) echo "sbatch: error: invalid partition" >&2; exit 1;; esac
echo 777
""")
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", env=fake_bin.env())
    assert r.exit_code == 1 and "invalid partition" in r.stderr
    assert "prep job 777" in r.stderr and "launcher cancel" in r.stderr
    assert [(j["job_id"], j["kind"]) for j in jobs_of(out)] == [("777", "prep")]


def test_without_submit_the_chain_is_written_with_how_to_queue_it_by_hand(tmp_path, fake_bin):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--method", "lora", "--then", "eval", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "job.sbatch")
    assert f"prep=$(sbatch --parsable {out}/prepare.sbatch)" in r.stderr
    assert f"train=$(sbatch --parsable --dependency=afterok:$prep --kill-on-invalid-dep=yes {out}/job.sbatch)" in r.stderr
    assert f"eval=$(sbatch --parsable --dependency=afterok:$train --kill-on-invalid-dep=yes {out}/eval.sbatch)" in r.stderr
    assert not (out / "merge.sbatch").exists() and fake_bin.calls() == []
    # rendered again without the chain (--force): the stale scripts go
    r = slurm("--out", str(out), "--force", "--no-prep", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert not (out / "prepare.sbatch").exists() and not (out / "eval.sbatch").exists()


def test_dry_run_prints_every_script_training_first(tmp_path, fake_bin):
    r = slurm("--out", str(tmp_path / "run"), "--dry-run", "--method", "lora", "--then", "merge", "--then", "eval",
              "--name", "demo", env=fake_bin.env())
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("#!/bin/bash\n") and directives_of(r.stdout)["--job-name"] == "demo"
    for kind, name in (("prep", "prepare.sbatch"), ("merge", "merge.sbatch"), ("eval", "eval.sbatch")):
        assert f"# ==== {name} ({kind} job) ====\n#!/bin/bash\n" in r.stdout
        assert f"#SBATCH --job-name=demo-{kind}" in r.stdout
    assert "would queue: prepare.sbatch (prep), then job.sbatch (train), then merge.sbatch (merge), " \
           "then eval.sbatch (eval)" in r.stderr
    assert not (tmp_path / "run").exists() and fake_bin.calls() == []



def test_secrets_pass_through_the_environment_and_never_reach_the_run_dir(tmp_path, fake_bin):
    secrets = {"HF_TOKEN": "hf_SECRET_aaaa1111", "WANDB_API_KEY": "wandb_SECRET_bbbb2222",
               "AWS_SECRET_ACCESS_KEY": "aws_SECRET_cccc3333"}
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--sweep", "optim.lr=1e-4,2e-4", env=fake_bin.env(**secrets))
    assert r.exit_code == 0, r.output
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            assert not any(v in text for v in secrets.values()), f
    calls = fake_bin.calls()  # sbatch got them in its environment (prep and train), so the jobs inherit them
    assert len(calls) == 2 and all(c["env"][k] == v for c in calls for k, v in secrets.items())


def test_submit_stops_before_writing_when_the_cluster_lacks_a_tool(tmp_path, fake_bin):
    fake_bin.remove("scontrol")
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", env=fake_bin.env())
    assert r.exit_code == 2 and "`scontrol` is not on the PATH" in r.stderr
    assert not out.exists() and fake_bin.calls() == []


@pytest.mark.parametrize("runtime, words", [("pyxis", "pyxis plugin"), ("apptainer", "`apptainer` is not on the PATH")])
def test_submit_checks_the_container_runtime(tmp_path, fake_bin, runtime, words):
    fake_bin.add_tool("srun", 'echo "usage: srun [--ntasks=N] ..."\n')  # no pyxis
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--submit", "--set", f"cluster.container={{runtime: {runtime}, image: img}}",
              env=fake_bin.env())
    assert r.exit_code == 2 and words in r.stderr
    assert not out.exists()


def test_pyxis_submit_goes_ahead_when_srun_has_container_image(tmp_path, fake_bin):
    r = slurm("--out", str(tmp_path / "run"), "--submit", "--set", "cluster.container={runtime: pyxis, image: img}",
              env=fake_bin.env())
    assert r.exit_code == 0, r.output


def test_sbatch_refusal_is_a_failed_run_with_its_message(tmp_path, fake_bin):
    r = slurm("--out", str(tmp_path / "run"), "--submit",
              env=fake_bin.env(FAKE_SBATCH_RC="1", FAKE_SBATCH_OUT="sbatch: error: invalid partition"))
    assert r.exit_code == 1 and "invalid partition" in r.stderr


# --------------------------------------------------------------------------- sweeps and flags

def test_sweep_writes_one_resolved_spec_and_output_dir_per_task(tmp_path):
    out = tmp_path / "run"
    r = slurm("--out", str(out), "--sweep", "optim.lr=1e-4,3e-4", "--sweep", "optim.seed=1,2")
    assert r.exit_code == 0, r.output
    expected = [(1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)]  # first --sweep varies slowest
    for i, (lr, seed) in enumerate(expected):
        spec = yaml.safe_load((out / "tasks" / str(i) / "spec.yaml").read_text())
        assert (spec["optim"]["lr"], spec["optim"]["seed"]) == (lr, seed)
        assert spec["output"]["dir"] == str(out / "tasks" / str(i))
        assert (out / "tasks" / str(i) / "ds_config.json").exists()
    assert directives_of((out / "job.sbatch").read_text())["--array"] == "0-3"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["tasks"][3] == {"index": 3, "dir": "tasks/3", "set": {"optim.lr": 3e-4, "optim.seed": 2}}


def test_cluster_flags_sit_between_the_spec_file_and_set(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("cluster: {partition: from-file, account: acct, time: '02:00:00'}\n")

    def directives(*args: str) -> dict[str, str]:
        r = slurm(str(spec_file), "--out", str(tmp_path / "run"), "--dry-run", *args)
        assert r.exit_code == 0, r.output
        return directives_of(r.stdout)

    assert directives()["--partition"] == "from-file"
    d = directives("--partition", "from-flag", "--time", "30", "--qos", "q'; x")
    assert (d["--partition"], d["--time"], d["--qos"], d["--account"]) == ("from-flag", "30", "q'; x", "acct")
    assert directives("--partition", "from-flag", "--set", "cluster.partition=from-set")["--partition"] == "from-set"


def test_launcher_flag_switches_to_one_task_per_rank(tmp_path):
    r = slurm("--out", str(tmp_path / "run"), "--dry-run", "--launcher", "srun", "--nproc", "2")
    assert r.exit_code == 0, r.output
    assert directives_of(r.stdout)["--ntasks-per-node"] == "2" and "torch.distributed.run" not in r.stdout


def test_help_lists_the_command_options():
    r = CliRunner().invoke(__import__("launcher.cli", fromlist=["cli"]).cli, ["slurm", "--help"])
    assert r.exit_code == 0
    for opt in ("--out", "--submit", "--dry-run", "--sweep", "--force", "--net-ifname", "--launcher", "--no-prep",
                "--then"):
        assert opt in r.output
