"""`launcher bench`: run a matrix of setups and measure them (or render it as a Slurm job array);
`launcher bench collect DIR...`: merge bench results and draw the plots. Heavy imports inside."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from launcher import outpaths
from launcher.commands.common import FiniteFloat
from launcher.config.flags import CLUSTER_FLAGS, SPEC_FLAGS
from launcher.errors import RunFailed, UserError

# The matrix axes take comma lists here (they belong to bench); every other shared flag
# applies to all setups. Steps come from --steps/--warmup, and a bench never checkpoints.
_AXIS_FLAGS = {
    "method": "Methods, e.g. full,lora,qlora.",
    "zero": "ZeRO stages, e.g. auto,0,2,3.",
    "attn": "Attention kernels, e.g. sdpa,eager.",
    "grad_ckpt": "Gradient checkpointing: on,off.",
    "micro_batch": "Micro batches, e.g. 1,2,4.",
    "seq_len": "Sequence lengths, e.g. 128,256.",
    "precision": "Precisions, e.g. auto,bf16,fp32.",
    "loss": "LM losses, e.g. standard,chunked.",
    "compile": "torch.compile of the decoder blocks: on,off.",
}
_NOT_SHARED = set(_AXIS_FLAGS) | {"max_steps", "save_every"}


def _name(decls: tuple[str, ...], kw: dict[str, Any]) -> str:
    return click.Option(list(decls), **kw).name or ""


_SHARED = [(d, kw) for d, kw in SPEC_FLAGS + CLUSTER_FLAGS if _name(d, kw) not in _NOT_SHARED]
_SHARED_NAMES = {_name(d, kw) for d, kw in _SHARED}
_BENCH_NAMES = {"matrix", "out", "steps", "warmup", "baseline", "usd_per_device_hour", "device_tflops", "gpu",
                "slurm", "submit", "force", *_AXIS_FLAGS}


def _shared_options(fn: Any) -> Any:
    for decls, kw in reversed(_SHARED):
        fn = click.option(*decls, **kw)(fn)
    for axis in reversed(list(_AXIS_FLAGS)):
        fn = click.option(f"--{axis.replace('_', '-')}", axis, metavar="V1,V2", help=_AXIS_FLAGS[axis])(fn)
    return fn


@click.command(context_settings={"max_content_width": 100})
@click.argument("args", nargs=-1, metavar="[SPEC | collect DIR...]")
@click.option("--matrix", type=click.Path(dir_okay=False), help="Matrix YAML: base spec, axes, steps, price.")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR",
              help="Results folder (collect: default the one DIR given).")
@click.option("--steps", type=click.IntRange(1), help="Timed optimizer steps per setup (default 10).")
@click.option("--warmup", type=click.IntRange(0), help="Optimizer steps before the timed ones (default 3).")
@click.option("--baseline", is_flag=True, default=None,
              help="Also run benchmarks/baseline_hf.py (plain Trainer + peft) per setup; report our/baseline.")
@click.option("--usd-per-device-hour", type=FiniteFloat(0), help="Price of one device-hour, for $ per 1M tokens.")
@click.option("--device-tflops", type=FiniteFloat(0, min_open=True),
              help="Peak TFLOP/s per device for MFU (default: the GPU table; none on CPU).")
@click.option("--gpu", help="Device-table name (H100-80GB, H200, ...) instead of the detected GPU.")
@click.option("--slurm", is_flag=True, help="Write a Slurm job array (a task per setup) into --out instead of running.")
@click.option("--submit", is_flag=True, help="With --slurm: submit it with sbatch.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
@_shared_options
def bench(args: tuple[str, ...], **kw: Any) -> None:
    """Measure tokens/s, MFU, memory and $ per 1M tokens for each setup of a matrix.

    \b
    launcher bench --matrix benchmarks/matrices/cpu_tiny.yaml --out DIR
    launcher bench [SPEC] --method full,lora --zero 2,3 --grad-ckpt on,off --out DIR
    launcher bench --matrix M.yaml --slurm --out DIR [--submit]   (a job array; later:)
    launcher bench collect DIR [DIR...] [--out DIR]

    The setups are the product of the axes (--method, --zero, --attn, --grad-ckpt, --micro-batch,
    --seq-len, --precision, --loss, --compile: comma lists, over the matrix's axes); every other flag applies to all. Each setup
    trains through the launcher's own loop with DeepSpeed (`launcher run`'s launch), the first
    --warmup steps left out and the device synchronized around the timed steps. Writes
    results.jsonl, results.csv, tokens_per_s.png, usd_per_mtok.png and memory.png into DIR. A setup
    that fails (out of memory, refused) is a row with its error. Exit 1 when every setup failed.
    """
    ctx = click.get_current_context()
    if args[:1] == ("collect",):
        given = [n for n in kw if n != "out" and ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"`launcher bench collect DIR...` takes only --out; drop "
                            f"{', '.join('--' + n.replace('_', '-') for n in given)}")
        _collect(list(args[1:]), kw["out"])
        return
    if len(args) > 1:
        raise UserError(f"launcher bench takes one SPEC (got {len(args)} arguments); to merge result folders use "
                        f"`launcher bench collect DIR...`")
    _run(args[0] if args else None, kw)


def _run(spec_path: str | None, kw: dict[str, Any]) -> None:
    from launcher.bench import matrix, report, run

    if not kw["out"]:
        raise UserError("--out DIR is required: the results (and, with --slurm, the job array) go there")
    if kw["submit"] and not kw["slurm"]:
        raise UserError("--submit submits the job array that --slurm writes; add --slurm")
    bench = matrix.make_bench(
        matrix=kw["matrix"], spec=spec_path, axes={axis: kw[axis] for axis in matrix.AXES},
        flags={n: kw[n] for n in _SHARED_NAMES - {"sets", "cluster", "clusters"}}, sets=list(kw["sets"] or ()),
        cluster=kw["cluster"], clusters_file=kw["clusters"], steps=kw["steps"], warmup=kw["warmup"],
        usd_per_device_hour=kw["usd_per_device_hour"], device_tflops=kw["device_tflops"], gpu=kw["gpu"],
        baseline=bool(kw["baseline"]), name=Path(kw["out"]).name)
    setups, opts = bench.setups, bench.options
    out = outpaths.resolve(kw["out"], "--out")
    if kw["slurm"]:
        _slurm(setups, out, opts, kw)
        return
    from rich.console import Console

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the bench draws its own progress bar
    rows = run.run_local(setups, out, opts, force=kw["force"], argv=sys.argv[1:], console=Console(stderr=True))
    _print_table(report.table(rows))
    click.echo(f"results in {out} ({report.RESULTS_JSONL}, {report.RESULTS_CSV}, {', '.join(report.PLOTS)})")
    if rows and all(r.get("error") for r in rows if r["kind"] == "launcher"):
        raise RunFailed(f"every setup failed; see the error column and {out}/setups/*/logs/")


def _slurm(setups: list[Any], out: Path, opts: Any, kw: dict[str, Any]) -> None:
    from launcher.bench import run

    job, tasks = run.render_slurm(setups, out, opts, force=kw["force"], check_tools=kw["submit"])
    click.echo(f"wrote {job.parent} (job.sbatch: {len(tasks)} array task(s); task i in tasks/<i>/)", err=True)
    if not kw["submit"]:
        click.echo(f"submit with: sbatch {job}  (or add --submit); afterwards: launcher bench collect {job.parent}",
                   err=True)
        click.echo(str(job))
        return
    click.echo(run.submit_array(job, len(tasks)))


def _collect(dirs: list[str], out: str | None) -> None:
    from launcher.bench import report, run

    dest, rows = run.collect([Path(d) for d in dirs], Path(out) if out else None)
    _print_table(report.table(rows))
    click.echo(f"{len(rows)} row(s) from {len(dirs)} folder(s) -> {dest} ({report.RESULTS_JSONL}, {report.RESULTS_CSV}, "
               f"{', '.join(report.PLOTS)})")


def _print_table(table: Any) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough that rows stay one line each
        console = Console(width=220)
    console.print(table)
