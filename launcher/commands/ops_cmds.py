"""`launcher status`, `logs`, `cancel`, `cost` and `cluster check`: readers of Slurm's own tools
and of the run dir (launcher/ops, launcher/rundir). No heavy imports."""

from __future__ import annotations

import json
from pathlib import Path

import click

from launcher.config import profiles
from launcher.errors import UserError
from launcher.ops import logs as logs_mod
from launcher.ops import slurmtools as st
from launcher.ops.cluster_check import check as check_profile
from launcher.ops.cost import format_cost, run_cost
from launcher.ops.status import format_run, run_status
from launcher.rundir.layout import RunDir, open_run_dir


def _run_dirs(paths: tuple[str, ...]) -> list[Path]:
    """The run dirs named, or the current directory when it is one, or the run dirs under ./runs."""
    if paths:
        return [open_run_dir(p).path for p in paths]
    here = Path.cwd()
    if RunDir(here).spec_path.is_file():
        return [open_run_dir(here).path]
    runs = here / "runs"
    found = sorted(p.parent for p in runs.glob(f"*/{RunDir(runs).jobs_path.name}")) if runs.is_dir() else []
    if not found:
        raise UserError("give one or more RUN_DIRs (directories made by `launcher slurm --out`); the current "
                        "directory is not one and ./runs holds none with submitted jobs")
    return found


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False), metavar="[RUN_DIR...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list, one object per run dir).")
def status(run_dirs: tuple[str, ...], as_json: bool) -> None:
    """Every job of each RUN_DIR: state, elapsed time, nodes, GPUs, step/max_steps, last loss, GPU-hours
    and $, and for an ended job why it ended (completed, out of memory, collective timeout, hang,
    node failure, time limit, preempted and requeued, cancelled, or failed with its exit code and
    the log line that says why).

    Asks squeue, then scontrol, then sacct (every attempt), then the run dir's markers and logs, so
    it answers after the controller has forgotten a job.
    """
    _echo_results([run_status(d) for d in _run_dirs(run_dirs)], format_run, as_json)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run's jobs end.")
@click.option("--rank", type=int, default=None, help="Only the lines of this rank.")
@click.option("--node", default=None, metavar="NAME", help="Only the lines from this node.")
def logs(run_dir: str, follow: bool, rank: int | None, node: str | None) -> None:
    """Print RUN_DIR's logs (one file per Slurm job), or follow them (-f) until every job of the run
    has ended. The batch script labels every line a rank writes: "[rankN]:" (torchrun) or "N: "
    (`launcher: srun`); --rank and --node select by it. Unlabelled lines (the batch shell's and
    torchrun's own, or any line of a local run's launch.log) count as rank 0 and the first node.
    Each rank's own stdout and stderr are also kept under RUN_DIR/logs/ranks/ (torchrun).
    """
    rd = open_run_dir(run_dir)
    filt = logs_mod.make_filter(rd.path, rank, node)
    if follow:
        logs_mod.follow(rd.path, logs_mod.stdout_write, filt)
    else:
        n = logs_mod.print_logs(rd.path, logs_mod.stdout_write, filt)
        if n == 0:
            click.echo(f"no logs yet in {rd.logs} (a pending job writes its log when it starts)", err=True)
    if filt.active() and filt.matched == 0:
        who = f"rank {rank}" if rank is not None else f"node {node}"
        click.echo(f"note: no line of the logs is attributed to {who} (lines carry no rank label; unlabelled "
                   f"lines count as rank 0 and the first node)", err=True)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def cancel(run_dir: str) -> None:
    """Cancel every pending or running job of RUN_DIR (scancel), requeued and chained ones included."""
    rd = open_run_dir(run_dir)
    live = logs_mod.live_jobs(rd.path)
    if live is None:
        raise st.SlurmToolError("squeue did not answer; nothing was cancelled")
    if not live:
        click.echo(f"no live job in {rd.path}", err=True)
        return
    bases = list(dict.fromkeys(j.split("_")[0] if "[" in j else j for j in live))
    st.scancel(bases)
    click.echo(f"cancelled {' '.join(bases)}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="RUN_DIR...")
@click.option("--clusters", type=click.Path(dir_okay=False), default=None,
              help="Cluster profiles file for the partitions' prices (default $LAUNCHER_CLUSTERS or "
                   "~/.config/launcher/clusters.yaml; else the prices in spec.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list, one object per run dir).")
def cost(run_dirs: tuple[str, ...], clusters: str | None, as_json: bool) -> None:
    """GPU-hours and dollars each RUN_DIR really spent (sacct: elapsed x allocated GPUs of every
    attempt of every job, failed, requeued, preparation and chained ones included; CPU jobs per
    node-hour), tokens trained, and $ per 1M tokens paid beside the estimate for the spec.
    """
    _echo_results([run_cost(open_run_dir(d).path, clusters) for d in run_dirs], format_cost, as_json)


def _echo_results(results: list, formatter, as_json: bool) -> None:
    """One JSON document, or each run's formatted lines with a blank line between runs."""
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for i, r in enumerate(results):
        if i:
            click.echo("")
        for line in formatter(r):
            click.echo(line)


@click.group()
def cluster() -> None:
    """Cluster profiles against the live cluster."""


@cluster.command("check")
@click.argument("name")
@click.option("--clusters", type=click.Path(dir_okay=False), default=None,
              help="Cluster profiles file (default $LAUNCHER_CLUSTERS or ~/.config/launcher/clusters.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(name: str, clusters: str | None, as_json: bool) -> int:
    """Compare profile NAME with the live cluster (scontrol show partition/node, sacctmgr): partitions,
    GPU type and count per node, CPUs, memory, time limit, node limit. Lists every difference and
    exits 1 when there is any.
    """
    result = check_profile(profiles.load(name, clusters))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for note in result["notes"]:
            click.echo(f"note: {note}")
        if result["lines"]:
            click.echo(f"profile {name!r} differs from the live cluster in {len(result['lines'])} place(s):")
            for line in result["lines"]:
                click.echo(f"  - {line}")
        else:
            click.echo(f"profile {name!r} matches the live cluster ({', '.join(result['partitions'])})")
    return 1 if result["lines"] else 0
