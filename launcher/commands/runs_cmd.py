"""`launcher runs`: the run dirs under a folder, with their key numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from launcher.errors import UserError
from launcher.rundir.summary import find_run_dirs, summary


@click.command()
@click.argument("root", required=False, default="runs", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def runs(root: str, as_json: bool) -> None:
    """List the run dirs under ROOT (default ./runs): name, task/method, model, ranks, step, loss, tokens
    trained, jobs. A completed run's step, loss and tokens come from its manifest.json."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{base} is not a folder; give the folder that holds your run dirs")
    rows = [summary(p) for p in find_run_dirs(base)]
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"no run dirs under {base}")
        return
    head = ("run dir", "name", "task/method", "model", "ranks", "step", "loss", "tokens", "jobs", "created")
    table = [head] + [(
        r["run_dir"], str(r["name"]), f"{r['task']}/{r['method']}", str(r["model"]), str(r["world_size"] or "-"),
        f"{r['step'] or 0}/{r['max_steps'] or '?'}", "-" if r["loss"] is None else f"{r['loss']:.4f}",
        "-" if r["tokens"] is None else f"{r['tokens']:,}", str(r["jobs"]),
        _when(r["created"]),
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _when(created: float | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "-"
    except (OverflowError, OSError, ValueError):  # a hand-edited manifest's time out of range
        return "-"
