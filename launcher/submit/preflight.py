"""Pre-flight: what would make a run fail after it started, caught before any rank starts (`launcher run`)
and before anything is queued (`launcher slurm`). No torch: config.json, a sample of the data and the
torch-free estimator only, so a mistyped run costs seconds instead of a place in the queue.

Every problem found is reported at once, in one PreflightError (exit 2), one line each naming the field
or file and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from launcher import requirements
from launcher.config import profiles
from launcher.config.spec import TRACKER_EXTRA, RunSpec
from launcher.data.check import check_data
from launcher.errors import SpecError, UserError
from launcher.model.load import WEIGHT_FILES, has_weights
from launcher.plan import hardware
from launcher.plan.estimate import GiB, estimate
from launcher.plan.params import lora_params
from launcher.plan.plan import Plan, liger_importable, make_plan, unsupported_precision
from launcher.rundir import checkpoints
from launcher.rundir.layout import RunDir
from launcher.submit.stage import check_cached


class PreflightError(UserError):
    """Every problem pre-flight found, one line each (exit 2); `field` is the first one's."""

    def __init__(self, errors: list[UserError]):
        self.problems = [str(e) for e in errors]
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"pre-flight found {len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems),
                         field=errors[0].field)


def check(spec: RunSpec, *, slurm: bool = False, ignore_fit: bool = False, device: str | None = None,
          device_memory: int | None = None) -> list[str]:
    """Raise PreflightError with every problem found; return notes on what could not be checked here.

    `slurm`: the run goes through the batch script (its time limit and warning signal are checked).
    `device`/`device_memory`: what each rank's GPU is (for the fit check); for `launcher slurm` the
    cluster profile's gpu_type is used when neither is given. CPU runs skip the fit check."""
    problems: list[UserError] = []
    notes: list[str] = []

    def gather(found: list[UserError]) -> None:
        problems.extend(e for e in found if str(e) not in map(str, problems))

    def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            gather([UserError(p) for p in exc.problems])
        except UserError as exc:
            gather([exc])
        return None

    # batch arithmetic, model config exists, seq_len within its positions; the checks that need the
    # plan are skipped when there is none
    plan = attempt(make_plan, spec)
    refusal = unsupported_precision(spec, plan) if plan is not None else None
    if refusal:
        gather([UserError(refusal, field="precision.dtype")])
    gather(_clashes(spec, plan, slurm=slurm))
    c = spec.cluster
    if c.hang_timeout_s and c.hang_timeout_s + 60 >= c.nccl.timeout_s:
        notes.append(f"cluster.hang_timeout_s={c.hang_timeout_s} (+60 s grace) is not below cluster.nccl.timeout_s="
                     f"{c.nccl.timeout_s}: the collective timeout fires first, ending the ranks blocked in a collective "
                     f"before the watchdog names the stuck rank; keep hang_timeout_s at least 60 s below it")
    if not _ranks_use_this_python(spec):
        notes.append("package versions not checked: cluster.setup or cluster.container brings the ranks' Python; "
                     "`launcher doctor --cluster NAME` checks them on the nodes")
    if plan is not None:
        notes += attempt(_model, spec, plan) or []
    attempt(check_cached, spec)  # a hub model is in cluster.hf_home when the jobs run offline from it
    attempt(_resume, spec)
    attempt(check_data, spec)  # exists, not empty, parses, fields present (with line numbers)
    if plan is not None:
        notes += attempt(_fit, spec, plan, ignore_fit=ignore_fit, device=device, device_memory=device_memory) or []
    if problems:
        raise PreflightError(problems)
    return notes


def _clashes(spec: RunSpec, plan: Plan | None, *, slurm: bool) -> list[UserError]:
    c = spec.cluster
    p: list[UserError] = []
    if plan is not None and plan.device == "cpu" and spec.model.attn == "flash2":
        p.append(UserError("model.attn=flash2 needs CUDA GPUs and this run has CPU ranks (cluster.gpus_per_node=0); "
                           "use --attn sdpa (or auto)", field="model.attn"))
    if plan is not None and plan.loss == "liger" and not liger_importable():
        p.append(UserError("optim.loss=liger needs the liger-kernel package, which this Python cannot import; "
                           "pip install 'launcher[gpu]' (or liger-kernel) where the ranks run, or use --loss chunked "
                           "(the same memory saving in plain PyTorch)", field="optim.loss"))
    if plan is not None and plan.device == "cuda" and spec.model.attn == "flash2" and _ranks_use_this_python(spec):
        error = _flash_attn_import_error()
        if error:
            p.append(UserError(f"model.attn=flash2: {error}; reinstall flash-attn against this torch (pip install "
                               f"--force-reinstall --no-build-isolation flash-attn) or use --attn sdpa (or auto, "
                               f"which falls back to sdpa)", field="model.attn"))
    if _ranks_use_this_python(spec):
        p += [UserError(line, field="dependencies") for line in requirements.version_problems(
            requirements.installed_versions())]
    p += _trackers(spec)
    if c.max_retries > 0 and not c.requeue:
        p.append(UserError(f"cluster.max_retries={c.max_retries} retries a failed job by requeueing it, but "
                           f"cluster.requeue is false; set cluster.requeue=true or cluster.max_retries=0",
                           field="cluster.max_retries"))
    if slurm and c.signal_grace_s and c.signal_grace_s >= c.time_seconds():
        p.append(UserError(f"cluster.signal_grace_s={c.signal_grace_s} is not below the time limit "
                           f"cluster.time={c.time} ({c.time_seconds()} s): the warning to save would come before "
                           f"the job starts; lower --set cluster.signal_grace_s or raise --time",
                           field="cluster.signal_grace_s"))
    return p


def _ranks_use_this_python(spec: RunSpec) -> bool:
    """The ranks run the Python that renders the run (no set-up lines or container bring another)."""
    return not spec.cluster.setup and spec.cluster.container is None


def _flash_attn_import_error() -> str | None:
    """Whether flash_attn imports in this Python, tried in a child process (it imports torch, which
    pre-flight never does): None, or what stops it (not installed, or the import's own error line)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed where the ranks run (pip install flash-attn --no-build-isolation)"
    proc = subprocess.run([sys.executable, "-c", "import flash_attn"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return "flash_attn is installed but does not import: " + (lines[-1].strip()[:300] if lines else f"exit {proc.returncode}")


def _trackers(spec: RunSpec) -> list[UserError]:
    """The trackers' packages are importable here (the ranks run this Python), and MLflow has somewhere to log."""
    p: list[UserError] = []
    for name in spec.output.active_trackers():
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            p.append(UserError(f"output.trackers lists {name}, which this Python cannot import; {TRACKER_EXTRA} "
                               f"where the ranks run, or drop {name} from output.trackers", field="output.trackers"))
    if "mlflow" in spec.output.active_trackers() and not spec.output.mlflow.tracking_uri \
            and not os.environ.get("MLFLOW_TRACKING_URI"):
        p.append(UserError("output.trackers lists mlflow but no tracking server is given: set "
                           "output.mlflow.tracking_uri (or mlflow_tracking_uri in the cluster profile, or export "
                           "MLFLOW_TRACKING_URI)", field="output.mlflow.tracking_uri"))
    return p


def _model(spec: RunSpec, plan: Plan) -> list[str]:
    name = spec.model.name
    if name != "tiny" and Path(name).expanduser().is_dir():
        d = Path(name).expanduser()
        if not has_weights(d):
            raise UserError(f"model.name={name!r}: {d} has a config.json but no weights ({', '.join(WEIGHT_FILES)}); "
                            f"point --model at the folder save_pretrained wrote", field="model.name")
    m = plan.model
    if m is None:
        return [f"model.name={name!r} is a hub id: its config and LoRA targets are checked when the ranks load it"]
    if spec.method.name in ("lora", "qlora", "dora") and spec.method.lora.target_modules != "all-linear":
        if m.counted:
            lora_params(m, spec)  # UserError naming method.lora.target_modules and the layers that exist
        else:
            return [f"method.lora.target_modules: a {m.model_type} model's layer names are not known without loading "
                    f"it; peft checks them when the ranks start"]
    return []


def _resume(spec: RunSpec) -> None:
    checkpoints.resume_point(spec.output.resume, RunDir(Path(spec.output.dir)).checkpoints)


def profile_device(spec: RunSpec) -> str | None:
    """The hardware table's key for the cluster profile's GPU type, when the profile names one it knows."""
    name = spec.cluster.profile
    if not name:
        return None
    try:
        _, part = profiles.load(name).partition(spec.cluster.partition)
    except UserError:
        return None
    dev = hardware.find(part.gpu_type) if part is not None else None
    return dev.key if dev is not None else None


def _fit(spec: RunSpec, plan: Plan, *, ignore_fit: bool, device: str | None, device_memory: int | None) -> list[str]:
    if plan.device == "cpu" or plan.model is None:
        return []
    device = device or (profile_device(spec) if device_memory is None else None)
    if device is None and device_memory is None:
        return ["memory fit not checked: the GPU type is unknown here (give the cluster profile a gpu_type)"]
    e = estimate(spec, plan, device=device, device_memory=device_memory)
    if e.fits is False and not ignore_fit:
        raise UserError(
            f"the run does not fit: about {e.peak_bytes_per_gpu / GiB:.1f} GiB per GPU (weights, gradients, optimizer "
            f"states, activations) against {e.device_memory_bytes / GiB:.1f} GiB on {device or 'this GPU'} "
            f"(`launcher estimate` shows the parts). Lower optim.micro_batch (--micro-batch), turn on --grad-ckpt, "
            f"raise --zero or offload (--offload-optimizer cpu), or pass --ignore-fit to try anyway",
            field="optim.micro_batch")
    if e.fits is False:
        return [f"--ignore-fit: the estimate ({e.peak_bytes_per_gpu / GiB:.1f} GiB per GPU) exceeds "
                f"{e.device_memory_bytes / GiB:.1f} GiB; trying anyway"]
    return []
