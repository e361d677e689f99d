"""Generated batch scripts on the real lab Slurm cluster: sbatch accepts them, the tiny model trains
over two ranks of one node (srun per rank), a sweep runs as a job array, and hostile values travel
verbatim without running anything. Two nodes with one torchrun each: test_chains.py (after its
preparation job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Small enough for the lab's 2-CPU nodes; fp32 because CPU ranks have no fp16 kernels.
# cluster.prep.cpus=1: the preparation job fits the lab's 2-CPU nodes beside a training rank.
TINY = {"data": {"seq_len": 64}, "optim": {"max_steps": 3, "micro_batch": 2}, "precision": "fp32",
        "zero": {"stage": 2}, "cluster": {"gpus_per_node": 0, "time": "10", "partition": "debug",
                                          "prep": {"cpus": 1}}}
STEP = re.compile(r"^(?:\[rank0\]:|\s*0: )?step (\d+)/(\d+) loss ([0-9.]+) ", re.M)  # rank 0's step lines


def launcher_slurm(lab, *args: str, cwd: Path = ROOT, cache: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher slurm ARGS` against the lab (its SLURM_CONF); the jobs it submits run in cwd
    (and inherit LAUNCHER_CACHE=cache when given)."""
    env = lab.subprocess_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                              **({"LAUNCHER_CACHE": str(cache)} if cache else {})})
    return subprocess.run([sys.executable, "-m", "launcher", "slurm", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def tiny_spec(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def write_prepare_submit(lab, run_dir: Path, *args: str) -> str:
    """`launcher slurm --out RUN_DIR --submit`; returns the training job's id. Nothing is prepared by
    hand: the run's preparation job tokenizes the data and makes the tiny base before training starts
    (the cache is this test's own, so it is never prepared already)."""
    cp = launcher_slurm(lab, *args, "--out", str(run_dir), "--submit", cache=run_dir.parent / "cache")
    assert cp.returncode == 0, cp.stderr
    prep_id, job_id = cp.stdout.split()
    recorded = [(j["job_id"], j["kind"]) for j in map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines())]
    assert recorded == [(prep_id, "prep"), (job_id, "train")]
    return job_id


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def assert_trained(run_dir: Path, log: str, steps: int = 3) -> None:
    # Only rank 0 prints step lines: ranks that fell into separate process groups would each be a
    # rank 0 and print every step twice (and ZeRO-2's partitioned optimizer needs the whole group).
    found = [(int(s), int(n), float(loss)) for s, n, loss in STEP.findall(log)]
    assert [s for s, _, _ in found] == list(range(1, steps + 1)), log[-3000:]
    assert all(n == steps and loss > 0 for _, n, loss in found)
    assert (run_dir / "final" / "config.json").is_file(), log[-3000:]


# --------------------------------------------------------------------------- the directives

@pytest.mark.parametrize("args", [
    ["--nodes", "2", "--gpus-per-node", "2", "--set", "cluster.mem=1000M", "--set", "cluster.cpus_per_task=1",
     "--set", "cluster.exclusive=true", "--set", "cluster.dependency=singleton", "--precision", "bf16"],
    ["--nodes", "1", "--nproc", "2", "--launcher", "srun", "--set", "cluster.requeue=false"],
    ["--nodes", "1", "--sweep", "optim.lr=1e-3,2e-3", "--set", 'cluster.array="%1"', "--name", "sweep"],
])
def test_sbatch_test_only_accepts_the_directives(slurm_lab, tmp_path, args):
    cp = launcher_slurm(slurm_lab, str(tiny_spec(tmp_path)), "--out", str(tmp_path / "run"), "--dry-run", *args)
    assert cp.returncode == 0, cp.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(cp.stdout)
    test = slurm_lab.cmd("sbatch", "--test-only", str(script), check=False, cwd=tmp_path)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr


# --------------------------------------------------------------------------- real training

def test_one_node_two_ranks_train_zero2_to_completion(slurm_lab, tmp_path):
    run_dir = tmp_path / "run"
    # one srun task per rank (RANK/WORLD_SIZE/LOCAL_RANK from Slurm); torchrun is the 2x1 test's launcher
    job = write_prepare_submit(slurm_lab, run_dir, str(tiny_spec(tmp_path)), "--nodes", "1", "--nproc", "2", "--launcher", "srun",
                 "--net-ifname", "eth0", "--name", "tiny-1x2")
    state = slurm_lab.wait_job(job, timeout=600)
    log = logs(run_dir)
    assert state == "COMPLETED", log[-3000:]
    assert_trained(run_dir, log)
    [step] = [r for r in slurm_lab.sacct(job, ["JobID", "NTasks"], steps=True) if r["JobID"] == f"{job}.0"]
    assert step["NTasks"] == "2", step


def test_array_sweep_of_two_values_completes_both_tasks(slurm_lab, tmp_path):
    run_dir = tmp_path / "run"
    job = write_prepare_submit(slurm_lab, run_dir, str(tiny_spec(tmp_path)), "--nodes", "1", "--nproc", "1", "--max-steps", "2",
                 "--sweep", "optim.lr=1e-3,5e-3", "--name", "sweep")
    for task, lr in ((0, 1e-3), (1, 5e-3)):
        state = slurm_lab.wait_job(f"{job}_{task}", timeout=600)
        task_dir = run_dir / "tasks" / str(task)
        log = (run_dir / "logs" / f"sweep-{job}_{task}.out").read_text(errors="replace")
        assert state == "COMPLETED", log[-3000:]
        assert_trained(task_dir, log, steps=2)  # each task writes to its own output dir
        assert f"spec {task_dir}/spec.yaml" in log
        lrs = [json.loads(x).get("lr") for x in (task_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert max(x for x in lrs if x is not None) == pytest.approx(lr)


# --------------------------------------------------------------------------- hostile values

MARK = "pwned"
HOSTILE_NAME = f"x'; touch {MARK} #$(touch {MARK})`touch {MARK}`;"
HOSTILE_ENV = {"H_QUOTE": f"x'; touch {MARK} #", "H_SUBST": f"$(touch {MARK})", "H_TICKS": f"`touch {MARK}`",
               "H_NEWLINE": f"a\ntouch {MARK}\n", "H_SEMI": f"a; touch {MARK}; \"b\" \\"}


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_hostile_values_are_submitted_verbatim_and_run_nothing(slurm_lab, tmp_path, launch):
    from launcher.config.spec import validate
    from launcher.ops.logs import strip_labels
    from launcher.plan.plan import make_plan
    from launcher.render.slurm import render_sbatch

    # The job's interpreter is a stand-in that prints what reached it (argv and environment), in a
    # folder whose name is hostile too; everything between (sbatch, the batch shell, srun, bash -c,
    # two nodes) is the real thing.
    stub = tmp_path / f"py {HOSTILE_ENV['H_TICKS']}" / "python"
    stub.parent.mkdir()
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        print("STUB " + json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                     if k.startswith("H_") or k == "NCCL_IB_HCA"}}}}), flush=True)
        """))
    stub.chmod(0o755)
    run_dir = tmp_path / f"run {HOSTILE_ENV['H_QUOTE']}{HOSTILE_ENV['H_SUBST']}"
    (run_dir / "logs").mkdir(parents=True)
    spec = validate({"name": HOSTILE_NAME, "cluster": {
        "nodes": 2, "gpus_per_node": 1, "launcher": launch, "partition": "debug", "time": "5", "net_ifname": "eth0",
        "env": HOSTILE_ENV, "nccl": {"ib_hca": HOSTILE_ENV["H_SEMI"]}}})
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec, make_plan(spec), run_dir, python=str(stub)))

    job = slurm_lab.sbatch(script, "--hold", cwd=tmp_path)  # held: read its name before it runs
    try:
        shown = slurm_lab.cmd("squeue", "-h", "-j", str(job), "-o", "%j").stdout.rstrip("\n")
        assert shown == HOSTILE_NAME
    finally:
        slurm_lab.cmd("scontrol", "release", str(job))
    state = slurm_lab.wait_job(job, timeout=300)
    [log_file] = (run_dir / "logs").glob("*.out")
    log = log_file.read_text(errors="replace")
    assert state == "COMPLETED", log
    assert log_file.name == f"{HOSTILE_NAME}-{job}.out"
    lines = [strip_labels(line) for line in log.splitlines()]  # srun --label: "0: STUB ..." (launcher: srun)
    reports = [json.loads(line[5:]) for line in lines if line.startswith("STUB ")]
    prep = [r for r in reports if r["argv"][:3] == ["-m", "launcher", "prepare"]]
    assert len(prep) == 1 and len(reports) == 3, log  # the preparation step, then one per node
    for r in reports:
        assert r["env"] == {**HOSTILE_ENV, "NCCL_IB_HCA": HOSTILE_ENV["H_SEMI"]}
        assert r["argv"][-1] == str(run_dir / "spec.yaml")
    assert not list(tmp_path.rglob(MARK)) and not (ROOT / MARK).exists(), "a hostile value ran as code"
