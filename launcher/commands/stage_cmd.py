"""`launcher stage`: the hub model, tokenizer and dataset of a spec into a shared Hugging Face cache, where
a hub is reachable, so that jobs run offline (launcher/submit/stage.py)."""

from __future__ import annotations

import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.submit.stage import stage as stage_items


@click.command()
@spec_options()
@click.option("--hf-home", "hf_home", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Cache to fill (default: cluster.hf_home, else $HF_HOME, else ~/.cache/huggingface).")
def stage(spec: RunSpec, hf_home: str | None) -> None:
    """Download the hub model (with its tokenizer) and hub dataset SPEC names into a shared cache.

    Run it where the hub is reachable (a login node). Jobs then read the cache offline: set
    cluster.hf_home to it (in the spec or the cluster profile) and every batch script exports
    HF_HOME=it and HF_HUB_OFFLINE=1; `launcher slurm` refuses a hub model that is not staged.
    Files already in the cache are not fetched again. 'tiny' and local paths: nothing to stage.
    No hub reachable: exit 1 with the cause; a repository or revision that does not exist: exit 2.
    """
    stage_items(spec, hf_home, say=click.echo)
