"""A run submitted to Slurm: the run dir with its chain of batch scripts, sweeps as one job array, and sbatch.

The run is a chain of jobs, each waiting for the one before to succeed (afterok): a CPU job that
prepares the data when the cache lacks it (prepare.sbatch), the training job (job.sbatch), and the
follow-ups asked with --then (merge.sbatch, eval.sbatch). Everything is validated (spec, plan, chain,
every value the scripts would carry) before anything is written or queued; a bad input raises
UserError and leaves no trace.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher import outpaths, yamlio
from launcher.config.resolve import parse_set, with_overrides
from launcher.cli import REF_ENTRY
from launcher.config.spec import MERGEABLE_METHODS, RunSpec, reference_mode, validate
from launcher.data.cache import unprepared_paths
from launcher.errors import RunFailed, SpecError, UserError
from launcher.plan.plan import make_plan, settled
from launcher.render.slurm import render_chain_sbatch, render_sbatch
from launcher.rundir.jobs import record_job
from launcher.rundir.layout import CHAIN_SCRIPTS, JOB_SCRIPT, REF_SCRIPT
from launcher.submit import preflight
from launcher.submit.rundir import check_target, create, run_dir_paths

THEN_KINDS = ("merge", "eval")
_SWEEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_run(spec: RunSpec, out: str | Path, *, force: bool = False, submit: bool = False, dry_run: bool = False,
              sweeps: tuple[str, ...] | list[str] = (), prep: bool = True, then: tuple[str, ...] | list[str] = (),
              ignore_fit: bool = False, say: Callable[[str], None] = _stderr,
              emit: Callable[[str], None] = _stdout) -> None:
    """Write RUN_DIR with the batch scripts for `spec` and, with `submit`, queue them in order.

    `dry_run`: print the scripts and write nothing. `sweeps`: KEY=V1,V2 items, one job array over their
    product. `prep`: queue the data preparation job when the cache lacks the data. `then`: follow-up jobs
    (merge, eval). `say` gets the progress lines (notes, what was written and queued), `emit` the results
    (the scripts of a dry run, the path of job.sbatch, each job id as it is queued), each with its newline.
    """
    if dry_run and submit:
        raise UserError("--dry-run prints the scripts and submits nothing; drop one of --dry-run and --submit")
    check_chain(spec, then, sweeps)
    run_dir = outpaths.resolve(out, "--out")
    plan = make_plan(spec)
    tasks = sweep_tasks(spec, sweeps)
    for t in tasks:
        make_plan(t.spec)
    python = sys.executable
    task_specs = [t.spec for t in tasks] or None
    script = render_sbatch(spec, plan, run_dir, python=python, array_specs=task_specs, prepare_step=False)
    for each in (spec, *(t.spec for t in tasks)):
        # pre-flight, torch-free: model config and weights, LoRA targets, a data sample (missing, empty or
        # malformed file: exit 2 with the line), option clashes, the memory estimate against the GPU
        for note in preflight.check(each, slurm=True, ignore_fit=ignore_fit):
            say(f"note: {note}")
    missing = unprepared(task_specs or [spec])
    # full DPO: the reference log-probs by their own job on the training ranks, after prep and before train,
    # unless an earlier job cached them; a sweep's tasks compute their own in their training jobs
    with_ref = not tasks and reference_mode(settled(spec, plan)) == "precomputed"
    if with_ref:
        # keyed on the spec as the run dir will hold it (absolute paths, output.dir: the tiny base is its own)
        ref_cached = cached_reference(settled(validate(run_dir_paths(spec, run_dir)), plan))
        if ref_cached is not None:
            with_ref = False
            say(f"reference: log-probs already in the cache ({ref_cached}); no reference job")
    kinds = chain_kinds(prep and bool(missing), then, with_ref=with_ref)
    chain = {k: render_chain(spec, k, run_dir, python, task_specs) for k in kinds if k not in ("train", "ref")}
    if with_ref:
        chain["ref"] = render_sbatch(spec, plan, run_dir, python=python, prepare_step=False, entry=REF_ENTRY)
    if dry_run:
        emit(script)
        for kind, text in chain.items():
            emit(f"\n# ==== {SCRIPT_NAMES[kind]} ({kind} job) ====\n")
            emit(text)
        for i, t in enumerate(tasks):
            say(f"task {i}: {t.describe()}")
        _say_data(missing, prep, say)
        say("would queue: " + describe_chain(kinds))
        return
    if submit:
        check_cluster_tools(spec)

    check_target(run_dir, force=force)  # refusals before the first file is written
    for i in range(len(tasks)):
        check_target(run_dir / "tasks" / str(i), force=force)
    rd, spec, plan = create(run_dir, spec, force=force)
    created = [create(rd.task(i).path, t.spec, force=force)[1] for i, t in enumerate(tasks)]
    script = render_sbatch(spec, plan, rd.path, python=python, array_specs=created or None, prepare_step=False)
    with outpaths.writing(rd.path, "--out"):
        files = {"train": _write_script(rd.job_script, script)}
        if with_ref:
            files["ref"] = _write_script(rd.ref_script, render_sbatch(spec, plan, rd.path, python=python,
                                                                      prepare_step=False, entry=REF_ENTRY))
        elif rd.ref_script.is_file() and _rendered_here(rd.ref_script):
            rd.ref_script.unlink()
        for kind in CHAIN_SCRIPTS:
            path = rd.chain_script(kind)
            if kind in kinds:
                files[kind] = _write_script(path, render_chain(spec, kind, rd.path, python, created or None))
            elif path.is_file() and _rendered_here(path):
                path.unlink()  # a script of an earlier render (--force) that this chain does not run
        if tasks:
            rd.sweep_path.write_text(json.dumps(
                {"tasks": [{"index": i, "dir": str(rd.task(i).path.relative_to(rd.path)), "set": t.values}
                           for i, t in enumerate(tasks)]}, indent=2) + "\n")
    names = ", ".join(f.name for f in files.values())
    say(f"wrote {rd.path} ({names}, spec.yaml, ds_config.json, plan.txt"
        f"{f', {len(tasks)} sweep tasks' if tasks else ''})")
    _say_data(missing, prep, say)
    if not submit:
        say("submit with --submit, or by hand, each job after the one before:")
        for line in manual_commands(kinds, files):
            say(f"  {line}")
        emit(f"{files['train']}\n")
        return
    queued: list[tuple[str, str]] = []
    for kind in kinds:
        after = queued[-1][1] if queued else None
        try:
            job_id = sbatch(files[kind], after=after)
        except RunFailed as exc:
            if queued:
                done = ", ".join(f"{k} job {j}" for k, j in queued)
                raise RunFailed(f"{exc}. Already queued and recorded in {rd.jobs_path}: {done}; cancel them with "
                                f"`launcher cancel {rd.path}`") from None
            raise
        extra: dict[str, Any] = {"after": after} if after else {}
        if kind == "train" and tasks:
            extra["array_tasks"] = len(tasks)
        record_job(rd.path, job_id, kind, **extra)
        queued.append((kind, job_id))
        say(f"queued {kind} job {job_id}: {files[kind].name}"
            + (f", after {queued[-2][0]} job {after} succeeds" if after else ""))
        emit(f"{job_id}\n")


# --------------------------------------------------------------------------- the chain

def check_chain(spec: RunSpec, then: tuple[str, ...] | list[str], sweeps: tuple[str, ...] | list[str]) -> None:
    """--then refusals, before anything is written or queued."""
    if not then:
        return
    problems = []
    for kind in sorted(set(then)):
        if then.count(kind) > 1:
            problems.append(f"--then {kind} is given {then.count(kind)} times; give each follow-up job once")
    if "merge" in then and spec.method.name not in MERGEABLE_METHODS:
        what = {"full": "trains every weight", "freeze": "trains chosen weights in place",
                "prefix": "learns virtual tokens that stay apart from the weights",
                "prompt": "learns virtual tokens that stay apart from the weights"}.get(spec.method.name, "")
        problems.append(f"--then merge: method {spec.method.name!r} {what}, so there is no adapter to merge into "
                        f"the base model (RUN_DIR/final is the model to use); merge is for methods "
                        f"{', '.join(MERGEABLE_METHODS)}: drop --then merge")
    if sweeps:
        problems.append("--then with --sweep: the follow-up jobs act on one trained model, and a sweep trains "
                        "one per task; queue them per task (`launcher merge`/`launcher eval` RUN_DIR/tasks/<i>)")
    if problems:
        raise UserError("; ".join(problems))


def cached_reference(spec: RunSpec) -> Path | None:
    """The cache folder of a full DPO run's reference log-probs (reference_mode precomputed) when an earlier
    job completed it here (the key reads the data, tokenizer and reference model files: no torch), else None."""
    from launcher.data.cache import reference_path
    from launcher.model.load import model_source

    try:
        path = reference_path(spec, model_source(spec), spec.precision.dtype)
    except (UserError, OSError, ValueError):
        return None
    return path if (path / "meta.json").is_file() else None


def chain_kinds(with_prep: bool, then: tuple[str, ...] | list[str], *, with_ref: bool = False) -> list[str]:
    """The jobs in the order they are queued, each after the one before."""
    return (["prep"] if with_prep else []) + (["ref"] if with_ref else []) + ["train", *then]


SCRIPT_NAMES = {"train": JOB_SCRIPT, "ref": REF_SCRIPT, **CHAIN_SCRIPTS}


def describe_chain(kinds: list[str]) -> str:
    names = SCRIPT_NAMES
    return ", then ".join(f"{names[k]} ({k})" for k in kinds) + (" (each after the one before succeeds)"
                                                                  if len(kinds) > 1 else "")


def manual_commands(kinds: list[str], files: dict[str, Path]) -> list[str]:
    """What --submit runs, as shell lines a user can paste."""
    lines, prev = [], None
    for kind in kinds:
        dep = f" --dependency=afterok:${prev} --kill-on-invalid-dep=yes" if prev else ""
        lines.append(f"{kind}=$(sbatch --parsable{dep} {shlex.quote(str(files[kind]))})")
        prev = kind
    return lines


def render_chain(spec: RunSpec, kind: str, run_dir: Path, python: str, task_specs: list[RunSpec] | None) -> str:
    return render_chain_sbatch(spec, kind, run_dir, python=python, array_specs=task_specs)


def unprepared(specs: list[RunSpec]) -> list[Path]:
    """Cache folders of these specs' tokenized data that this machine does not see complete.

    Computed without torch or a tokenizer load: the cache key reads the data files' size and mtime and
    hashes the tokenizer files (a hub model: its name and revision). Where the key cannot be computed
    here, the data counts as unprepared: the preparation job is then a cache hit of a few seconds.
    """
    missing: list[Path] = []
    for s in specs:
        try:
            paths = unprepared_paths(s)
        except (UserError, OSError, ValueError):
            return [Path("?")]
        missing += [p for p in paths if p not in missing]
    return missing


def _say_data(missing: list[Path], prep: bool, say: Callable[[str], None]) -> None:
    if not missing:
        say("data: already prepared in the cache; no preparation job")
    elif prep:
        say("data: not prepared yet; a CPU job prepares it before training (prepare.sbatch)")
    else:
        where = ", ".join(str(p) for p in missing)
        say(f"note: --no-prep, but the tokenized data is not in the cache here ({where}); the ranks exit 2 "
            f"unless it is prepared where they run: `launcher prepare SPEC` first")


def _rendered_here(path: Path) -> bool:
    """Whether a batch script in a run dir is one launcher rendered (its header says so); a user's own
    script of the same name is kept."""
    try:
        with path.open("rb") as f:
            return _RENDERED_MARK in f.read(4096)
    except OSError:
        return False


_RENDERED_MARK = b"# Generated by `launcher slurm`"


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o700)
    return path


# --------------------------------------------------------------------------- sweeps

@dataclass(frozen=True)
class SweepTask:
    spec: RunSpec
    values: dict[str, Any]  # the swept keys and their values for this task

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.values.items())


def sweep_tasks(spec: RunSpec, sweeps: tuple[str, ...] | list[str]) -> list[SweepTask]:
    """One task per combination of --sweep values (first flag varies slowest), each validated."""
    axes: list[tuple[str, list[str]]] = []
    for item in sweeps:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or not _SWEEP_KEY.fullmatch(key) or not all(values):
            raise UserError(f"--sweep {item!r}: expected dotted.key=v1,v2 (values without empty items), "
                            f"for example --sweep optim.lr=1e-4,3e-4")
        if key.startswith("cluster.") or key in ("output.dir", "output"):
            raise UserError(f"--sweep {key}: a job array shares one set of #SBATCH directives and each task's "
                            f"output dir is RUN_DIR/tasks/<i>; sweep training settings here and cluster "
                            f"settings with separate `launcher slurm` runs")
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k, _ in axes):
            raise UserError(f"--sweep {key}: given twice (or overlapping another --sweep); give each key once")
        axes.append((key, values))
    if not axes:
        return []
    tasks: list[SweepTask] = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        pairs = [f"{k}={v}" for (k, _), v in zip(axes, combo)]
        values = {k: yamlio.loads(v, source=f"--sweep {k}") for (k, _), v in zip(axes, combo)}
        try:
            task_spec = with_overrides(spec, parse_set(pairs))
        except SpecError as exc:
            raise SpecError([f"sweep task {len(tasks)} ({', '.join(pairs)}): {p}" for p in exc.problems]) from None
        tasks.append(SweepTask(task_spec, values))
    return tasks


# --------------------------------------------------------------------------- the cluster's tools

def check_cluster_tools(spec: RunSpec) -> None:
    """What the script needs from this cluster's tools; exit 2 before submitting when one is missing."""
    missing = [f"`{tool}` is not on the PATH (the job script needs it)"
               for tool in ("sbatch", "srun", "scontrol", "scancel") if shutil.which(tool) is None]
    ct = spec.cluster.container
    if ct is not None and ct.runtime == "apptainer" and shutil.which("apptainer") is None:
        missing.append("cluster.container.runtime is apptainer, but `apptainer` is not on the PATH")
    if ct is not None and ct.runtime == "pyxis" and shutil.which("srun") is not None:
        helptext = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=60)
        if "--container-image" not in helptext.stdout + helptext.stderr:
            missing.append("cluster.container.runtime is pyxis, but `srun --help` has no --container-image "
                           "(the pyxis plugin is not installed here); use runtime apptainer or no container")
    if missing:
        raise UserError("cannot submit: " + "; ".join(missing))


def sbatch_argv(job_file: Path, after: str | None = None) -> list[str]:
    """The sbatch command for one job of the chain. The job inherits this environment (--export=ALL).
    `after`: the job it waits for; given here rather than in the script so that a script resubmitted
    by hand does not wait for a job the controller has forgotten, and a failed job cancels the ones
    waiting for it (--kill-on-invalid-dep) instead of leaving them pending forever."""
    dep = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    return ["sbatch", "--parsable", "--export=ALL", *dep, str(job_file)]


def sbatch(job_file: Path, after: str | None = None) -> str:
    """Submit; return the job id."""
    proc = subprocess.run(sbatch_argv(job_file, after), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RunFailed(f"sbatch refused {job_file}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
    if not job_id.isdigit():
        raise RunFailed(f"sbatch gave no job id for {job_file}: {proc.stdout.strip()!r}")
    return job_id
