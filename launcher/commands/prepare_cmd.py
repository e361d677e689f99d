"""`launcher prepare`: tokenize and pack the data into the cache the ranks read, on CPU, before any
rank starts (and, for the embedded model, write the run's initialised base)."""

from __future__ import annotations

import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec


@click.command()
@spec_options()
def prepare(spec: RunSpec) -> None:
    """Check, tokenize and pack the data of SPEC into the fingerprinted cache that training reads.

    Runs on CPU. `launcher run` does this itself before spawning ranks; `launcher slurm --submit`
    queues it as a CPU job that training waits for. Bad data exits 2 with the file, line and fix.
    """
    from pathlib import Path

    from launcher.data import build as data

    data.check_data(spec)
    path = data.prepare(spec)
    meta = data.read_meta(path)
    click.echo(f"prepared {path}")
    click.echo("  " + ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    if spec.model.name == "tiny" and (Path(spec.output.dir) / "spec.yaml").is_file():
        from launcher.model.load import ensure_tiny_base

        click.echo(f"base model {ensure_tiny_base(Path(spec.output.dir), spec.optim.seed)}")
