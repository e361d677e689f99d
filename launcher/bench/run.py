"""Running a bench: each setup trained here through `launcher run`'s launch (its ranks run the bench's
measuring entry, launcher.bench.probe) and the plain-Trainer baseline beside it, or the whole matrix
rendered as a Slurm job array; and the rows a bench dir holds, for `launcher bench collect`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from launcher import assets
from launcher.bench.matrix import Options, Setup, baseline_key, baseline_label, baseline_setups, bench_spec
from launcher.bench.report import RESULTS_JSONL, error_row, finish, make_row, read_results, write_meta
from launcher.config.resolve import resolve
from launcher.config.spec import PREFERENCE_TASKS, RunSpec
from launcher.data.check import check_data
from launcher.data.source import data_files, datasets_builder
from launcher.errors import SpecError, UserError
from launcher.model.load import model_source
from launcher.plan.plan import Plan, make_plan
from launcher.render.slurm import render_sbatch
from launcher.rundir.jobs import record_job
from launcher.rundir.layout import RunDir
from launcher.submit.local import free_port, launch_command, prepare_run
from launcher.submit.rundir import create as create_run_dir
from launcher.submit.slurm import check_cluster_tools, sbatch

BASELINE_SCRIPT = assets.PACKAGE_PARENT / "benchmarks" / "baseline_hf.py"
# What each rank of a setup runs (`python -m launcher.bench.probe rank RUN_DIR/spec.yaml`), in place of
# `launcher train`: the same training with the measuring callback added.
RANK_ENTRY = ("launcher.bench.probe", "rank")


# =========================================================================== the task file

# Written here for each setup's run dir, read by its ranks (launcher.bench.probe): the setup's kind
# (launcher or baseline), its axis values and the bench's options.

def write_task(run_dir: Path, kind: str, values: dict[str, Any], opts: Options) -> None:
    RunDir(run_dir).bench_task.write_text(json.dumps({"kind": kind, "values": values, **opts.to_dict()}, indent=2) + "\n")


def read_task(run_dir: Path) -> dict[str, Any]:
    p = RunDir(run_dir).bench_task
    if not p.is_file():
        raise UserError(f"{run_dir} has no {p.name}: not a bench setup (made by `launcher bench`)")
    return json.loads(p.read_text())


def task_options(task: dict[str, Any]) -> Options:
    return Options(**{k: task[k] for k in Options.__dataclass_fields__ if k in task})


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The ranks' records (RUN_DIR/bench/rank<R>.json), or the baseline's (its row's raw record)."""
    rd = RunDir(run_dir)
    if kind == "baseline":
        if not rd.bench_baseline.is_file():
            return []
        data = json.loads(rd.bench_baseline.read_text())
        return [data.get("record", data)]
    return [json.loads(p.read_text()) for p in sorted(rd.bench.glob("rank*.json"))] if rd.bench.is_dir() else []


# =========================================================================== running a setup here

def rank_command(run_dir: Path, plan: Plan) -> tuple[list[str], dict[str, str]]:
    """`launcher run`'s launch (deepspeed launcher, same environment), the ranks running the bench entry."""
    return launch_command(run_dir, plan, plan.nproc_per_node, master_port=free_port(), quiet=True, entry=RANK_ENTRY)


def baseline_command(spec: RunSpec, plan: Plan, run_dir: Path, opts: Options) -> list[str]:
    """argv of benchmarks/baseline_hf.py for this setup: same model, data, batch, precision, steps."""
    if not BASELINE_SCRIPT.is_file():
        raise UserError(f"--baseline runs {BASELINE_SCRIPT}, which this installation lacks; run the bench from "
                        f"the source tree")
    fmt, files = data_files(spec)
    lo, q = spec.method.lora, spec.method.quant
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    argv = [sys.executable, str(BASELINE_SCRIPT),
            "--model", model_source(spec), "--out", str(RunDir(run_dir).bench_baseline),
            "--output-dir", str(RunDir(run_dir).baseline_out),
            "--data-format", "hub" if fmt == "hub" else str(datasets_builder(fmt)),
            "--text-field", spec.data.text_field, "--seq-len", str(plan.seq_len),
            "--micro-batch", str(plan.micro_batch), "--grad-accum", str(plan.grad_accum),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--method", spec.method.name,
            "--precision", plan.precision, "--attn", "sdpa",
            "--grad-ckpt" if spec.model.grad_ckpt else "--no-grad-ckpt",
            "--lr", str(spec.optim.lr), "--weight-decay", str(spec.optim.weight_decay),
            "--max-grad-norm", str(spec.optim.grad_clip), "--seed", str(spec.optim.seed),
            "--lora-r", str(lo.r), "--lora-alpha", str(lo.alpha), "--lora-dropout", str(lo.dropout),
            "--lora-targets", targets, "--quant-type", q.quant_type,
            "--double-quant" if q.double_quant else "--no-double-quant"]
    if spec.task == "dpo":
        d = spec.data
        argv += ["--task", "dpo", "--beta", str(spec.pref.beta),
                 "--pair-fields", f"{d.prompt_field},{d.chosen_field},{d.rejected_field}"]
    for f in ([spec.data.path] if fmt == "hub" else [str(x) for x in files]):
        argv += ["--data", str(f)]
    return argv


def baseline_env(plan: Plan) -> dict[str, str]:
    """The ranks' environment minus the process-group variables: the baseline is one plain process."""
    _, env = launch_command("/nonexistent", plan, 1, quiet=True)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "LAUNCHER_RUN_DIR"):
        env.pop(k, None)
    return env


def _run_logged(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run argv in its own session with its output in `log`; INT/TERM reach its whole process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        except BaseException:  # the whole launch tree goes, not only the launcher
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def run_baseline(spec: RunSpec, plan: Plan, run_dir: Path, opts: Options) -> int:
    """benchmarks/baseline_hf.py for this setup, one process; its record in RUN_DIR/bench/baseline.json."""
    rd = RunDir(run_dir)
    rd.bench.mkdir(parents=True, exist_ok=True)
    if plan.world_size != 1:
        rd.bench_baseline.write_text(json.dumps(
            {"rank": 0, "world_size": plan.world_size, "error": "the baseline runs on one device; this setup has "
             f"{plan.world_size} ranks"}))
        return 2
    if spec.task in PREFERENCE_TASKS and spec.task != "dpo":
        rd.bench_baseline.write_text(json.dumps(
            {"rank": 0, "world_size": 1, "error": f"no plain-TRL baseline for task {spec.task} yet (dpo has one)"}))
        return 2
    return _run_logged(baseline_command(spec, plan, run_dir, opts), baseline_env(plan), rd.baseline_log)


def _failure(run_dir: Path, code: int, log: Path) -> str:
    tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
    hint = next((x.strip() for x in reversed(tail) if "Error" in x or "error:" in x), "")
    return f"exit {code}{': ' + hint[:300] if hint else ''} (log: {log})"


def run_setup(setup: Setup, out: Path, opts: Options, *, with_baseline: bool = False,
              on_phase: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run one setup here (then the baseline, when asked); its rows. Failures become rows with the error."""
    d = out / "setups" / f"{setup.index:03d}"
    rows: list[dict[str, Any]] = []
    if setup.spec is None:
        return [error_row(setup, opts, setup.error or "refused")]
    on_phase(f"{setup.label}: prepare")
    try:
        rd, spec, plan, _ = prepare_run(bench_spec(setup.spec, d, opts.steps, opts.warmup, setup.index), d,
                                        force=True)
    except (UserError, SpecError) as exc:
        return [error_row(setup, opts, str(exc))]
    write_task(rd.path, "launcher", setup.values, opts)
    on_phase(f"{setup.label}: launcher")
    argv, env = rank_command(rd.path, plan)
    log = rd.bench_log
    code = _run_logged(argv, env, log)
    records = read_records(rd.path, "launcher")
    rows.append(make_row(spec, setup.values, "launcher", records, opts,
                         error=None if code == 0 or any(r.get("error") for r in records) else _failure(rd.path, code, log)))
    if with_baseline:
        on_phase(baseline_label(setup.values))
        code = run_baseline(spec, plan, rd.path, opts)
        records = read_records(rd.path, "baseline")
        blog = rd.baseline_log
        rows.append(make_row(spec, setup.values, "baseline", records, opts,
                             error=None if code == 0 or any(r.get("error") for r in records) else _failure(rd.path, code, blog)))
    for sub in (rd.final, rd.base, rd.baseline_out, rd.checkpoints):  # trained weights are not the result; logs stay
        shutil.rmtree(sub, ignore_errors=True)
    return rows

def run_all(setups: list[Setup], out: Path, opts: Options, console: Any = None) -> list[dict[str, Any]]:
    """Every setup in turn with a progress bar; results.jsonl grows after each one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    partial = out / RESULTS_JSONL
    partial.write_text("")
    baselines = {s.index for s in baseline_setups(setups)} if opts.baseline else set()
    if opts.baseline and len(baselines) < len({baseline_key(s.values) for s in setups if s.spec is not None}):
        (console or Console(stderr=True)).print("note: the baseline runs on one device only; setups with more "
                                                "ranks get no baseline")
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task("", total=len(setups) + len(baselines))
        for s in setups:
            new = run_setup(s, out, opts, with_baseline=s.index in baselines,
                            on_phase=lambda text: progress.update(task, description=text))
            rows += new
            with partial.open("a") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
            progress.advance(task, 1 + (s.index in baselines))
            for r in new:
                progress.console.print(f"  {r['setup']}: " + (f"error: {r['error']}" if r.get("error") else
                                       f"{r['tokens_per_s']:,.0f} tokens/s"))
    return rows


def run_local(setups: list[Setup], out: Path, opts: Options, *, force: bool, argv: list[str],
              console: Any = None) -> list[dict[str, Any]]:
    """`launcher bench` without --slurm: every setup (and its baseline) here, then results.jsonl/csv/md,
    the plots and meta.json in `out`. Refuses a non-empty `out` unless `force`. Progress goes to
    `console` (rich; default stderr)."""
    from rich.console import Console

    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} is not empty; choose a new --out or pass --force")
    console = console or Console(stderr=True)
    console.print(f"bench {opts.bench}: {len(setups)} setup(s) x ({opts.warmup} warm-up + {opts.steps} timed steps)"
                  f"{' + baseline' if opts.baseline else ''} -> {out}")
    rows = run_all(setups, out, opts, console=console)
    finish(out, rows)
    write_meta(out, rows, argv)
    return rows


# =========================================================================== Slurm

def render_slurm(setups: list[Setup], out: Path, opts: Options, *, force: bool,
                 check_tools: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """OUT/job.sbatch: one array task per setup (and per baseline), task i in OUT/tasks/<i>/; each
    task's ranks run the bench's entry (RANK_ENTRY) on its spec. `check_tools`: first check that
    this machine has the tools submitting needs (exit 2 before anything is written)."""
    first_spec = next((s.spec for s in setups if s.spec is not None), None)
    if check_tools and first_spec is not None:
        check_cluster_tools(first_spec)
    bad = [f"setup {s.index} ({s.label}): {s.error}" for s in setups if s.spec is None]
    if bad:
        raise SpecError(bad)
    tasks: list[tuple[str, Setup]] = [("launcher", s) for s in setups]
    if opts.baseline:
        tasks += [("baseline", s) for s in baseline_setups(setups)]
    out = Path(out).expanduser().resolve()
    specs = [bench_spec(s.spec, RunDir(out).task(i).path, opts.steps, opts.warmup, s.index)  # type: ignore[arg-type]
             for i, (_, s) in enumerate(tasks)]
    first = specs[0]
    plan = make_plan(first)
    for sp in specs:
        check_data(sp)
    render_sbatch(first, plan, out, python=sys.executable, array_specs=specs, entry=RANK_ENTRY)  # every check first
    rd, base, plan = create_run_dir(out, first, force=force)
    created = []
    listing = []
    for i, ((kind, s), sp) in enumerate(zip(tasks, specs)):
        trd, tspec, _ = create_run_dir(rd.task(i).path, sp, force=force)
        write_task(trd.path, kind, s.values, opts)
        created.append(tspec)
        listing.append({"index": i, "dir": f"tasks/{i}", "kind": kind,
                        "setup": baseline_label(s.values) if kind == "baseline" else s.label, "values": s.values})
    job = rd.job_script
    job.write_text(render_sbatch(base, plan, rd.path, python=sys.executable, array_specs=created, entry=RANK_ENTRY))
    job.chmod(0o700)
    rd.bench_settings.write_text(json.dumps({"options": opts.to_dict(), "tasks": listing}, indent=2) + "\n")
    return job, listing


def submit_array(job: Path, tasks: int) -> str:
    """sbatch the bench's job array and record it in the bench dir's jobs.jsonl; the job id."""
    job_id = sbatch(job)
    record_job(job.parent, job_id, "bench", array_tasks=tasks)
    return job_id


# =========================================================================== collect

def rows_of(d: Path) -> list[dict[str, Any]]:
    """The rows a bench dir holds: its results.jsonl, or (a --slurm dir) rows made from its tasks."""
    d = Path(d).expanduser().resolve()
    settings = RunDir(d).bench_settings
    if settings.is_file():
        info = json.loads(settings.read_text())
        opts = Options(**info["options"])
        rows = []
        for t in info["tasks"]:
            td = d / t["dir"]
            spec = resolve(RunDir(td).spec_path)
            records = read_records(td, t["kind"])
            err = None if records else "no measurement yet (task not run, still running, or it failed before training)"
            rows.append(make_row(spec, t["values"], t["kind"], records, opts, error=err))
        return rows
    if (d / RESULTS_JSONL).is_file():
        return read_results(d / RESULTS_JSONL)
    raise UserError(f"{d} holds no bench results ({RESULTS_JSONL}) and is not a `launcher bench --slurm` dir "
                    f"({settings.name})")


def collect(dirs: list[Path], out: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """`launcher bench collect`: the rows of every dir, paired with their baselines, written with the
    plots into `out` (default: the one dir given). Returns (where they went, the rows)."""
    if not dirs:
        raise UserError("launcher bench collect DIR [DIR...]: give at least one bench results folder")
    if out is None and len(dirs) > 1:
        raise UserError("collect merges several folders into --out DIR; give --out")
    dest = Path(out or dirs[0]).expanduser().resolve()
    rows = [r for d in dirs for r in rows_of(Path(d))]
    finish(dest, rows)
    return dest, rows
