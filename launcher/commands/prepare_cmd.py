"""`launcher prepare`: tokenize and pack the data into the cache the ranks read, on CPU, before any
rank starts (and, for the embedded model, write the run's initialised base). A mixture (data.sources)
becomes memory-mapped token shards, written by --procs processes here or as one task of a Slurm array."""

from __future__ import annotations

from pathlib import Path

import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.data.cache import cache_dir, read_meta
from launcher.data.check import check_data
from launcher.data.shardprep import prepare as prepare_data
from launcher.data.shardprep import prepare_sources
from launcher.data.shards import read_manifest
from launcher.errors import UserError
from launcher.model.load import TINY, ensure_tiny_base
from launcher.rundir.layout import RunDir


@click.command()
@spec_options()
@click.option("--procs", type=click.IntRange(1, 512), default=None,
              help="Mixture sources: processes that write shards here (default data.num_proc, else 1).")
@click.option("--tasks", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Mixture sources: the number of tasks sharing the work (a Slurm array's size).")
@click.option("--task-index", type=click.IntRange(0), default=None,
              help="Mixture sources: this task's number, 0..tasks-1; it writes the shards k with k % tasks == it.")
def prepare(spec: RunSpec, procs: int | None, tasks: int, task_index: int | None) -> None:
    """Check, tokenize and pack the data of SPEC into the fingerprinted cache that training reads.

    Runs on CPU. `launcher run` does this itself before spawning ranks; `launcher slurm --submit`
    queues it as a CPU job that training waits for. Bad data exits 2 with the file, line and fix.
    A rerun writes only missing or invalid shards; each source's manifest.json is written once all
    its shards are complete.
    """
    if spec.data.sources:
        if task_index is not None and task_index >= tasks:
            raise UserError(f"--task-index {task_index} is not below --tasks {tasks}; tasks count from 0")
        rep = prepare_sources(spec, procs=procs or spec.data.num_proc or 1,
                              task=task_index, tasks=tasks)
        rate = rep.tokens_written / rep.seconds if rep.seconds > 0 else 0.0
        click.echo(f"prepared {rep.written} shard(s), {rep.tokens_written:,} tokens in {rep.seconds:.1f} s "
                   f"({rate:,.0f} tokens/s)")
        for src, d in zip(spec.data.sources, rep.dirs):
            man = read_manifest(d)
            state = (f"{len(man['shards'])} shards, {man['docs']:,} docs, {man['tokens']:,} tokens" if man
                     else "incomplete (other tasks still writing)")
            click.echo(f"  {src.name}: {d}: {state}")
        if task_index is None and not rep.complete:  # pragma: no cover - every shard was written above
            raise UserError("the shard set is incomplete after preparing every shard")
    else:
        check_data(spec)
        path = prepare_data(spec)
        meta = read_meta(path)
        click.echo(f"prepared {path}")
        click.echo("  " + ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    if spec.model.name == TINY and RunDir(Path(spec.output.dir)).spec_path.is_file():
        click.echo(f"base model {ensure_tiny_base(Path(spec.output.dir), spec.optim.seed, cache=cache_dir(spec))}")
