"""Memory, step time and cost of a setup before a GPU is spent: from config.json alone, no torch.
The bytes are plan/memory.py's, for the plan's choices (ZeRO stage, precision, loss)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from launcher import hubcache
from launcher.config.resolve import with_overrides
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan import memory
from launcher.plan.hardware import DEVICES, find, peak_tflops
from launcher.plan.modelinfo import ModelInfo
from launcher.plan.params import Params, count_params
from launcher.plan.plan import Plan, make_plan
from launcher.plan.price import usd_per_mtok_at
from launcher.plan.price import usd_per_device_hour as usd_per_device_hour_of

GiB = 1024**3
DEFAULT_MFU = 0.40  # a typical achieved model-FLOPs utilisation for dense LLM training on one node


@dataclass
class Estimate:
    params: int
    trainable_params: int
    world_size: int
    device: str | None
    weights_bytes_per_gpu: int
    gradients_bytes_per_gpu: int
    optimizer_bytes_per_gpu: int
    gathered_params_bytes_per_gpu: int  # ZeRO-3: the largest layer gathered (DeepSpeed's 4 x largest layer)
    model_states_bytes_per_gpu: int
    activation_bytes_per_gpu: int
    activation_bytes_per_layer: int
    logits_bytes_per_gpu: int
    buffer_bytes_per_gpu: int
    peak_bytes_per_gpu: int
    cpu_offload_bytes_per_node: int
    device_memory_bytes: int | None
    fits: bool | None
    model_flops_per_token: float
    hardware_flops_per_token: float
    assumed_mfu: float
    step_time_s: float | None
    tokens_per_s: float | None
    usd_per_device_hour: float | None
    usd_per_mtok: float | None
    train_tokens: int | None
    train_time_h: float | None
    train_usd: float | None
    zero_stage: int = 0  # the plan's choices the bytes are for
    precision: str = "fp32"
    loss: str = "standard"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flops_per_token(m: ModelInfo, spec: RunSpec, p: Params, seq: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token. Attention: 12 x layers x d x seq, halved
    for causal masking. Frozen weights need no weight gradients: 4 instead of 6 FLOPs per weight."""
    attn = 12 * m.num_layers * m.num_heads * m.head_dim * seq / 2
    frozen = p.matmul - p.matmul_trainable
    model = 6 * p.matmul_trainable + 4 * frozen + attn
    hardware = model
    if spec.model.grad_ckpt:
        hardware += 2 * p.matmul + attn / 3  # the forward pass again
    return model, hardware


def estimate(spec: RunSpec, plan: Plan, *, device: str | None = None, device_memory: int | None = None,
             usd_per_device_hour: float | None = None, train_tokens: int | None = None,
             mfu: float = DEFAULT_MFU, micro_batch: int | None = None) -> Estimate:
    m = plan.model
    if m is None:
        raise UserError(f"model.name {spec.model.name!r}: the estimator reads the model's config.json; give a local "
                        f"model directory (a hub id is not read without a hub): it is neither in the hub cache "
                        f"({hubcache.hf_home(spec)[0]}; `launcher stage` fills it) nor in launcher's table of known "
                        f"models", field="model.name")
    p = count_params(m, spec)
    micro = micro_batch or plan.micro_batch
    pk = memory.peak(m, spec, plan.setup(), p, micro, plan.seq_len)
    states, saved, logits = pk.states, pk.saved, pk.logits
    model_states_total, transient, peak = pk.model_states, pk.transient, pk.total
    dev = find(device)
    if device and dev is None:
        raise UserError(f"--gpu {device!r} is not in the table ({', '.join(DEVICES)}); give --device-memory and "
                        f"--device-tflops instead")
    mem = device_memory or (dev.memory_bytes if dev else None)
    model_f, hw_f = flops_per_token(m, spec, p, plan.seq_len)
    notes = []
    step = tps = None
    if dev is not None:
        peak_flops = peak_tflops(dev, plan.precision) * 1e12
        tps = plan.world_size * peak_flops * mfu / model_f
        step = plan.tokens_per_step / tps
        if spec.zero.offload_optimizer != "none" or spec.zero.offload_param != "none":
            notes.append("offload traffic is not modelled: expect a slower step than this")
    usd = usd_per_mtok_at(usd_per_device_hour, plan.world_size, tps)
    train_h = train_usd = None
    if train_tokens and tps:
        train_h = train_tokens / tps / 3600
        if usd_per_device_hour is not None:
            train_usd = train_h * usd_per_device_hour * plan.world_size
    if states.get("reference"):
        notes.append(f"the in-memory reference copy holds {states['reference'] / 2**30:.2f} GiB per GPU (in the model "
                     f"states) and costs one more forward per token; pref.reference=precomputed holds none")
    if plan.sequences > 1:
        notes.append(f"task {spec.task}: {plan.sequences} sequences per example (chosen and rejected), all counted "
                     f"in tokens, tokens/s and $ per 1M tokens")
    if plan.precision == "fp32" or spec.method.name != "full":
        notes.append("DeepSpeed's estimators cover mixed-precision full fine-tuning only; "
                     "this setup is counted from tensor shapes")
    return Estimate(
        params=p.total, trainable_params=p.trainable, world_size=plan.world_size,
        device=dev.key if dev else None,
        weights_bytes_per_gpu=states["weights"], gradients_bytes_per_gpu=states["gradients"],
        optimizer_bytes_per_gpu=states["optimizer"], gathered_params_bytes_per_gpu=states["gathered"],
        model_states_bytes_per_gpu=model_states_total, activation_bytes_per_gpu=saved + transient,
        activation_bytes_per_layer=pk.per_layer, logits_bytes_per_gpu=logits, buffer_bytes_per_gpu=pk.buffers,
        peak_bytes_per_gpu=peak, cpu_offload_bytes_per_node=states["cpu_per_node"], device_memory_bytes=mem,
        fits=None if mem is None else peak <= mem, model_flops_per_token=model_f, hardware_flops_per_token=hw_f,
        assumed_mfu=mfu, step_time_s=step, tokens_per_s=tps, usd_per_device_hour=usd_per_device_hour,
        usd_per_mtok=usd, train_tokens=train_tokens, train_time_h=train_h, train_usd=train_usd,
        zero_stage=plan.zero_stage, precision=plan.precision, loss=plan.loss, notes=notes)


def fit_micro_batch(spec: RunSpec, plan: Plan, memory: int, **kw: Any) -> int | None:
    """The largest micro batch whose peak fits `memory` (and divides the global batch per rank)."""
    per_rank = plan.global_batch // plan.world_size if spec.optim.global_batch or spec.optim.global_batch_tokens else None
    best = None
    for mb in range(1, 1025):
        if per_rank is not None and per_rank % mb:
            continue
        if estimate(spec, plan, micro_batch=mb, **kw).peak_bytes_per_gpu > memory:
            break
        best = mb
    return best


def estimate_run(spec: RunSpec, *, gpu: str | None = None, device_memory: int | None = None,
                 usd_per_device_hour: float | None = None, train_tokens: int | None = None,
                 mfu: float | None = None, fit: bool = False) -> tuple[Plan, Estimate]:
    """What `launcher estimate` reports: the device (H100-80GB assumed for a GPU spec without one), the
    price (the cluster section's when none is given) and, with `fit`, the largest micro batch that fits
    the device, planned again with it. The notes say what was assumed or chosen."""
    plan = make_plan(spec)
    notes = []
    if gpu is None and spec.cluster.gpus_per_node > 0:
        gpu = "H100-80GB"
        notes.append("device assumed H100-80GB; pass --gpu")
    if usd_per_device_hour is None:
        usd_per_device_hour = usd_per_device_hour_of(spec.cluster)
    kw: dict[str, Any] = dict(device=gpu, device_memory=device_memory, usd_per_device_hour=usd_per_device_hour,
                              train_tokens=train_tokens, mfu=mfu or DEFAULT_MFU)
    if fit:
        probe = estimate(spec, plan, **kw)
        if probe.device_memory_bytes is None:
            raise UserError("--fit needs a device memory: pass --gpu NAME or --device-memory SIZE")
        best = fit_micro_batch(spec, plan, probe.device_memory_bytes, **kw)
        if best is None:
            raise UserError(f"no micro batch fits {gib(probe.device_memory_bytes)}: even 1 needs "
                            f"{gib(estimate(spec, plan, micro_batch=1, **kw).peak_bytes_per_gpu)}; "
                            f"raise --zero, add --offload-optimizer cpu, --grad-ckpt or more GPUs")
        spec = with_overrides(spec, {"optim": {"micro_batch": best}})
        plan = make_plan(spec)
        notes.append(f"--fit: micro batch {best}")
    e = estimate(spec, plan, **kw)
    e.notes[:0] = notes
    return plan, e


def gib(n: int | None) -> str:
    """Bytes as GiB for a person (two decimals), "-" for unknown."""
    return "-" if n is None else f"{n / 2**30:,.2f} GiB"
