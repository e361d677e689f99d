"""`launcher slurm`: a run dir with its Slurm batch scripts, optionally submitted with sbatch
(launcher/submit/slurm.py)."""

from __future__ import annotations

import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.submit.slurm import THEN_KINDS, write_run


@click.command()
@spec_options(cluster_flags=True, allow_from=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Run dir to create: spec.yaml, ds_config.json, plan.txt, job.sbatch, logs/.")
@click.option("--force", is_flag=True, help="Write into a non-empty RUN_DIR (generated files are replaced).")
@click.option("--submit", is_flag=True, help="Submit with sbatch, print the job ids and record them in RUN_DIR.")
@click.option("--dry-run", is_flag=True, help="Print the batch scripts; write and submit nothing.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="One job array over the product of values, e.g. --sweep optim.lr=1e-4,3e-4 (repeatable); "
                   "task i trains RUN_DIR/tasks/i/spec.yaml.")
@click.option("--prep/--no-prep", "prep", default=True, show_default=True,
              help="Queue a CPU job that tokenizes the data (prepare.sbatch, cluster.prep) before training when "
                   "the cache lacks it. --no-prep: the data was prepared by hand (`launcher prepare SPEC`).")
@click.option("--then", "then", multiple=True, type=click.Choice(THEN_KINDS),
              help="After training, queue this job too (repeatable, in order; each waits for the one before to "
                   "succeed): merge (the adapter into RUN_DIR/merged) or eval (RUN_DIR/eval.json).")
@click.option("--ignore-fit", is_flag=True, help="Submit even when the memory estimate exceeds the GPU's memory.")
def slurm(spec: RunSpec, out: str, force: bool, submit: bool, dry_run: bool, sweeps: tuple[str, ...],
          prep: bool, then: tuple[str, ...], ignore_fit: bool) -> None:
    """Write RUN_DIR with the Slurm batch scripts for SPEC and flags; --submit queues them.

    The job runs `launcher train RUN_DIR/spec.yaml` on every rank: torchrun on each node
    (or one srun task per rank with --launcher srun), in this Python environment unless the spec
    gives set-up lines or a container. The ranks only read the tokenized data: when it is not in the
    cache yet, a CPU job prepares it first (RUN_DIR/prepare.sbatch) and training waits for it.
    Secrets (HF_TOKEN, WANDB_API_KEY, ...) are never written: export them in the shell that submits
    and the jobs inherit them.
    """
    write_run(spec, out, force=force, submit=submit, dry_run=dry_run, sweeps=sweeps, prep=prep, then=then,
              ignore_fit=ignore_fit, say=lambda line: click.echo(line, err=True),
              emit=lambda text: click.echo(text, nl=False))
