"""Bytes a rank holds, from config.json alone: model states, activations, the loss's logits and ZeRO's
buffers. The plan sizes its `auto` choices with these (the ZeRO stage, the loss), and the estimator
reports them; both pass the choices as a `Setup`, so this module needs neither of them.

Model states follow DeepSpeed's own ZeRO estimators where they apply (mixed-precision Adam, full
fine-tuning): ZeRO-2 = 2P + 18P/N, ZeRO-3 = 4 x largest layer + 18P/N, offload moving the sharded
part off the GPU. The rest (LoRA, QLoRA, fp32, activations, buffers, logits) is counted from the
shapes of the tensors the forward pass saves for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.config.spec import RunSpec, merged_zero, reference_mode, sequences_per_example
from launcher.plan.modelinfo import ModelInfo
from launcher.plan.params import Params, lora_params

@dataclass(frozen=True)
class Setup:
    """What the bytes depend on beyond the spec: the plan's choices and the run's shape."""

    stage: int
    precision: str  # bf16 | fp16 | fp32
    loss: str  # standard | chunked | liger
    world_size: int
    nproc_per_node: int
    buckets: Any  # plan.ZeroBuckets


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


# DeepSpeed's zero_optimization.sub_group_size as launcher renders it: the parameters ZeRO-3 steps at a time.
ZERO3_SUB_GROUP = 1_000_000_000


def model_states(spec: RunSpec, s: Setup, p: Params) -> dict[str, int]:
    """Bytes per GPU of weights, gradients and optimizer states, and per node offloaded to CPU.

    Mixed precision per trainable parameter, as DeepSpeed counts it: 2 (16-bit weights) + 2 (16-bit
    grads) + 4 (fp32 grads) + 4 (fp32 master) + 8 (Adam m, v). Stage 1 shards the fp32 parts,
    stage 2 also the 16-bit grads, stage 3 everything plus 4 x the largest layer gathered. fp32 training
    has no 16-bit grads; ZeRO 1-3 still keep a separate fp32 master partition, and ZeRO 1-2 a flat fp32
    copy of the gradient partition during the update. ZeRO-3 keeps its gradient partition in a flat
    buffer of the model's dtype and, for the update, flattens it again into fp32 one sub-group
    (ZERO3_SUB_GROUP parameters) at a time: 2 + 4 B per parameter in bf16, 4 + 4 in fp32 (measured on one
    CPU rank: 20 and 24 B per parameter inside the update; DeepSpeed's own estimator counts 18). These are
    the model states at their peak, inside the optimizer step.
    """
    z, n, stage = merged_zero(spec.zero, []), s.world_size, s.stage  # zero.extra's offload counts too
    a, t = dtype_bytes(s.precision), p.trainable
    frozen = p.frozen_dense * a + p.frozen_quantized * quantized_bytes_per_param(spec)
    weights = (frozen + t * a) / (n if stage == 3 else 1)
    if s.precision == "fp32":
        # ZeRO 1-3 keep their own flat fp32 master partition even for an fp32 model (measured on
        # CPU: without it the estimate was 15-20% low); ZeRO-0 steps the model's tensors directly.
        # ZeRO 1-2 also flatten the gradient partition into a new tensor for the update while the
        # gradients it came from are still held (the bench counts both inside the step); so does ZeRO-3.
        gradients = 4 * t / (n if stage >= 2 else 1) + (4 * t / n if stage >= 1 else 0)
        optimizer = (12 if stage >= 1 else 8) * t / (n if stage >= 1 else 1)
    else:
        grads16 = 2 * t / (n if stage >= 2 else 1)
        gradients = grads16 + 4 * t / (n if stage >= 1 else 1)
        optimizer = 12 * t / (n if stage >= 1 else 1)
    if stage == 3:  # its fp32 copy for the update is one sub-group at a time, however large the partition
        gradients -= 4 * t / n - 4 * min(t / n, ZERO3_SUB_GROUP)
    gathered = 4 * p.largest_layer if stage == 3 else 0
    # dpo/kto with an in-memory reference: a frozen copy of the whole model (sharded at ZeRO-3, as TRL prepares
    # it); the LoRA family (adapter disabled) and precomputed log-probs hold none
    reference = (p.total * a / (n if stage == 3 else 1)) if reference_mode(spec) == "in_memory" else 0
    offloaded = 0.0
    if z.offload_optimizer != "none":  # gradients stream to the CPU optimizer as they are reduced
        offloaded += gradients + optimizer
        gradients = optimizer = 0
    if z.offload_param != "none":
        offloaded += weights
        weights = 0
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "gathered": int(gathered), "reference": int(reference), "cpu_per_node": int(offloaded * s.nproc_per_node)}


def quantized_bytes_per_param(spec: RunSpec) -> float:
    # 4-bit values + one absmax per block of 64: fp32 (4 B / 64), or with double quantization an
    # 8-bit absmax (1 B / 64) plus an fp32 constant per 256 blocks.
    q = spec.method.quant
    return 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)


def loss_tokens(m: ModelInfo, spec: RunSpec, loss: str, tokens: int) -> int:
    """Tokens whose logits exist at once: all of the micro batch's with the standard loss, one chunk's
    with the chunked loss, and with Liger's fused linear cross-entropy its own chunk: the tokens over
    ceil(vocab / hidden) chunks, rounded up to a power of two."""
    if loss == "chunked":
        return min(tokens, spec.optim.loss_chunk_tokens)
    if loss == "liger":
        chunks = math.ceil(m.vocab_size / m.hidden_size)
        return min(tokens, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / chunks))))))
    return tokens


def logits_bytes(m: ModelInfo, spec: RunSpec, precision: str, loss: str, tokens: int) -> int:
    """The loss's peak: logits in the compute dtype, their fp32 log-softmax and its fp32 gradient, for
    the tokens whose logits exist at once (loss_tokens)."""
    return loss_tokens(m, spec, loss, tokens) * m.vocab_size * (dtype_bytes(precision) + 4 + 4)


def activation_bytes(m: ModelInfo, spec: RunSpec, s: Setup, micro: int, seq: int) -> tuple[int, int, int, int]:
    """(saved activations, one layer's, logits peak, recompute peak) in bytes for one micro batch."""
    a = dtype_bytes(s.precision)
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
    per_layer = tokens * per_token
    if spec.model.attn == "eager":
        per_layer += (4 + a) * micro * m.num_heads * seq * seq  # softmax in fp32 + its cast, kept for backward
    logits = logits_bytes(m, spec, s.precision, s.loss, tokens)
    if spec.model.grad_ckpt:
        saved = m.num_layers * tokens * a * h  # each layer's input only
        recompute = per_layer
    else:
        saved = m.num_layers * per_layer
        recompute = 0
    saved += tokens * (a * h + norm)  # embedding output, final norm
    return int(saved), int(per_layer), int(logits), int(recompute)


def buffer_bytes(spec: RunSpec, s: Setup) -> int:
    """ZeRO's communication buffers, 2 bytes per element of the plan's bucket sizes."""
    b = s.buckets
    if s.stage == 0:
        return 0
    if s.stage in (1, 2):
        # DeepSpeed's docs: overlap_comm uses 4.5x the bucket sizes (2 bytes per element each).
        factor = 4.5 if spec.zero.overlap_comm else 1.0
        return int(2 * factor * (b.reduce + b.allgather))
    return int(2 * (b.reduce + b.prefetch))


@dataclass(frozen=True)
class Peak:
    states: dict[str, int]
    saved: int
    per_layer: int
    logits: int
    recompute: int
    buffers: int

    @property
    def model_states(self) -> int:
        st = self.states
        return st["weights"] + st["gradients"] + st["optimizer"] + st["gathered"] + st.get("reference", 0)

    @property
    def transient(self) -> int:
        return max(self.logits, self.recompute)  # the loss's tensors and a recomputed layer do not coexist

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.saved + self.transient


def peak(m: ModelInfo, spec: RunSpec, s: Setup, p: Params, micro: int, seq: int) -> Peak:
    """Every term of one rank's peak memory for this setup. A preference task's micro batch of examples runs
    two sequences each (chosen and rejected) through the model at once."""
    micro *= sequences_per_example(spec.task)
    saved, per_layer, logits, recompute = activation_bytes(m, spec, s, micro, seq)
    return Peak(model_states(spec, s, p), saved, per_layer, logits, recompute, buffer_bytes(spec, s))
