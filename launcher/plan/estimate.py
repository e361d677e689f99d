"""Memory, step time and cost of a setup before a GPU is spent: from config.json alone, no torch.

Model states follow DeepSpeed's own ZeRO estimators where they apply (mixed-precision Adam, full
fine-tuning): ZeRO-2 = 2P + 18P/N, ZeRO-3 = 4 x largest layer + 18P/N, offload moving the sharded
part off the GPU. The rest (LoRA, QLoRA, fp32, activations, buffers, logits) is counted here from
the shapes of the tensors the forward pass saves for backward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.config.resolve import with_overrides
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan.hardware import DEVICES, find, peak_tflops
from launcher.plan.modelinfo import ModelInfo
from launcher.plan.params import Params, count_params, lora_params
from launcher.plan.plan import Plan, make_plan
from launcher.plan.price import usd_per_mtok_at
from launcher.plan.price import usd_per_device_hour as usd_per_device_hour_of

GiB = 1024**3
DEFAULT_MFU = 0.40  # a typical achieved model-FLOPs utilisation for dense LLM training on one node


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_states(spec: RunSpec, plan: Plan, p: Params) -> dict[str, int]:
    """Bytes per GPU of weights, gradients and optimizer states, and per node offloaded to CPU.

    Mixed precision per trainable parameter, as DeepSpeed counts it: 2 (16-bit weights) + 2 (16-bit
    grads) + 4 (fp32 grads) + 4 (fp32 master) + 8 (Adam m, v). Stage 1 shards the fp32 parts,
    stage 2 also the 16-bit grads, stage 3 everything (its 16-bit grads go straight into fp32
    partitions) plus 4 x the largest layer gathered. fp32 training has no 16-bit grads; ZeRO 1-3 still
    keep a separate fp32 master partition.
    """
    z, n, stage = spec.zero, plan.world_size, spec.zero.stage
    a, t = _dtype_bytes(spec.precision.dtype), p.trainable
    frozen = p.frozen_dense * a + p.frozen_quantized * quantized_bytes_per_param(spec)
    weights = (frozen + t * a) / (n if stage == 3 else 1)
    if spec.precision.dtype == "fp32":
        # ZeRO 1-3 keep their own flat fp32 master partition even for an fp32 model (measured on
        # CPU: without it the estimate was 15-20% low); ZeRO-0 steps the model's tensors directly.
        gradients = 4 * t / (n if stage >= 2 else 1)
        optimizer = (12 if stage >= 1 else 8) * t / (n if stage >= 1 else 1)
    else:
        grads16 = 0 if stage == 3 else 2 * t / (n if stage == 2 else 1)
        gradients = grads16 + 4 * t / (n if stage >= 1 else 1)
        optimizer = 12 * t / (n if stage >= 1 else 1)
    gathered = 4 * p.largest_layer if stage == 3 else 0
    offloaded = 0.0
    if z.offload_optimizer != "none":  # gradients stream to the CPU optimizer as they are reduced
        offloaded += gradients + optimizer
        gradients = optimizer = 0
    if z.offload_param != "none":
        offloaded += weights
        weights = 0
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "gathered": int(gathered), "cpu_per_node": int(offloaded * plan.nproc_per_node)}


def quantized_bytes_per_param(spec: RunSpec) -> float:
    # 4-bit values + one absmax per block of 64: fp32 (4 B / 64), or with double quantization an
    # 8-bit absmax (1 B / 64) plus an fp32 constant per 256 blocks.
    q = spec.method.quant
    return 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)


def activation_bytes(m: ModelInfo, spec: RunSpec, micro: int, seq: int) -> tuple[int, int, int, int]:
    """(saved activations, one layer's, logits peak, recompute peak) in bytes for one micro batch."""
    a = _dtype_bytes(spec.precision.dtype)
    tokens = micro * seq
    h, i = m.hidden_size, m.intermediate_size
    qd, kvd = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    norm = (4 + a) * h if a == 2 else 2 * a * h  # RMSNorm computes in fp32: saves an fp32 copy + its output
    attn = a * (qd + 2 * kvd + qd + qd)  # rotated q, k, v; attention output; o_proj's contiguous input
    mlp = 4 * a * i  # gate out, SiLU out, up out, their product
    per_token = 2 * norm + attn + mlp
    if spec.method.name in ("lora", "qlora", "dora") and spec.method.lora.dropout > 0:
        _, targets = lora_params(m, spec)
        ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": qd, "gate_proj": h, "up_proj": h, "down_proj": i}
        per_token += sum((a + 1) * ins[t] for t in targets)  # dropout output + its mask, per adapted linear
    attn_impl = spec.model.attn
    per_layer = tokens * per_token
    if attn_impl == "eager":
        per_layer += (4 + a) * micro * m.num_heads * seq * seq  # softmax in fp32 + its cast, kept for backward
    logits = micro * seq * m.vocab_size * (a + 4 + 4)  # logits, fp32 log-softmax, fp32 grad
    if spec.model.grad_ckpt:
        saved = m.num_layers * tokens * a * h  # each layer's input only
        recompute = per_layer
    else:
        saved = m.num_layers * per_layer
        recompute = 0
    saved += tokens * (a * h + norm)  # embedding output, final norm
    return int(saved), int(per_layer), int(logits), int(recompute)


def buffer_bytes(spec: RunSpec, plan: Plan) -> int:
    """ZeRO's communication buffers, 2 bytes per element of the plan's bucket sizes."""
    stage, b = spec.zero.stage, plan.zero_buckets
    if stage == 0:
        return 0
    if stage in (1, 2):
        # DeepSpeed's docs: overlap_comm uses 4.5x the bucket sizes (2 bytes per element each).
        factor = 4.5 if spec.zero.overlap_comm else 1.0
        return int(2 * factor * (b.reduce + b.allgather))
    return int(2 * (b.reduce + b.prefetch))


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
                        f"model directory (a hub id is not read without a hub)", field="model.name")
    p = count_params(m, spec)
    micro = micro_batch or plan.micro_batch
    states = model_states(spec, plan, p)
    saved, per_layer, logits, recompute = activation_bytes(m, spec, micro, plan.seq_len)
    buffers = buffer_bytes(spec, plan)
    model_states_total = states["weights"] + states["gradients"] + states["optimizer"] + states["gathered"]
    transient = max(logits, recompute)  # the loss's tensors and a recomputed layer do not coexist
    peak = model_states_total + buffers + saved + transient
    dev = find(device)
    if device and dev is None:
        raise UserError(f"--gpu {device!r} is not in the table ({', '.join(DEVICES)}); give --device-memory and "
                        f"--device-tflops instead")
    mem = device_memory or (dev.memory_bytes if dev else None)
    model_f, hw_f = flops_per_token(m, spec, p, plan.seq_len)
    notes = []
    step = tps = None
    if dev is not None:
        peak_flops = peak_tflops(dev, spec.precision.dtype) * 1e12
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
    if spec.precision.dtype == "fp32" or spec.method.name != "full":
        notes.append("DeepSpeed's estimators cover mixed-precision full fine-tuning only; "
                     "this setup is counted from tensor shapes")
    return Estimate(
        params=p.total, trainable_params=p.trainable, world_size=plan.world_size,
        device=dev.key if dev else None,
        weights_bytes_per_gpu=states["weights"], gradients_bytes_per_gpu=states["gradients"],
        optimizer_bytes_per_gpu=states["optimizer"], gathered_params_bytes_per_gpu=states["gathered"],
        model_states_bytes_per_gpu=model_states_total, activation_bytes_per_gpu=saved + transient,
        activation_bytes_per_layer=per_layer, logits_bytes_per_gpu=logits, buffer_bytes_per_gpu=buffers,
        peak_bytes_per_gpu=peak, cpu_offload_bytes_per_node=states["cpu_per_node"], device_memory_bytes=mem,
        fits=None if mem is None else peak <= mem, model_flops_per_token=model_f, hardware_flops_per_token=hw_f,
        assumed_mfu=mfu, step_time_s=step, tokens_per_s=tps, usd_per_device_hour=usd_per_device_hour,
        usd_per_mtok=usd, train_tokens=train_tokens, train_time_h=train_h, train_usd=train_usd, notes=notes)


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
