"""RunSpec + Plan -> the Slurm batch scripts of a run. Pure: the same inputs give byte-identical text.

The training job (slurm/job.sbatch.j2) and the one-task jobs chained around it (slurm/chain.sbatch.j2):
`prep` tokenizes the data before training, `merge` and `eval` follow it. The `#SBATCH` directives are
built here, one per line and sorted. Every value that reaches a script is quoted here, or checked
against a strict pattern, and the templates refuse any string that is not marked as such (`Sh`).
The names of the run dir's files, of the ranks' markers and the kinds of the jobs.jsonl lines the
script writes reach the templates from their homes: rundir/layout.py, rundir/markers.py, rundir/jobs.py.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from launcher import assets
from launcher.cli import TRAIN_ENTRY
from launcher.config.spec import ClusterSpec, RunSpec
from launcher.errors import SpecError
from launcher.plan.plan import Plan
from launcher.rundir import jobs, markers
from launcher.rundir.layout import ARRAY_LOG_PATTERN, CHAIN_SCRIPTS, JOB_LOG_PATTERN, RunDir

TEMPLATE = "job.sbatch.j2"
CHAIN_TEMPLATE = "chain.sbatch.j2"
# The one-task jobs around training (each with its script in the run dir): what each runs is fixed
# here, never taken from the spec.
CHAIN_KINDS = tuple(CHAIN_SCRIPTS)
# Python in a container or after the spec's set-up lines: whatever those put first on the PATH.
PATH_PYTHON = "python3"
# torchrun's shutdown timeout when the spec asks for no warning signal (torchrun's own default).
DEFAULT_SHUTDOWN_S = 30

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEM = re.compile(r"[0-9]+[KMGT]?")
_THROTTLE = re.compile(r"%[0-9]+")
# Characters sbatch's own #SBATCH parser passes through unquoted (it splits on blanks, reads quotes
# and backslashes, and ends the line at an unquoted #).
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_.,:/%=+@-]+")
# sbatch blanks these words wherever they appear on an #SBATCH line (heterogeneous job separators).
_HETJOB = re.compile(r"hetjob|packjob", re.IGNORECASE)
# A run-dir name or a piece of a marker name: plain inside double quotes, in a glob and in ${x%...}.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class Sh(str):
    """Text that may go into the script as it is: shell-quoted, pattern-checked, or fixed by us."""


def sh(value: str) -> Sh:
    """One shell word that means exactly `value` to bash."""
    return Sh(shlex.quote(value))


def sbatch_quote(value: str) -> str:
    """One #SBATCH argument that means exactly `value` to sbatch.

    sbatch parses #SBATCH lines itself (src/sbatch/opt.c `_get_argument`), not with bash: a
    backslash escapes the next character even inside single quotes, so shlex.quote's output would
    lose backslashes. Double quotes with `\\` and `"` escaped read back verbatim.
    """
    if _SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_filename(path: str) -> str:
    """A literal path inside an --output pattern: Slurm expands %x, %j, ...; %% is a literal %."""
    return path.replace("%", "%%")


def job_name(spec: RunSpec) -> str:
    """cluster.job_name when set to something other than its default, else the run name."""
    default = ClusterSpec.model_fields["job_name"].default
    return spec.cluster.job_name if spec.cluster.job_name != default else spec.name


# --------------------------------------------------------------------------- checks

def check(spec: RunSpec, run_dir: Path, *, python: str, array_specs: Sequence[RunSpec] | None = None) -> list[str]:
    """What would make the script wrong or unsafe, one message (with the fix) per problem."""
    c = spec.cluster
    p: list[str] = []
    name_field = "cluster.job_name" if job_name(spec) == c.job_name else "name"
    directive_values = {
        name_field: job_name(spec), "cluster.partition": c.partition, "cluster.account": c.account,
        "cluster.qos": c.qos, "cluster.constraint": c.constraint, "cluster.reservation": c.reservation,
        "cluster.mem": c.mem, "cluster.dependency": c.dependency, "cluster.array": c.array,
        "cluster.prep.partition": c.prep.partition, "cluster.prep.mem": c.prep.mem,
    }
    for field, value in directive_values.items():
        if value is None:
            continue
        if _CONTROL.search(value):
            p.append(f"{field}={value!r} contains a control character (newline, tab, ...); an #SBATCH directive "
                     f"is one line: remove it")
        elif _HETJOB.search(value):
            p.append(f"{field}={value!r}: sbatch erases the words 'hetjob'/'packjob' on #SBATCH lines; "
                     f"choose a value without them")
    name = job_name(spec)
    if not name.strip():
        p.append("the job name (cluster.job_name or name) is empty; give the run a --name")
    if "/" in name:
        p.append(f"job name {name!r} contains '/': it names the log file (%x); use --name without '/'")
    node_mem = c.mem_per_node if c.mem is None and c.gpus_per_node > 0 and not c.exclusive else None
    for field, mem in (("cluster.mem", c.mem), ("cluster.mem_per_node", node_mem), ("cluster.prep.mem", c.prep.mem)):
        if mem is not None and not _MEM.fullmatch(mem):
            p.append(f"{field}={mem!r} is not Slurm memory syntax; write a number with an optional unit "
                     f"K, M, G or T (e.g. 200G; 0 = all of the node's memory)")
    if c.hf_home is not None and (not c.hf_home.startswith("/") or "\x00" in c.hf_home):
        p.append(f"cluster.hf_home={c.hf_home!r} must be an absolute path (the jobs start in another working "
                 f"directory, and '~' is not expanded in a quoted value); write it as /path/to/hf")
    if c.prep.tasks > 1 and not spec.data.sources:
        p.append(f"cluster.prep.tasks={c.prep.tasks} splits the preparation of a mixture's token shards "
                 f"(data.sources); data.path is prepared by one task: drop cluster.prep.tasks or use data.sources")
    if c.prep.tasks > 1 and array_specs:
        p.append(f"cluster.prep.tasks={c.prep.tasks} with --sweep: the sweep's preparation job is already an array "
                 f"over its tasks; drop cluster.prep.tasks")
    if c.array is not None and not array_specs:
        p.append("cluster.array: a job array here comes from --sweep (each task with its own spec and output "
                 "dir); drop cluster.array or use --sweep key=v1,v2")
    if c.array is not None and array_specs and not _THROTTLE.fullmatch(c.array):
        p.append(f"cluster.array={c.array!r}: with --sweep the task indices are set by the sweep; cluster.array "
                 f"may only limit how many run at once, as %N (e.g. %2)")

    rd = str(run_dir)
    if not run_dir.is_absolute():
        p.append(f"run dir {rd!r} must be an absolute path")
    if _CONTROL.search(rd) or "\\" in rd:
        p.append(f"run dir {rd!r} contains a control character or a backslash, which Slurm's --output "
                 f"cannot name; choose another --out")
    uses_path_python = bool(c.setup or c.container)
    if not uses_path_python and (not python or not Path(python).is_absolute() or _CONTROL.search(python)):
        p.append(f"python interpreter {python!r} must be an absolute path without control characters")
    if c.container is not None:
        ct = c.container
        if not ct.image.strip() or _CONTROL.search(ct.image):
            p.append(f"cluster.container.image={ct.image!r} must be a non-empty image name on one line")
        for i, m in enumerate(ct.mounts):
            if "," in m or _CONTROL.search(m) or not m.strip():
                p.append(f"cluster.container.mounts[{i}]={m!r}: a mount is SRC[:DST[:FLAGS]] without commas "
                         f"(they separate mounts) or control characters")
        if "," in rd or ":" in rd:
            p.append(f"run dir {rd!r} contains ',' or ':', which the container mount list cannot carry; "
                     f"choose another --out")
    for k, v in c.env.items():
        if "\x00" in v:
            p.append(f"cluster.env.{k} contains a NUL byte, which no environment variable can hold")
    for i, line in enumerate(c.setup):
        if "\x00" in line:
            p.append(f"cluster.setup[{i}] contains a NUL byte")
    if array_specs:
        for i, task in enumerate(array_specs):
            if task.cluster != c:
                p.append(f"sweep task {i} changes the cluster section, but a job array shares one set of #SBATCH "
                         f"directives; sweep cluster.* settings with separate `launcher slurm` runs")
                break
    return p


# --------------------------------------------------------------------------- directives

def directives(spec: RunSpec, plan: Plan, run_dir: Path, *, array_tasks: int = 0) -> list[str]:
    """The #SBATCH lines, sorted."""
    c = spec.cluster
    per_node_tasks = 1 if c.launcher == "torchrun" else plan.nproc_per_node
    log = _log_pattern(run_dir, ARRAY_LOG_PATTERN if array_tasks else JOB_LOG_PATTERN)
    opts: dict[str, str | int | None] = {
        "job-name": job_name(spec),
        "nodes": plan.nodes,
        "ntasks-per-node": per_node_tasks,
        "gpus-per-node": c.gpus_per_node or None,
        "cpus-per-task": _cpus_per_task(spec, plan),
        "mem": plan.mem_per_node,
        "time": c.time,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "reservation": c.reservation,
        "output": log,
        "error": log,  # one file per job: stderr interleaved with stdout, in order
        "open-mode": "append",  # a requeued job continues its log instead of truncating it
        "signal": f"B:USR1@{c.signal_grace_s}" if c.signal_grace_s else None,
        "dependency": c.dependency,
        "array": (f"0-{array_tasks - 1}" + (c.array or "")) if array_tasks else None,
        # The job gets the submitting shell's environment (secrets such as HF_TOKEN included, which
        # are never written into the run dir), whatever SBATCH_EXPORT says.
        "export": "ALL",
    }
    lines = [f"#SBATCH --{k}={sbatch_quote(str(v))}" for k, v in opts.items() if v is not None]
    if c.exclusive:
        lines.append("#SBATCH --exclusive")
    lines.append("#SBATCH --requeue" if c.requeue else "#SBATCH --no-requeue")
    return sorted(lines)


def _log_pattern(run_dir: Path, pattern: str) -> str:
    """The --output/--error value: Slurm's file-name pattern in the run dir's logs folder."""
    return f"{slurm_filename(str(RunDir(run_dir).logs))}/{pattern}"


def _cpus_per_task(spec: RunSpec, plan: Plan) -> int | None:
    # The plan's CPUs per rank (cluster.cpus_per_task, or the profile's node shared by the ranks),
    # whichever the launcher: with torchrun one Slurm task per node holds all of the node's ranks, so
    # it asks for that many times as much.
    per_rank = plan.cpus_per_rank
    if per_rank is None:
        return None
    return per_rank * plan.nproc_per_node if spec.cluster.launcher == "torchrun" else per_rank


# --------------------------------------------------------------------------- body

def _plain(name: str) -> Sh:
    if not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{name!r} cannot be spelled plainly in a batch script")
    return Sh(name)


def _run_dir_names(run_dir: Path) -> dict[str, Sh]:
    """The run dir's files and folders the scripts use or name, relative to the run dir (a sweep
    task's dir has the same layout), as the templates write them after "$RUN_DIR/" or "$OUT_DIR/"."""
    rd = RunDir(run_dir)
    paths = {
        "spec": rd.spec_path, "tasks": rd.tasks, "jobs": rd.jobs_path, "job_script": rd.job_script,
        "prep_script": rd.chain_script("prep"), "markers": rd.markers, "rank_logs": rd.rank_logs,
        "base": rd.base, "final": rd.final, "merged": rd.merged, "eval": rd.eval_path,
    }
    return {key: _plain(path.relative_to(rd.path).as_posix()) for key, path in paths.items()}


# The job id and attempt as the job script exports them (LAUNCHER_JOB_ID, LAUNCHER_ATTEMPT): the ranks
# name their markers after these.
_SCRIPT_JOB, _SCRIPT_ATTEMPT = "$LAUNCHER_JOB_ID", "$LAUNCHER_ATTEMPT"


def _marker_names() -> dict[str, Sh]:
    """The ranks' marker names as the job script spells them (rundir/markers.py). `mine` is the part
    every marker of this attempt shares, the script's $MINE; a marker is named by the part before it
    (start, exit, requeue), then $MINE, then for a rank's own marker `rank` and the rank's number, then
    `suffix`. `pattern` and `requeue_name` are the names the script's comments show."""
    mine = markers.attempt_part(_SCRIPT_JOB, _SCRIPT_ATTEMPT)
    out = {"mine": Sh(mine), "rank": _plain(markers.RANK_PART), "suffix": _plain(markers.SUFFIX)}
    for key, kind in (("start", markers.START), ("exit", markers.EXIT), ("requeue", markers.REQUEUE)):
        prefix, found, rest = markers.marker_name(kind, _SCRIPT_JOB, _SCRIPT_ATTEMPT).partition(mine)
        if not found or rest:
            raise ValueError(f"a {kind} marker's name does not end with the attempt's part {mine!r}")
        out[key] = _plain(prefix)
    out["nccl_abort"] = sh(markers.NCCL_WATCHDOG_LINE)
    out["pattern"] = Sh(markers.marker_name("*", "JOB", "ATTEMPT") + "*" + markers.SUFFIX)
    out["requeue_name"] = _plain(markers.marker_name(markers.REQUEUE, "JOB", "ATTEMPT") + markers.SUFFIX)
    return out


def _job_kinds() -> dict[str, Sh]:
    """The kinds of the jobs.jsonl lines the job script appends when it requeues itself (rundir/jobs.py)."""
    return {"requeue": _plain(jobs.REQUEUE), "retry": _plain(jobs.RETRY),
            # the line itself, as printf's format and (inside double quotes) the grep that counts such lines
            "printf": Sh(jobs.script_line_format()),
            "grep": Sh(jobs.script_line_prefix("$SUBMIT_ID", "$1", "$TASK").replace('"', '\\"'))}


def _hub_environment(spec: RunSpec) -> list[tuple[str, str]]:
    """cluster.hf_home: every job reads the shared Hugging Face cache and never the network (compute
    nodes often have none; a hub download on every rank would race)."""
    hf_home = spec.cluster.hf_home
    return [("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")] if hf_home else []


def ds_accelerator(gpus_per_node: int) -> str:
    """DeepSpeed's accelerator for the plan's device, set explicitly (DS_ACCELERATOR): otherwise DeepSpeed
    guesses it in every process and, on CPU ranks, warns "Setting accelerator to CPU" each time."""
    return "cuda" if gpus_per_node > 0 else "cpu"


def _quoted_environment(env: list[tuple[str, str]]) -> list[tuple[Sh, Sh]]:
    out = []
    for name, value in env:
        if not _ENV_NAME.fullmatch(name):  # the spec checks this too; a name is never quoted
            raise SpecError(f"cluster.env: {name!r} is not an environment variable name")
        out.append((Sh(name), sh(value)))
    return out


def _environment(spec: RunSpec, plan: Plan) -> list[tuple[Sh, Sh]]:
    c = spec.cluster
    env: list[tuple[str, str]] = []
    if plan.cpus_per_rank:
        # torchrun sets OMP_NUM_THREADS=1 for several ranks unless it is set: each rank's share of cores
        env.append(("OMP_NUM_THREADS", str(plan.cpus_per_rank)))
    if c.net_ifname:
        # Inside a job every node may resolve its own hostname to 127.0.0.1; the interface decides
        # which address the rendezvous and the collectives use.
        env += [("NCCL_SOCKET_IFNAME", c.net_ifname), ("GLOO_SOCKET_IFNAME", c.net_ifname)]
    if c.gpus_per_node > 0:
        if c.nccl.ib_hca:
            env.append(("NCCL_IB_HCA", c.nccl.ib_hca))
        if c.nccl.debug:
            env.append(("NCCL_DEBUG", c.nccl.debug))
        env.append(("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1" if c.nccl.async_error_handling else "0"))
    env.append(("LAUNCHER_COLLECTIVE_TIMEOUT_S", str(c.nccl.timeout_s)))
    env.append(("DS_ACCELERATOR", ds_accelerator(c.gpus_per_node)))
    env += _hub_environment(spec)
    env += sorted(c.env.items())  # last, so the spec's own values win
    return _quoted_environment(env)


def _container(spec: RunSpec, run_dir: Path, gpu: bool) -> tuple[dict[str, Sh] | None, str, str]:
    """(template values, extra srun arguments, command prefix) for the container runtime; `gpu`:
    the job has GPUs for apptainer to bind (--nv)."""
    ct = spec.cluster.container
    if ct is None:
        return None, "", ""
    # The run dir is mounted at its own path: the ranks read their spec there and write checkpoints.
    mounts = ",".join([f"{run_dir}:{run_dir}", *ct.mounts])
    values = {"image": sh(ct.image), "mounts": sh(mounts)}
    if ct.runtime == "pyxis":
        return values, ' --container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"', ""
    nv = "--nv " if gpu else ""
    return values, "", f'apptainer exec {nv}--bind "$CONTAINER_MOUNTS" "$CONTAINER_IMAGE" '


@functools.lru_cache(maxsize=2)
def _template(name: str = TEMPLATE):  # type: ignore[no-untyped-def]
    import jinja2

    def only_safe(value: object) -> object:
        if isinstance(value, Sh) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise TypeError(f"unquoted value {value!r} reached the batch script template; quote it with sh()")

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(assets.slurm_templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=only_safe,
    )
    return env.get_template(name)


def render_sbatch(
    spec: RunSpec,
    plan: Plan,
    run_dir: Path,
    *,
    python: str,
    array_specs: Sequence[RunSpec] | None = None,
    prepare_step: bool = True,
    entry: Sequence[str] = TRAIN_ENTRY,
) -> str:
    """The batch script for `spec` run from `run_dir` (absolute; the run's spec and logs live there).

    `python` is the interpreter the ranks use when neither set-up lines nor a container provide
    one (the caller passes sys.executable). `array_specs` are the tasks of a sweep: the script
    becomes a job array whose task i trains the spec of the run dir's task i (RunDir.task).
    `prepare_step`: the job prepares the data itself in a first one-task step (`launcher bench
    --slurm`); `launcher slurm` leaves it out and queues the preparation as its own CPU job
    (`render_chain_sbatch`). `entry`: the module and arguments each rank runs with `python -m`, the
    spec's path after them (`launcher bench` runs its measuring entry). Raises SpecError listing every
    value that cannot be rendered safely.
    """
    run_dir = Path(run_dir)
    problems = check(spec, run_dir, python=python, array_specs=array_specs)
    if problems:
        raise SpecError(problems)
    c = spec.cluster
    array_tasks = len(array_specs) if array_specs else 0
    container, container_srun, exec_prefix = _container(spec, run_dir, gpu=c.gpus_per_node > 0)
    cpus = _cpus_per_task(spec, plan)
    # One srun task per rank: a site's default binding (SLURM_GPU_BIND, --gpus-per-task) can leave each
    # task one GPU, while the ranks address cuda:LOCAL_RANK among all of the node's (as torchrun's do).
    gpu_bind = " --gpu-bind=none" if c.launcher == "srun" and c.gpus_per_node > 0 else ""
    srun_args = (f" --cpus-per-task={cpus}" if cpus else "") + container_srun
    python_from_path = bool(c.setup or c.container)
    text = _template().render(
        directives=Sh("\n".join(directives(spec, plan, run_dir, array_tasks=array_tasks))),
        run_dir=sh(str(run_dir)),
        array_tasks=array_tasks,
        python=sh(PATH_PYTHON if python_from_path else python),
        python_from_path=python_from_path,
        container=container,
        nodes=plan.nodes,
        nproc=plan.nproc_per_node,
        setup=Sh("\n".join(c.setup)),  # the spec's own shell code, run as written by design
        env=_environment(spec, plan),
        node_local_extensions=plan.device == "cuda" and plan.compiles_ops,
        launcher=c.launcher,
        srun_args=Sh(srun_args),
        gpu_bind=Sh(gpu_bind),
        exec_prefix=Sh(exec_prefix),
        shutdown_timeout=c.signal_grace_s or DEFAULT_SHUTDOWN_S,
        requeue=c.requeue,
        max_requeues=c.max_requeues,
        max_retries=c.max_retries,
        prepare_step=prepare_step,
        path=_run_dir_names(run_dir),
        marker=_marker_names(),
        job_kind=_job_kinds(),
        entry=Sh(" ".join(shlex.quote(x) for x in entry)),
    )
    return text


# --------------------------------------------------------------------------- the chained one-task jobs

def chain_uses_gpu(spec: RunSpec, kind: str) -> bool:
    """eval runs the model on one GPU when the run has GPUs; prep and merge are CPU work."""
    return kind == "eval" and spec.cluster.gpus_per_node > 0


def prep_tasks(spec: RunSpec) -> int:
    """Tasks of the preparation job array of a mixture (cluster.prep.tasks > 1), else 0 (one job)."""
    return spec.cluster.prep.tasks if spec.data.sources and spec.cluster.prep.tasks > 1 else 0


def chain_directives(spec: RunSpec, kind: str, run_dir: Path) -> list[str]:
    """The #SBATCH lines of a prep/merge/eval job, sorted: one node, one task, cluster.prep's CPUs,
    memory and time; the prep partition unless the job needs a GPU (then the training partition).

    Only the prep job carries cluster.dependency: it is the first job of the chain, and every later
    one waits for it (`--dependency=afterok:<previous job>`, given to sbatch when the chain is
    queued, so that a script resubmitted by hand does not wait for a job Slurm has forgotten).
    """
    c = spec.cluster
    gpu = chain_uses_gpu(spec, kind)
    partition = c.partition if gpu else (c.prep.partition or c.partition)
    # constraint and reservation name nodes of the training partition; they mean nothing elsewhere
    same_nodes = partition == c.partition
    tasks = prep_tasks(spec) if kind == "prep" else 0
    log = _log_pattern(run_dir, ARRAY_LOG_PATTERN if tasks else JOB_LOG_PATTERN)
    opts: dict[str, str | int | None] = {
        "job-name": f"{job_name(spec)}-{kind}",
        "array": f"0-{tasks - 1}" if tasks else None,
        "nodes": 1,
        "ntasks": 1,
        "cpus-per-task": c.prep.cpus,
        "gpus-per-node": 1 if gpu else None,
        "mem": c.prep.mem,
        "time": c.prep.time,
        "partition": partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint if same_nodes else None,
        "reservation": c.reservation if same_nodes else None,
        "output": log,
        "error": log,
        "open-mode": "append",
        "dependency": c.dependency if kind == "prep" else None,
        "export": "ALL",
    }
    lines = [f"#SBATCH --{k}={sbatch_quote(str(v))}" for k, v in opts.items() if v is not None]
    # each job is idempotent (a cache hit, a merge with --force, eval's results rewritten): safe to run
    # again
    lines.append("#SBATCH --requeue" if c.requeue else "#SBATCH --no-requeue")
    return sorted(lines)


def render_chain_sbatch(
    spec: RunSpec,
    kind: str,
    run_dir: Path,
    *,
    python: str,
    array_specs: Sequence[RunSpec] | None = None,
) -> str:
    """The batch script of one job chained around training (RunDir.chain_script(kind)):

    - prep: `launcher prepare` on the run's spec (each sweep task's spec for a job array): tokenizes
      into the cache the ranks read, and makes the tiny model's RunDir.base;
    - merge: `launcher merge RUN_DIR --out` RunDir.merged `--force`;
    - eval: `launcher eval RUN_DIR` (results in RunDir.eval_path).

    Same interpreter, set-up lines, container, account and environment as the training job.
    """
    if kind not in CHAIN_KINDS:
        raise ValueError(f"chain job kind {kind!r}: one of {', '.join(CHAIN_KINDS)}")
    run_dir = Path(run_dir)
    problems = check(spec, run_dir, python=python, array_specs=array_specs)
    if problems:
        raise SpecError(problems)
    c = spec.cluster
    container, container_srun, exec_prefix = _container(spec, run_dir, gpu=chain_uses_gpu(spec, kind))
    python_from_path = bool(c.setup or c.container)
    return _template(CHAIN_TEMPLATE).render(
        directives=Sh("\n".join(chain_directives(spec, kind, run_dir))),
        kind=Sh(kind),
        run_dir=sh(str(run_dir)),
        path=_run_dir_names(run_dir),
        array_tasks=len(array_specs) if array_specs else 0,
        shards=bool(spec.data.sources),
        prep_tasks=prep_tasks(spec),
        prep_retries=c.prep.retries,
        python=sh(PATH_PYTHON if python_from_path else python),
        python_from_path=python_from_path,
        container=container,
        setup=Sh("\n".join(c.setup)),
        env=_quoted_environment([("DS_ACCELERATOR", ds_accelerator(1 if chain_uses_gpu(spec, kind) else 0))]
                                + _hub_environment(spec) + sorted(c.env.items())),
        srun_args=Sh(f" --cpus-per-task={c.prep.cpus}" + container_srun),
        exec_prefix=Sh(exec_prefix),
    )
