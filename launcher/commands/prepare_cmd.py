"""`launcher prepare`: tokenize and pack the data into the cache the ranks read, on CPU, before any
rank starts (and, for the embedded model, write the run's initialised base)."""

from __future__ import annotations

from pathlib import Path

import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.data.build import prepare as prepare_data
from launcher.data.cache import read_meta
from launcher.data.check import check_data
from launcher.model.load import TINY, ensure_tiny_base
from launcher.rundir.layout import RunDir


@click.command()
@spec_options()
def prepare(spec: RunSpec) -> None:
    """Check, tokenize and pack the data of SPEC into the fingerprinted cache that training reads.

    Runs on CPU. `launcher run` does this itself before spawning ranks; `launcher slurm --submit`
    queues it as a CPU job that training waits for. Bad data exits 2 with the file, line and fix.
    """
    check_data(spec)
    path = prepare_data(spec)
    meta = read_meta(path)
    click.echo(f"prepared {path}")
    click.echo("  " + ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    if spec.model.name == TINY and RunDir(Path(spec.output.dir)).spec_path.is_file():
        click.echo(f"base model {ensure_tiny_base(Path(spec.output.dir), spec.optim.seed)}")
