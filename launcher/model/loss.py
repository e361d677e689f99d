"""The language-model loss a run installs on its model (`optim.loss`): transformers' own (standard), a
chunked linear cross-entropy that never holds the whole [tokens x vocab] logits (pure PyTorch), or Liger
Kernel's fused kernels (CUDA). `apply_loss` patches the one model instance, never its class.

Heavy libraries (torch, transformers, peft, deepspeed) are imported inside the functions.
"""

from __future__ import annotations

import functools
from typing import Any

from launcher.errors import UserError
from launcher.plan.modelinfo import SCALED_LOGITS
from launcher.plan.plan import liger_importable

LOSS_KINDS = ("standard", "chunked", "liger")
IGNORE_INDEX = -100  # transformers' ignore_index: SFT prompt masks, padding, peft's virtual tokens

# Tokens per chunk of the chunked loss. While it runs, the loss holds two fp32 [chunk x vocab] buffers at a
# time (the upcast logits, then their softmax, turned in place into the logits' gradient), plus
# the logits in the model's dtype when that is bf16/fp16, plus an fp32 gradient buffer the size of a
# trainable head: at Llama-3's vocabulary of 128,256 the buffers are 2 x 0.5 GiB (+0.25 GiB in bf16),
# where the standard loss holds several copies of a micro batch's whole logits (4 x 2048 tokens: 3.9 GiB
# each in fp32). 1024 rows keep each chunk's matmuls ([1024 x hidden] x [hidden x vocab]) large enough to
# run at full speed on a GPU or a CPU (a few hundred rows already saturate either), so chunking costs a
# Python loop of a few iterations, not kernel efficiency. A micro batch of up to 1024 target tokens is
# one chunk. The spec's optim.loss_chunk_tokens overrides it.
CHUNK_TOKENS = 1024

# The launcher's own key in ZeRO-3's per-parameter set of modules using it (ds_active_sub_modules holds
# module ds_ids, which are >= 0): while it is there, ZeRO-3 keeps the head's weight gathered from the
# head's forward to the head's backward (see _ZeroHold).
_ZERO3_HOLD_ID = -13


# --------------------------------------------------------------------------- what is installed

def apply_loss(model: Any, kind: str, *, chunk_tokens: int = CHUNK_TOKENS) -> str:
    """kind: "standard" | "chunked" | "liger". Installs the loss on this model (a transformers causal LM,
    possibly wrapped by peft) and returns one short line saying what was installed. "standard" does
    nothing. Raises UserError for liger without the liger_kernel package or without CUDA, and for chunked
    on a model whose head it cannot compute piecewise (a soft-capped or scaled head)."""
    if kind == "standard":
        return "standard cross-entropy (transformers' own; the whole logits)"
    if kind == "liger":
        return _apply_liger(model)
    if kind != "chunked":
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lm = causal_lm_of(model)
    cfg = getattr(lm, "config", None)
    for attr in SCALED_LOGITS:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise UserError(f"--loss chunked computes logits as the head's plain linear map, but this model's "
                            f"config sets {attr}={getattr(cfg, attr)!r}; use --loss standard for it",
                            field="optim.loss")
    import types

    lm.forward = types.MethodType(_chunked_forward, lm)  # the instance only: other models stay standard
    lm._launcher_chunk_tokens = chunk_tokens
    how = "one gather of the head per micro step under ZeRO-3" if _fast_head(lm.get_output_embeddings()) else \
        "head module called per chunk"
    return f"chunked cross-entropy, {chunk_tokens}-token chunks ({how})"


def causal_lm_of(model: Any) -> Any:
    """The innermost transformers model with an output embedding (the LM head) under peft's wrappers
    (PeftModelForCausalLM -> LoraModel -> the causal LM; prompt and prefix tuning wrap it directly)."""
    m = model
    for _ in range(4):
        if _is_causal_lm(m):
            return m
        if hasattr(m, "get_base_model"):  # a PeftModel: the LM under LoraModel, or the LM (prompt learning)
            m = m.get_base_model()
        elif getattr(m, "model", None) is not None:
            m = m.model  # a peft tuner (LoraModel) -> the LM
        else:
            break
    raise UserError(f"--loss needs a causal language model with an output embedding (LM head); "
                    f"{type(model).__name__} has none", field="optim.loss")


def _is_causal_lm(m: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not isinstance(m, PreTrainedModel) or not hasattr(m, "get_output_embeddings"):
        return False
    try:
        return m.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def _apply_liger(model: Any) -> str:
    if not liger_importable():
        raise UserError("--loss liger needs the liger-kernel package, which is not installed: install it "
                        "(pip install liger-kernel, an optional extra) on a CUDA machine, or use --loss chunked "
                        "(pure PyTorch) or --loss auto", field="optim.loss")
    import torch

    if not torch.cuda.is_available():
        raise UserError("--loss liger runs Liger Kernel's Triton kernels, which need a CUDA GPU, and this machine "
                        "has none; use --loss chunked (pure PyTorch, CPU and GPU) or --loss auto", field="optim.loss")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise UserError(f"--loss liger: liger-kernel is installed but does not import ({exc}); reinstall it or "
                        f"use --loss chunked", field="optim.loss") from exc
    lm = causal_lm_of(model)
    _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    return "Liger Kernel: fused linear cross-entropy, RMSNorm, SwiGLU and RoPE kernels"


# --------------------------------------------------------------------------- the patched forward

_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def _chunked_forward(self: Any, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                     past_key_values: Any = None, inputs_embeds: Any = None, labels: Any = None,
                     use_cache: Any = None, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
    """The causal LM's forward with the chunked loss when labels are given (logits=None then); without
    labels (generation, logits wanted) it is the class's own forward. Takes **kwargs, so the Trainer passes
    num_items_in_batch to it as to the standard forward."""
    keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if (labels is None and kwargs.get("shift_labels") is None) or not keep_all:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    loss_kw = {k: kwargs.pop(k) for k in _LOSS_ONLY_KWARGS if k in kwargs}
    return_dict = kwargs.pop("return_dict", None)
    decoder = self.get_decoder() if hasattr(self, "get_decoder") else self.model
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs[0] if not hasattr(outputs, "last_hidden_state") else outputs.last_hidden_state
    loss = linear_cross_entropy(hidden, self.get_output_embeddings(), labels,
                                chunk_tokens=getattr(self, "_launcher_chunk_tokens", CHUNK_TOKENS), **loss_kw)
    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    return out if return_dict is not False else out.to_tuple()


# --------------------------------------------------------------------------- the loss

def linear_cross_entropy(hidden: Any, head: Any, labels: Any = None, *, shift_labels: Any = None,
                         num_items_in_batch: Any = None, ignore_index: int = IGNORE_INDEX,
                         chunk_tokens: int = CHUNK_TOKENS) -> Any:
    """transformers' causal-LM loss of `head(hidden)` against `labels`, computed over chunks of tokens.

    The same semantics as transformers' ForCausalLMLoss: labels shifted left by one (or `shift_labels`
    as given), `ignore_index` positions left out, logits upcast to fp32, the sum divided by
    `num_items_in_batch` when given (the Trainer's count over all micro batches of the step), else the mean
    over the counted tokens. Only rows with a target are computed at all."""
    import torch

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = shift_labels.reshape(-1).to(h.device)
    rows = (t != ignore_index).nonzero().squeeze(1)
    h, t = h.index_select(0, rows), t.index_select(0, rows)
    if num_items_in_batch is None:
        denom = torch.tensor(float(rows.numel()), device=h.device)  # F.cross_entropy's mean over counted tokens
    else:
        denom = num_items_in_batch.to(h.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch

    parts = _fast_head(head)
    if parts is None:
        total = _generic_chunks(head, h, t, chunk_tokens)
    else:
        total = _fast_chunks(parts, hidden, rows, h, t, chunk_tokens)
    return total / denom


def _fast_head(head: Any) -> dict[str, Any] | None:
    """The head as tensors the chunk loop computes directly: an nn.Linear (tied or not), or peft's LoRA
    Linear around one (one active plain adapter: logits = x W^T + b + s (drop(x) A^T) B^T). None for
    anything else (another adapter type, DoRA, several adapters, a quantized head): those are called as
    modules per chunk."""
    import torch

    if type(head) is torch.nn.Linear:
        return {"linear": head}
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(head, LoraLinear) or type(head.base_layer) is not torch.nn.Linear:
        return None
    if head.disable_adapters or head.merged:
        return {"linear": head.base_layer}
    active = [a for a in head.active_adapters if a in head.lora_A]
    if not active:
        return {"linear": head.base_layer}
    if len(active) > 1 or active[0] in getattr(head, "lora_variant", {}):
        return None
    a = active[0]
    if getattr(head, "lora_bias", {}).get(a, False) or head.lora_B[a].bias is not None:
        return None
    return {"linear": head.base_layer, "lora_A": head.lora_A[a], "lora_B": head.lora_B[a],
            "dropout": head.lora_dropout[a], "scaling": float(head.scaling[a])}


def _generic_chunks(head: Any, h: Any, t: Any, chunk: int) -> Any:
    """Any head module: each chunk's logits and loss under activation checkpointing (recomputed in
    backward), so one chunk's logits at a time. Under ZeRO-3 the head module is gathered per call: once
    per chunk in forward and twice in backward while ZeRO-3 records its trace (its prefetcher keeps the
    head gathered across the calls after that)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def piece(hc: Any, tc: Any) -> Any:
        return torch.nn.functional.cross_entropy(head(hc).float(), tc, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s:s + chunk], t[s:s + chunk]
        total = total + (checkpoint(piece, hc, tc, use_reentrant=False) if torch.is_grad_enabled() else piece(hc, tc))
    return total


def _fast_chunks(parts: dict[str, Any], hidden: Any, rows: Any, h: Any, t: Any, chunk: int) -> Any:
    """The loss sum over all chunks of a Linear (+ LoRA) head, with every gradient computed chunk by
    chunk while the forward runs (the chunk's logits are freed before the next), kept until backward
    scales them by the incoming gradient. Under ZeRO-3 the head module is called once around the whole
    loop, so its weight is gathered once, and kept gathered for the backward (_ZeroHold)."""
    import torch

    lin = parts["linear"]
    u = lora_b = None
    scaling = 1.0
    if "lora_A" in parts:
        # The LoRA head's low-rank input over every position, as peft computes it (one dropout draw over the
        # same tensor), then the rows with a target. [tokens x rank]: small.
        x = hidden.to(parts["lora_A"].weight.dtype)
        u = parts["lora_A"](parts["dropout"](x))
        u = u.reshape(-1, u.shape[-1]).index_select(0, rows)
        lora_b, scaling = parts["lora_B"].weight, parts["scaling"]

    def run(h_in: Any, u_in: Any = None) -> Any:
        w, b = lin.weight, lin.bias
        grads_wanted = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (h_in, w, b, u_in, lora_b))
        if not grads_wanted:
            with torch.no_grad():
                return _loss_and_grads(h_in, t, w, b, u_in, lora_b, scaling, chunk, (False,) * 5)[0]
        hold = _ZeroHold((w, b, lora_b))
        return _chunked_fn().apply(h_in, t, w, b, u_in, lora_b, scaling, chunk, hold)

    zero3 = any(hasattr(p, "ds_id") for p in (lin.weight, lin.bias, lora_b) if p is not None)
    if not zero3:
        return run(h, u)
    if lora_b is not None and hasattr(lora_b, "ds_id"):
        # lora_B sits in its own module: ZeRO-3 would only gather it through that module. Run the loop inside
        # it too, nested inside the base layer (both gathered once).
        return _call_inside(lin, lambda h_in: _call_inside(parts["lora_B"], lambda u_in: run(h_in, u_in), u), h)
    return _call_inside(lin, lambda h_in: run(h_in, u), h)


def _call_inside(module: Any, fn: Any, x: Any) -> Any:
    """fn(x) run as the forward of one call of `module`: its hooks run once around it (ZeRO-3 gathers the
    module's parameters before and releases them after, and again around its backward)."""
    had = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(x)
    finally:
        if had is None:
            del module.forward
        else:
            module.forward = had


class _ZeroHold:
    """Keeps the head's ZeRO-3 parameters gathered from the forward of the loss to its backward.

    ZeRO-3 releases a module's parameters after its forward and gathers them again before its backward.
    The chunked loss needs the weight only in its forward (every gradient is computed there), but autograd
    can only accumulate the weight's gradient into a parameter of its full shape, so the weight has to be
    gathered again when the gradient arrives. Marking the weight as in use by one more (launcher's own)
    module keeps ZeRO-3 from releasing it after the forward; the loss's backward removes the mark before
    ZeRO-3's post-backward hook, which then releases the weight as usual: one gather per micro step. A
    forward whose backward never runs leaves the mark until ZeRO-3 clears every mark at the end of the
    step (release_and_reset_all)."""

    def __init__(self, params: tuple[Any, ...]):
        self.params = [p for p in params if p is not None and hasattr(p, "ds_active_sub_modules")]
        for p in self.params:
            p.ds_active_sub_modules.add(_ZERO3_HOLD_ID)

    def release(self) -> None:
        for p in self.params:
            p.ds_active_sub_modules.discard(_ZERO3_HOLD_ID)
        self.params = []


@functools.lru_cache(maxsize=None)
def _chunked_fn() -> Any:
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum over rows of cross_entropy(fp32(h W^T + b [+ s u B^T]), t): the forward computes every
        gradient chunk by chunk (no logits survive it); the backward scales them by the incoming gradient."""

        @staticmethod
        def forward(ctx: Any, h: Any, t: Any, w: Any, b: Any, u: Any, lora_b: Any, scaling: float, chunk: int,
                    hold: Any) -> Any:
            ctx.want = tuple(x is not None and x.requires_grad for x in (h, w, b, u, lora_b))
            ctx.dtypes = tuple(None if x is None else x.dtype for x in (h, w, b, u, lora_b))
            ctx.hold = hold
            total, grads = _loss_and_grads(h, t, w, b, u, lora_b, scaling, chunk, ctx.want)
            ctx.save_for_backward(*grads)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            ctx.hold.release()
            gh, gw, gb, gu, glb = (_scaled(g, grad_out, dtype) if wanted else None
                                   for g, wanted, dtype in zip(ctx.saved_tensors, ctx.want, ctx.dtypes))
            return gh, None, gw, gb, gu, glb, None, None, None

    return ChunkedLinearCrossEntropy


def _scaled(g: Any, by: Any, dtype: Any) -> Any:
    """(g * by).to(dtype) in one pass over g: the same roundings (to g's dtype, then to dtype), no temporary."""
    import torch

    return torch.mul(g, by, out=torch.empty(g.shape, dtype=dtype, device=g.device))


def _add_into(acc: Any, part: Any) -> None:
    """acc += part, for an fp32 acc and a half-precision part. On a CPU, torch first casts the whole of a
    mixed-dtype in-place add's other operand to a temporary of acc's size, which at a head's size (vocab x
    hidden) is fresh pages from the OS on every call: here the cast goes block by block through one small
    fp32 buffer (a 32,000 x 512 add: 26 ms whole, 5 ms in blocks of a million elements)."""
    if acc.device.type != "cpu":
        acc += part
        return
    step = max(1, (1 << 20) // max(1, acc[0].numel()))
    block = acc.new_empty((min(step, acc.shape[0]),) + tuple(acc.shape[1:]))
    for s in range(0, acc.shape[0], step):
        piece = part[s:s + step]
        cast = block[:piece.shape[0]]
        cast.copy_(piece)
        acc[s:s + step] += cast


def _loss_and_grads(h: Any, t: Any, w: Any, b: Any, u: Any, lora_b: Any, scaling: float, chunk: int,
                    want: tuple[bool, ...]) -> tuple[Any, tuple[Any, ...]]:
    """The fp32 loss sum and, for each of (h, w, b, u, lora_b) that `want` names, the gradient of that sum
    (fp32 for half-precision tensors, else their dtype), accumulated over chunks of `chunk` rows.

    Per chunk: z = h W^T (+ b) (+ s u B^T) in the model's dtype; p = softmax in fp32; loss = -log p[t]
    (_minus_log_sum); dz = p - onehot, cast back to z's dtype as autograd casts the gradient of z.float();
    then dh = dz W, dW += dz^T h (and the bias and LoRA terms). fp16 matmuls of dz run in fp32, on an fp32
    copy of the head's weight: dz is not scaled by the loss scale here, so in fp16 it would lose its small
    entries. One softmax instead of a log-softmax and its exp: on a CPU torch's softmax kernel takes a
    third of the time of those two (1,024 x 32,000: 11 ms against 10 + 14 ms).

    Every [chunk x vocab] tensor lives in buffers made once per call and reused by each chunk, in place
    (the same operations as out-of-place, so the same numbers): a CPU allocator hands each tensor that large
    fresh pages from the OS and takes them back when it is freed, and faulting those pages in again for each
    chunk cost more than the log-softmax (a 1,024 x 32,000 fp32 softmax: 44 ms allocated, 10 ms in place).
    fp32 logits are their own fp32 buffer; half-precision logits get one more, in their dtype."""
    import torch

    n, dim = h.shape
    empty = h.new_empty(0)
    acc = (lambda x: torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    gh = torch.empty(n, dim, dtype=acc(h), device=h.device) if want[0] else empty
    gw_new = torch.empty if n else torch.zeros  # the first chunk sets dW; with no row at all it stays zero
    gw = gw_new(w.shape, dtype=acc(w), device=w.device) if want[1] else empty
    gb = torch.zeros(b.shape, dtype=acc(b), device=b.device) if want[2] else empty
    gu = torch.empty(u.shape, dtype=acc(u), device=u.device) if want[3] else empty
    glb = torch.zeros(lora_b.shape, dtype=acc(lora_b), device=lora_b.device) if want[4] else empty
    mm = torch.float32 if h.dtype == torch.float16 else h.dtype
    w_d = w.detach()
    w_mm = w_d.to(mm)
    lb_mm = lora_b.detach().to(mm) if lora_b is not None else None
    p_target = torch.empty(n, dtype=torch.float32, device=h.device)  # each row's softmax at its target
    any_grad = any(want)
    rows = min(chunk, n)
    vocab = w.shape[0]
    z_buf = torch.empty(rows, vocab, dtype=w.dtype, device=h.device)
    f_buf = z_buf if w.dtype == torch.float32 else torch.empty(rows, vocab, dtype=torch.float32, device=h.device)
    # dW per chunk, where it cannot be added in place (half-precision products into an fp32 sum)
    gw_part = torch.empty(w.shape, dtype=mm, device=w.device) if want[1] and gw.dtype != mm else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc, tc = h[s:e].detach(), t[s:e]
        z, f = z_buf[:e - s], f_buf[:e - s]
        uc = u[s:e].detach() if u is not None else None
        _logits(hc, w_d, b, uc, lora_b, scaling, out=z)
        if f is not z:
            f.copy_(z)
        p = torch.ops.aten._softmax.out(f, 1, False, out=f)  # in place: each row is read before written
        p_target[s:e] = p.gather(1, tc.unsqueeze(1)).squeeze(1)
        if not any_grad:
            continue
        dz = p
        dz[torch.arange(e - s, device=dz.device), tc] -= 1.0
        if z is not f:
            dz = z.copy_(dz)  # the gradient autograd hands to z, in the model's dtype
        dz = dz.to(mm)  # fp16 computed in fp32; a no-op otherwise
        if want[0]:
            gh[s:e] = dz @ w_mm
        if want[1]:
            if gw_part is not None:
                part = torch.mm(dz.t(), hc.to(mm), out=gw_part)
                if s == 0:
                    gw.copy_(part)
                else:
                    _add_into(gw, part)
            elif s == 0:
                torch.mm(dz.t(), hc.to(mm), out=gw)
            else:
                gw.addmm_(dz.t(), hc.to(mm))
        if want[2]:
            gb += dz.sum(0)
        if u is not None and (want[3] or want[4]):
            dzs = dz.to(lb_mm.dtype) * scaling
            if want[3]:
                gu[s:e] = dzs @ lb_mm
            if want[4]:
                glb += dzs.t() @ uc.to(lb_mm.dtype)
        del dz
    return _minus_log_sum(p_target, lambda r: _logits(h[r].detach(), w_d, b, None if u is None else u[r].detach(),
                                                      lora_b, scaling), t), (gh, gw, gb, gu, glb)


def _logits(hc: Any, w: Any, b: Any, uc: Any, lora_b: Any, scaling: float, out: Any = None) -> Any:
    """Rows' logits as the head computes them, in its dtype: h W^T (+ b) (+ s u B^T)."""
    import torch

    if out is None:
        out = hc.new_empty((hc.shape[0], w.shape[0]), dtype=w.dtype)
    if b is None:
        torch.mm(hc, w.t(), out=out)
    else:
        torch.addmm(b.detach(), hc, w.t(), out=out)  # as nn.Linear adds its bias: one rounding
    if uc is not None:
        out += torch.nn.functional.linear(uc, lora_b.detach()) * scaling  # summed in the wider dtype, as peft
    return out


# Below this a target's softmax probability has lost digits to underflow (its loss is over 69): that row's
# loss is computed from its logits instead.
_TINY_P = 1e-30


def _minus_log_sum(p_target: Any, logits_of: Any, t: Any) -> Any:
    """The loss sum, -sum(log p[row, t]) over rows, from each row's softmax at its target: -log p equals
    logsumexp(z) - z[t], which the log-softmax gives, within a few fp32 roundings. The rare row whose
    probability is under _TINY_P gets logsumexp(z) - z[t] from its logits, recomputed by logits_of(rows)."""
    import torch

    low = p_target < _TINY_P
    total = 0.0 - p_target.masked_fill(low, 1.0).log().sum()  # 0 - x: no "-0.0" loss when no row has a target
    rows = low.nonzero().squeeze(1)
    if rows.numel():
        z = logits_of(rows).float()
        total = total + (torch.logsumexp(z, 1) - z.gather(1, t[rows].unsqueeze(1)).squeeze(1)).sum()
    return total
