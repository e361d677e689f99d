"""Pre-flight: what would make a run fail after it started, caught before any rank starts (`launcher run`)
and before anything is queued (`launcher slurm`). No torch: config.json, a sample of the data and the
torch-free estimator only, so a mistyped run costs seconds instead of a place in the queue.

Each failure is one UserError (exit 2) naming the field or file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.plan.plan import Plan, make_plan
from launcher.config.spec import RunSpec

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# cluster profiles' gpu_type -> the estimator's device table (only unambiguous names)
_GPU_TYPES = {"h100": "H100-80GB", "h100-80gb": "H100-80GB", "h200": "H200", "a100-80gb": "A100-80GB",
              "a100-40gb": "A100-40GB", "l40s": "L40S", "a10g": "A10G", "l4": "L4"}


def check(spec: RunSpec, *, slurm: bool = False, ignore_fit: bool = False, device: str | None = None,
          device_memory: int | None = None) -> list[str]:
    """Raise UserError on the first problem; return notes on what could not be checked here.

    `slurm`: the run goes through the batch script (its time limit and warning signal are checked).
    `device`/`device_memory`: what each rank's GPU is (for the fit check); for `launcher slurm` the
    cluster profile's gpu_type is used when neither is given. CPU runs skip the fit check."""
    notes: list[str] = []
    plan = make_plan(spec)  # batch arithmetic, model config exists, seq_len within its positions
    _clashes(spec, plan, slurm=slurm)
    notes += _model(spec, plan)
    from launcher.submit.stage import check_cached  # stdlib only

    check_cached(spec)  # a hub model is in cluster.hf_home when the jobs run offline from it
    _resume(spec)
    from launcher.data.build import check_data  # stdlib only

    check_data(spec)  # exists, not empty, parses, fields present (with line numbers)
    notes += _fit(spec, plan, ignore_fit=ignore_fit, device=device, device_memory=device_memory)
    return notes


def _clashes(spec: RunSpec, plan: Plan, *, slurm: bool) -> None:
    c = spec.cluster
    if plan.device == "cpu" and spec.precision.dtype == "fp16":
        raise UserError("precision.dtype=fp16 does not run on CPU ranks (cluster.gpus_per_node=0: DeepSpeed has no "
                        "CPU fp16 kernels); use --precision fp32 or bf16, or --gpus-per-node N", field="precision.dtype")
    if plan.device == "cpu" and spec.model.attn == "flash2":
        raise UserError("model.attn=flash2 needs CUDA GPUs and this run has CPU ranks (cluster.gpus_per_node=0); "
                        "use --attn sdpa (or auto)", field="model.attn")
    if c.max_retries > 0 and not c.requeue:
        raise UserError(f"cluster.max_retries={c.max_retries} retries a failed job by requeueing it, but "
                        f"cluster.requeue is false; set cluster.requeue=true or cluster.max_retries=0",
                        field="cluster.max_retries")
    if slurm and c.signal_grace_s and c.signal_grace_s >= c.time_seconds():
        raise UserError(f"cluster.signal_grace_s={c.signal_grace_s} is not below the time limit cluster.time={c.time} "
                        f"({c.time_seconds()} s): the warning to save would come before the job starts; lower "
                        f"--set cluster.signal_grace_s or raise --time", field="cluster.signal_grace_s")


def _model(spec: RunSpec, plan: Plan) -> list[str]:
    name = spec.model.name
    if name != "tiny" and Path(name).expanduser().is_dir():
        d = Path(name).expanduser()
        if not any((d / w).is_file() for w in _WEIGHTS):
            raise UserError(f"model.name={name!r}: {d} has a config.json but no weights ({', '.join(_WEIGHTS[::2])}); "
                            f"point --model at the folder save_pretrained wrote", field="model.name")
    m = plan.model
    if m is None:
        return [f"model.name={name!r} is a hub id: its config and LoRA targets are checked when the ranks load it"]
    if spec.method.name in ("lora", "qlora", "dora") and spec.method.lora.target_modules != "all-linear":
        if m.counted:
            from launcher.plan.estimate import lora_params

            lora_params(m, spec)  # UserError naming method.lora.target_modules and the layers that exist
        else:
            return [f"method.lora.target_modules: a {m.model_type} model's layer names are not known without loading "
                    f"it; peft checks them when the ranks start"]
    return []


def _resume(spec: RunSpec) -> None:
    value = spec.output.resume
    if value in ("auto", "never"):
        return
    from launcher.rank.resilience import is_complete

    p = Path(value).expanduser()
    if not p.is_dir() or not is_complete(p):
        raise UserError(f"output.resume={value!r} is not a complete checkpoint (a checkpoint-N folder with its "
                        f"completion marker); give one, or 'auto' (the newest complete one in the run dir) or 'never'",
                        field="output.resume")


def profile_device(spec: RunSpec) -> str | None:
    """The estimator's device for the cluster profile's GPU type, when the profile names one it knows."""
    name = spec.cluster.profile
    if not name:
        return None
    from launcher.config import profiles

    try:
        _, part = profiles.load(name).partition(spec.cluster.partition)
    except UserError:
        return None
    gpu = (part.gpu_type or "").lower() if part is not None else ""
    return _GPU_TYPES.get(gpu)


def _fit(spec: RunSpec, plan: Plan, *, ignore_fit: bool, device: str | None, device_memory: int | None) -> list[str]:
    if plan.device == "cpu" or plan.model is None:
        return []
    device = device or (profile_device(spec) if device_memory is None else None)
    if device is None and device_memory is None:
        return ["memory fit not checked: the GPU type is unknown here (give the cluster profile a gpu_type)"]
    from launcher.plan.estimate import GiB, estimate

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
