"""`launcher sync`: upload a run's offline tracker data (launcher/ops/sync.py)."""

from __future__ import annotations

import click

from launcher.ops.sync import sync as sync_run


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False), metavar="RUN_DIR")
@click.option("--dry-run", is_flag=True, help="Print the wandb sync command, upload nothing.")
def sync(run_dir: str, dry_run: bool) -> None:
    """Upload RUN_DIR's offline wandb runs (output.wandb.mode offline) into their one wandb run.

    Run it where the wandb server is reachable, with WANDB_API_KEY in the environment (or after
    `wandb login`). Every attempt of the run (requeues, retries, resumes) is uploaded in order into the
    run id kept in RUN_DIR/trackers.json. MLflow needs no sync: ranks log to its server directly.
    """
    sync_run(run_dir, dry_run=dry_run, say=click.echo)
