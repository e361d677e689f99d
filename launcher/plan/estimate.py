"""Memory, step time and cost of a setup before a GPU is spent: from config.json alone, no torch.

Model states follow DeepSpeed's own ZeRO estimators where they apply (mixed-precision Adam, full
fine-tuning): ZeRO-2 = 2P + 18P/N, ZeRO-3 = 4 x largest layer + 18P/N, offload moving the sharded
part off the GPU. The rest (LoRA, QLoRA, fp32, activations, buffers, logits) is counted here from
the shapes of the tensors the forward pass saves for backward.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.errors import UserError
from launcher.plan.modelinfo import ModelInfo
from launcher.plan.plan import Plan
from launcher.config.spec import RunSpec

GiB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    tflops_16bit: float  # dense bf16/fp16 tensor-core peak
    tflops_32bit: float  # dense fp32 (TF32 where the library uses it)


# Dense peaks from the vendors' data sheets; memory as torch reports total_memory.
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("H100-80GB", 85_029_158_912, 989.4, 494.7),
    Device("H200", 150_110_011_392, 989.4, 494.7),
    Device("A100-80GB", 85_089_976_320, 312.0, 156.0),
    Device("A100-40GB", 42_505_273_344, 312.0, 156.0),
    Device("L40S", 47_697_362_944, 362.1, 183.0),
    Device("A10G", 23_677_698_048, 125.0, 62.5),
    Device("L4", 23_580_639_232, 121.0, 60.0),
)}
DEFAULT_MFU = 0.40  # a typical achieved model-FLOPs utilisation for dense LLM training on one node


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


@dataclass(frozen=True)
class Params:
    total: int
    trainable: int
    frozen_quantized: int  # QLoRA: weights stored in 4 bit
    frozen_dense: int  # frozen weights kept in the compute dtype
    largest_layer: int
    matmul: int  # every matmul weight incl. the LM head (MFU)
    matmul_trainable: int


def _unknown_targets(m: ModelInfo, field: str, names: list[str], shapes: dict[str, tuple[int, int]]) -> None:
    unknown = [t for t in names if t not in shapes]
    if unknown:
        raise UserError(f"{field}: {unknown} are not linear layers of a {m.model_type} block; "
                        f"choose from {sorted(shapes)}" + (" or 'all-linear'" if "lora" in field else ""), field=field)


def lora_params(m: ModelInfo, spec: RunSpec) -> tuple[int, list[str]]:
    """Exact LoRA parameter count: r x (in + out) per adapted linear, per layer; DoRA adds one
    magnitude per output feature of each adapted linear."""
    lora = spec.method.lora
    shapes = m.linear_shapes()
    if lora.target_modules == "all-linear":
        targets = list(shapes)  # peft's all-linear: every linear but the output layer
    else:
        _unknown_targets(m, "method.lora.target_modules", list(lora.target_modules), shapes)
        targets = list(lora.target_modules)
    n = m.num_layers * sum(lora.r * (shapes[t][0] + shapes[t][1]) for t in targets)
    if spec.method.name == "dora":
        n += dora_magnitudes(m, targets)
    for name in lora.modules_to_save:  # full copies of these modules train
        if name in ("lm_head",):
            n += m.vocab_size * m.hidden_size
        elif name in ("embed_tokens",):
            n += m.vocab_size * m.hidden_size
    return n, targets


def dora_magnitudes(m: ModelInfo, targets: list[str]) -> int:
    shapes = m.linear_shapes()
    return m.num_layers * sum(shapes[t][1] for t in targets)


def ia3_params(m: ModelInfo, spec: RunSpec) -> int:
    """IA3: one learned scale per output feature of each target, per input feature for feed-forward ones."""
    ia = spec.method.ia3
    shapes = m.linear_shapes()
    _unknown_targets(m, "method.ia3.target_modules", list(ia.target_modules), shapes)
    return m.num_layers * sum(shapes[t][0] if t in ia.feedforward_modules else shapes[t][1] for t in ia.target_modules)


def prefix_params(m: ModelInfo, spec: RunSpec) -> int:
    """Prefix tuning as peft builds it: a key and a value vector per virtual token and layer, each
    key/value heads x head dim wide (grouped-query attention); with projection, an embedding of that
    width and a 2-layer MLP (width -> hidden -> layers x 2 x width) produce them."""
    pf = spec.method.prefix
    width = m.num_kv_heads * m.head_dim
    out = m.num_layers * 2 * width
    if not pf.projection:
        return pf.num_virtual_tokens * out
    hid = pf.projection_hidden or width
    return pf.num_virtual_tokens * width + (width * hid + hid) + (hid * out + out)


def prompt_params(m: ModelInfo, spec: RunSpec) -> int:
    """Prompt tuning: one embedding row per virtual token."""
    return spec.method.prompt.num_virtual_tokens * m.hidden_size


def param_names(m: ModelInfo) -> list[tuple[str, int, str]]:
    """(name, size, tensor) of every parameter as transformers names it for the Llama family, the
    tied LM head listed too (tensor: the name of the tensor it shares). Sizes add up to total_params()."""
    h = m.hidden_size
    shapes = m.linear_shapes()
    out: list[tuple[str, int, str]] = [("model.embed_tokens.weight", m.embedding_params(), "model.embed_tokens.weight")]
    for layer in range(m.num_layers):
        pre = f"model.layers.{layer}."
        for t, (a, b) in shapes.items():
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((f"{pre}{part}.{t}.weight", a * b, f"{pre}{part}.{t}.weight"))
            bias = (m.attention_bias and part == "self_attn" and not (t == "o_proj" and m.model_type == "qwen2")) \
                or (m.mlp_bias and part == "mlp")
            if bias:
                out.append((f"{pre}{part}.{t}.bias", b, f"{pre}{part}.{t}.bias"))
        if m.model_type == "qwen3":
            for t in ("q_norm", "k_norm"):
                out.append((f"{pre}self_attn.{t}.weight", m.head_dim, f"{pre}self_attn.{t}.weight"))
        norms = ("post_attention_layernorm", "post_feedforward_layernorm") if m.model_type == "olmo2" \
            else ("input_layernorm", "post_attention_layernorm")
        for t in norms:
            out.append((f"{pre}{t}.weight", h, f"{pre}{t}.weight"))
    out.append(("model.norm.weight", h, "model.norm.weight"))
    out.append(("lm_head.weight", m.vocab_size * h,
                "model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight"))
    return out


def _name_matches(name: str, pattern: str) -> bool:
    """`pattern`'s dotted parts equal a run of `name`'s parts, each part with * / ? wildcards:
    'norm' is model.norm (not input_layernorm), 'mlp' every MLP, 'layers.3' the fourth layer."""
    parts, pat = name.split("."), pattern.split(".")
    return any(all(fnmatch.fnmatchcase(parts[k + j], pat[j]) for j in range(len(pat)))
               for k in range(len(parts) - len(pat) + 1))


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def freeze_selection(names: list[str], freeze: Any, num_layers: int) -> set[str]:
    """The parameter names that train under method freeze: those method.freeze.train_modules match,
    and those of the last method.freeze.top_layers decoder layers. UserError for a name that matches
    nothing or more layers than the model has. Shared by the estimator (names from config.json) and
    the model builder (names from the instantiated model)."""
    if freeze.top_layers > num_layers:
        raise UserError(f"method.freeze.top_layers={freeze.top_layers} but the model has {num_layers} layers; "
                        f"use at most {num_layers}", field="method.freeze.top_layers")
    chosen: set[str] = set()
    for pat in freeze.train_modules:
        hit = {n for n in names if _name_matches(n, pat)}
        if not hit:
            examples = ", ".join(n for n in names if _layer_index(n) in (None, 0))
            raise UserError(f"method.freeze.train_modules: {pat!r} matches no parameter of this model; names are "
                            f"dotted parts of: {examples} (layers 1.. alike)", field="method.freeze.train_modules")
        chosen |= hit
    first = num_layers - freeze.top_layers
    chosen |= {n for n in names if (_layer_index(n) is not None and _layer_index(n) >= first)}  # type: ignore[operator]
    return chosen


def freeze_params(m: ModelInfo, spec: RunSpec) -> tuple[int, int]:
    """(trainable, trainable matmul weights) under method freeze, each shared tensor counted once."""
    table = param_names(m)
    chosen = freeze_selection([n for n, _, _ in table], spec.method.freeze, m.num_layers)
    tensors = {t: size for n, size, t in table if n in chosen}
    head = {n for n, _, t in table if n == "lm_head.weight" and (n in chosen or t in tensors)}
    matmul = sum(size for n, size, _ in table if n.endswith("_proj.weight") and n in chosen)
    matmul += m.vocab_size * m.hidden_size if head else 0  # the LM head's matmul trains (tied: with the embedding)
    return sum(tensors.values()), matmul


def count_params(m: ModelInfo, spec: RunSpec) -> Params:
    if not m.counted:
        raise UserError(f"model type {m.model_type!r} ({m.source}): the estimator counts the Llama/Mistral/Qwen "
                        f"family from config.json; estimate this architecture on a GPU with `launcher bench`",
                        field="model.name")
    total = m.total_params()
    linear = m.num_layers * sum(a * b for a, b in m.linear_shapes().values())
    largest = max(m.vocab_size * m.hidden_size, max(a * b for a, b in m.linear_shapes().values()))
    method = spec.method.name
    matmul = m.matmul_params()
    if method == "full":
        return Params(total, total, 0, 0, largest, matmul, matmul)
    if method == "freeze":
        n, n_matmul = freeze_params(m, spec)
        return Params(total, n, 0, total - n, largest, matmul, n_matmul)
    if method in ("ia3", "prefix", "prompt"):  # scales or virtual tokens: no trainable matmul per token
        n = {"ia3": ia3_params, "prefix": prefix_params, "prompt": prompt_params}[method](m, spec)
        return Params(total + n, n, 0, total, largest, matmul, 0)
    lora, targets = lora_params(m, spec)
    lora_matmul = lora - (dora_magnitudes(m, targets) if method == "dora" else 0)
    quantized = linear if method == "qlora" else 0
    return Params(total + lora, lora, quantized, total - quantized, largest, matmul + lora_matmul, lora_matmul)


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
    from launcher.render.deepspeed import zero_section

    z = zero_section(spec, plan)
    stage = z["stage"]
    if stage == 0:
        return 0
    if stage in (1, 2):
        # DeepSpeed's docs: overlap_comm uses 4.5x the bucket sizes (2 bytes per element each).
        factor = 4.5 if z.get("overlap_comm") else 1.0
        return int(2 * factor * (z["reduce_bucket_size"] + z["allgather_bucket_size"]))
    return int(2 * (z["reduce_bucket_size"] + z["stage3_prefetch_bucket_size"]))


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
    dev = DEVICES.get(device) if device else None
    if device and dev is None:
        raise UserError(f"--gpu {device!r} is not in the table ({', '.join(DEVICES)}); give --device-memory and "
                        f"--device-tflops instead")
    mem = device_memory or (dev.memory_bytes if dev else None)
    model_f, hw_f = flops_per_token(m, spec, p, plan.seq_len)
    notes = []
    step = tps = usd = None
    if dev is not None:
        peak_flops = (dev.tflops_32bit if spec.precision.dtype == "fp32" else dev.tflops_16bit) * 1e12
        tps = plan.world_size * peak_flops * mfu / model_f
        step = plan.tokens_per_step / tps
        if spec.zero.offload_optimizer != "none" or spec.zero.offload_param != "none":
            notes.append("offload traffic is not modelled: expect a slower step than this")
    if usd_per_device_hour is not None and tps:
        usd = usd_per_device_hour * plan.world_size / 3600 / tps * 1e6
    train_h = train_usd = None
    if train_tokens and tps:
        train_h = train_tokens / tps / 3600
        if usd_per_device_hour is not None:
            train_usd = train_h * usd_per_device_hour * plan.world_size
    if spec.precision.dtype == "fp32" or spec.method.name != "full":
        notes.append("DeepSpeed's estimators cover mixed-precision full fine-tuning only; "
                     "this setup is counted from tensor shapes")
    return Estimate(
        params=p.total, trainable_params=p.trainable, world_size=plan.world_size, device=device,
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
