"""`launcher bench`: run a matrix of setups and measure them (or render it as a Slurm job array);
`launcher bench collect DIR...`: merge bench results and draw the plots. Heavy imports inside."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from launcher.commands.common import SPEC_FLAGS, CLUSTER_FLAGS
from launcher.errors import RunFailed, UserError

# The six matrix axes take comma lists here (they belong to bench); every other shared flag
# applies to all setups. Steps come from --steps/--warmup, and a bench never checkpoints.
_AXIS_FLAGS = {
    "method": "Methods, e.g. full,lora,qlora.",
    "zero": "ZeRO stages, e.g. 2,3.",
    "attn": "Attention kernels, e.g. sdpa,eager.",
    "grad_ckpt": "Gradient checkpointing: on,off.",
    "micro_batch": "Micro batches, e.g. 1,2,4.",
    "seq_len": "Sequence lengths, e.g. 128,256.",
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
@click.option("--usd-per-device-hour", type=click.FloatRange(0), help="Price of one device-hour, for $ per 1M tokens.")
@click.option("--device-tflops", type=click.FloatRange(0, min_open=True),
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
    --seq-len: comma lists, over the matrix's axes); every other flag applies to all. Each setup
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
    from launcher.bench import run as b
    from launcher.plan.estimate import DEVICES

    if not kw["out"]:
        raise UserError("--out DIR is required: the results (and, with --slurm, the job array) go there")
    if kw["submit"] and not kw["slurm"]:
        raise UserError("--submit submits the job array that --slurm writes; add --slurm")
    if kw["gpu"] and kw["gpu"] not in DEVICES:
        raise UserError(f"--gpu {kw['gpu']!r} is not in the table ({', '.join(DEVICES)}); give --device-tflops instead")
    matrix = b.load_matrix(kw["matrix"]) if kw["matrix"] else b.Matrix(name=Path(kw["out"]).name)
    axes = dict(matrix.axes)
    for axis in b.AXES:
        if kw[axis] is not None:
            axes[axis] = b.parse_axis(axis, kw[axis])
    flags = {n: kw[n] for n in _SHARED_NAMES - {"sets", "cluster", "clusters"}}
    base = b.resolve_base(matrix.base, spec_path, flags, list(kw["sets"] or ()), kw["cluster"], kw["clusters"])
    model = Path(base.model.name).expanduser()
    if base.model.name.startswith((".", "/", "~")) and not model.is_dir():
        raise UserError(f"model {base.model.name}: no such directory; build a benchmark shape with "
                        f"`python benchmarks/make_model.py llama-3.2-1b|llama-3-8b --out {base.model.name}`")
    price = kw["usd_per_device_hour"] if kw["usd_per_device_hour"] is not None else matrix.usd_per_device_hour
    if price is None:  # the cluster profile's price, as `launcher estimate` takes it
        c = base.cluster
        nproc = c.nproc_per_node or (c.gpus_per_node or 1)
        price = c.usd_per_gpu_hour if c.gpus_per_node else (
            c.usd_per_node_hour / nproc if c.usd_per_node_hour is not None else None)
    opts = b.Options(
        steps=kw["steps"] or matrix.steps or b.DEFAULT_STEPS,
        warmup=kw["warmup"] if kw["warmup"] is not None else (matrix.warmup if matrix.warmup is not None
                                                             else b.DEFAULT_WARMUP),
        usd_per_device_hour=price, device_tflops=kw["device_tflops"] or matrix.device_tflops, gpu=kw["gpu"],
        baseline=bool(kw["baseline"] or matrix.baseline), bench=matrix.name)
    setups = b.expand(base, axes)
    out = Path(kw["out"]).expanduser().resolve()
    if kw["slurm"]:
        _slurm(b, setups, out, opts, kw)
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not kw["force"]:
        raise UserError(f"{out} is not empty; choose a new --out or pass --force")
    from rich.console import Console

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the bench draws its own progress bar
    err = Console(stderr=True)
    err.print(f"bench {opts.bench}: {len(setups)} setup(s) x ({opts.warmup} warm-up + {opts.steps} timed steps)"
              f"{' + baseline' if opts.baseline else ''} -> {out}")
    rows = b.run_all(setups, out, opts, console=err)
    b.finish(out, rows)
    b.write_meta(out, rows, sys.argv[1:])
    _print_table(b.table(rows))
    click.echo(f"results in {out} ({b.RESULTS_JSONL}, {b.RESULTS_CSV}, {', '.join(b.PLOTS)})")
    if rows and all(r.get("error") for r in rows if r["kind"] == "launcher"):
        raise RunFailed(f"every setup failed; see the error column and {out}/setups/*/logs/")


def _slurm(b: Any, setups: list[Any], out: Path, opts: Any, kw: dict[str, Any]) -> None:
    from launcher.commands.slurm_cmd import check_cluster_tools, sbatch
    from launcher.rundir.layout import RunDir

    first = next((s.spec for s in setups if s.spec is not None), None)
    if kw["submit"] and first is not None:
        check_cluster_tools(first)
    job, tasks = b.render_slurm(setups, out, opts, force=kw["force"])
    click.echo(f"wrote {job.parent} (job.sbatch: {len(tasks)} array task(s); task i in tasks/<i>/)", err=True)
    if not kw["submit"]:
        click.echo(f"submit with: sbatch {job}  (or add --submit); afterwards: launcher bench collect {job.parent}",
                   err=True)
        click.echo(str(job))
        return
    job_id = sbatch(job)
    RunDir(job.parent).record_job(job_id, "bench", array_tasks=len(tasks))
    click.echo(job_id)


def _collect(dirs: list[str], out: str | None) -> None:
    from launcher.bench import run as b

    if not dirs:
        raise UserError("launcher bench collect DIR [DIR...]: give at least one bench results folder")
    if out is None and len(dirs) > 1:
        raise UserError("collect merges several folders into --out DIR; give --out")
    dest = Path(out or dirs[0]).expanduser().resolve()
    rows = [r for d in dirs for r in b.rows_of(Path(d))]
    b.finish(dest, rows)
    _print_table(b.table(rows))
    click.echo(f"{len(rows)} row(s) from {len(dirs)} folder(s) -> {dest} ({b.RESULTS_JSONL}, {b.RESULTS_CSV}, "
               f"{', '.join(b.PLOTS)})")


def _print_table(table: Any) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough that rows stay one line each
        console = Console(width=220)
    console.print(table)
