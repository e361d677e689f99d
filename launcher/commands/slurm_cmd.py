"""`launcher slurm`: a run dir with its Slurm batch script, optionally submitted with sbatch.

Everything is validated (spec, plan, every value the script would carry) before anything is
written or queued; a bad input exits 2 and leaves no trace.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from launcher import yamlio
from launcher.commands.common import spec_options
from launcher.errors import RunFailed, SpecError, UserError
from launcher.spec import RunSpec

_SWEEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@click.command()
@spec_options(cluster_flags=True, allow_from=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Run dir to create: spec.yaml, ds_config.json, plan.txt, job.sbatch, logs/.")
@click.option("--force", is_flag=True, help="Write into a non-empty RUN_DIR (generated files are replaced).")
@click.option("--submit", is_flag=True, help="Submit with sbatch, print the job id and record it in RUN_DIR.")
@click.option("--dry-run", is_flag=True, help="Print the batch script; write and submit nothing.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="One job array over the product of values, e.g. --sweep optim.lr=1e-4,3e-4 (repeatable); "
                   "task i trains RUN_DIR/tasks/i/spec.yaml.")
@click.option("--ignore-fit", is_flag=True, help="Submit even when the memory estimate exceeds the GPU's memory.")
def slurm(spec: RunSpec, out: str, force: bool, submit: bool, dry_run: bool, sweeps: tuple[str, ...],
          ignore_fit: bool) -> None:
    """Write RUN_DIR with the Slurm batch script for SPEC and flags; --submit queues it.

    The job runs `launcher train RUN_DIR/spec.yaml` on every rank: torchrun on each node
    (or one srun task per rank with --launcher srun), in this Python environment unless the spec
    gives set-up lines or a container. Secrets (HF_TOKEN, WANDB_API_KEY, ...) are never written:
    export them in the shell that submits and the job inherits them.
    """
    from launcher import preflight, rundir
    from launcher.plan import make_plan
    from launcher.render.slurm import render_sbatch

    if dry_run and submit:
        raise UserError("--dry-run prints the script and submits nothing; drop one of --dry-run and --submit")
    run_dir = Path(out).expanduser().resolve()
    plan = make_plan(spec)
    tasks = sweep_tasks(spec, sweeps)
    for t in tasks:
        make_plan(t.spec)
    python = sys.executable
    script = render_sbatch(spec, plan, run_dir, python=python, array_specs=[t.spec for t in tasks] or None)
    for each in (spec, *(t.spec for t in tasks)):
        # pre-flight, torch-free: model config and weights, LoRA targets, a data sample (missing, empty or
        # malformed file: exit 2 with the line), option clashes, the memory estimate against the GPU
        for note in preflight.check(each, slurm=True, ignore_fit=ignore_fit):
            click.echo(f"note: {note}", err=True)
    if dry_run:
        click.echo(script, nl=False)
        for i, t in enumerate(tasks):
            click.echo(f"task {i}: {t.describe()}", err=True)
        return
    if submit:
        check_cluster_tools(spec)

    rd, spec, plan = rundir.create(run_dir, spec, force=force)
    created = [rundir.create(rd.path / "tasks" / str(i), t.spec, force=force)[1] for i, t in enumerate(tasks)]
    script = render_sbatch(spec, plan, rd.path, python=python, array_specs=created or None)
    job_file = rd.path / "job.sbatch"
    job_file.write_text(script)
    job_file.chmod(0o700)
    if tasks:
        (rd.path / "sweep.json").write_text(json.dumps(
            {"tasks": [{"index": i, "dir": f"tasks/{i}", "set": t.values} for i, t in enumerate(tasks)]},
            indent=2) + "\n")
    click.echo(f"wrote {rd.path} (job.sbatch, spec.yaml, ds_config.json, plan.txt"
               f"{f', {len(tasks)} sweep tasks' if tasks else ''})", err=True)
    if not submit:
        click.echo(f"submit with: sbatch {job_file}  (or add --submit)", err=True)
        click.echo(str(job_file))
        return
    job_id = sbatch(job_file)
    extra = {"array_tasks": len(tasks)} if tasks else {}
    rd.record_job(job_id, "train", **extra)
    click.echo(job_id)


# --------------------------------------------------------------------------- sweeps

@dataclass(frozen=True)
class SweepTask:
    spec: RunSpec
    values: dict[str, Any]  # the swept keys and their values for this task

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.values.items())


def sweep_tasks(spec: RunSpec, sweeps: tuple[str, ...] | list[str]) -> list[SweepTask]:
    """One task per combination of --sweep values (first flag varies slowest), each validated."""
    from launcher.rundir import with_overrides
    from launcher.spec import parse_set

    axes: list[tuple[str, list[str]]] = []
    for item in sweeps:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or not _SWEEP_KEY.fullmatch(key) or not all(values):
            raise UserError(f"--sweep {item!r}: expected dotted.key=v1,v2 (values without empty items), "
                            f"for example --sweep optim.lr=1e-4,3e-4")
        if key.startswith("cluster.") or key in ("output.dir", "output"):
            raise UserError(f"--sweep {key}: a job array shares one set of #SBATCH directives and each task's "
                            f"output dir is RUN_DIR/tasks/<i>; sweep training settings here and cluster "
                            f"settings with separate `launcher slurm` runs")
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k, _ in axes):
            raise UserError(f"--sweep {key}: given twice (or overlapping another --sweep); give each key once")
        axes.append((key, values))
    if not axes:
        return []
    tasks: list[SweepTask] = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        pairs = [f"{k}={v}" for (k, _), v in zip(axes, combo)]
        values = {k: yamlio.loads(v, source=f"--sweep {k}") for (k, _), v in zip(axes, combo)}
        try:
            task_spec = with_overrides(spec, parse_set(pairs))
        except SpecError as exc:
            raise SpecError([f"sweep task {len(tasks)} ({', '.join(pairs)}): {p}" for p in exc.problems]) from None
        tasks.append(SweepTask(task_spec, values))
    return tasks


# --------------------------------------------------------------------------- checks before writing

def check_cluster_tools(spec: RunSpec) -> None:
    """What the script needs from this cluster's tools; exit 2 before submitting when one is missing."""
    missing = [f"`{tool}` is not on the PATH (the job script needs it)"
               for tool in ("sbatch", "srun", "scontrol", "scancel") if shutil.which(tool) is None]
    ct = spec.cluster.container
    if ct is not None and ct.runtime == "apptainer" and shutil.which("apptainer") is None:
        missing.append("cluster.container.runtime is apptainer, but `apptainer` is not on the PATH")
    if ct is not None and ct.runtime == "pyxis" and shutil.which("srun") is not None:
        helptext = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=60)
        if "--container-image" not in helptext.stdout + helptext.stderr:
            missing.append("cluster.container.runtime is pyxis, but `srun --help` has no --container-image "
                           "(the pyxis plugin is not installed here); use runtime apptainer or no container")
    if missing:
        raise UserError("cannot submit: " + "; ".join(missing))


def sbatch(job_file: Path) -> str:
    """Submit; return the job id. The job inherits this environment (--export=ALL)."""
    proc = subprocess.run(["sbatch", "--parsable", "--export=ALL", str(job_file)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RunFailed(f"sbatch refused {job_file}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
    if not job_id.isdigit():
        raise RunFailed(f"sbatch gave no job id for {job_file}: {proc.stdout.strip()!r}")
    return job_id
