"""What the rank changes on DeepSpeed's engine once it exists (the Trainer makes it after on_train_begin),
so that ZeRO stage 0, the stage `zero.stage: auto` picks on one device, costs no more than it must:

- one rank alone (world size 1) skips the engine's gradient all-reduce: over one rank it is the identity,
  and DeepSpeed still flattens every gradient into a bucket, all-reduces it and copies it back;
- bf16 at stage 0 (DeepSpeed's FP16_UnfusedOptimizer in its bf16 mode) takes `fast_bf16_step`, the same
  update in fewer passes over memory;
- fp32 at stage 0 keeps the gradient norm DeepSpeed computes and drops (`keep_fp32_grad_norm`).

Torch and DeepSpeed are imported inside the functions.
"""

from __future__ import annotations

import math
import types
from typing import Any


def tune(engine: Any) -> list[str]:
    """Applies what fits this engine; returns one short line per speed change made (empty for none), for
    the rank's log."""
    if engine.zero_optimization_stage() != 0:
        return []
    done = []
    if skip_single_rank_allreduce(engine):
        done.append("one rank: no gradient all-reduce")
    if install_fast_bf16_step(engine.optimizer):
        done.append("bf16 stage 0: launcher's update step")
    keep_fp32_grad_norm(engine)  # a repair, not a choice: no line
    return done


def skip_single_rank_allreduce(engine: Any) -> bool:
    """At stage 0 on a world of one rank, turn off the engine's backward all-reduce (an identity there)."""
    import torch.distributed as dist

    if not getattr(engine, "enable_backward_allreduce", False) or getattr(engine, "dp_world_size", None) != 1:
        return False
    if dist.is_initialized() and dist.get_world_size() != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def keep_fp32_grad_norm(engine: Any) -> bool:
    """DeepSpeed's fp32 ZeRO-0 path clips the gradients (engine.clip_fp32_gradients) but drops the norm it
    computes, so the engine's get_global_grad_norm() is None and the step record would have no grad_norm
    (every other stage and precision keeps it). Keep it: the same clip, its norm stored where the Trainer
    reads it."""
    if engine.optimizer is None or not hasattr(engine, "clip_fp32_gradients") or \
            engine.bfloat16_enabled() or engine.fp16_enabled():
        return False
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip() -> None:
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    engine.clip_fp32_gradients = clip
    return True


def install_fast_bf16_step(optimizer: Any) -> bool:
    """Give DeepSpeed's bf16 stage-0 optimizer (FP16_UnfusedOptimizer holding bf16 weights and an fp32
    master copy, one torch optimizer on the masters) `fast_bf16_step` as its step. Only that class, in bf16,
    without model parallelism, MoE parameters or the legacy fused LAMB; anything else keeps DeepSpeed's."""
    import torch

    try:
        from deepspeed.moe.utils import is_moe_param
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    needed = ("fp16_groups", "fp32_groups", "_skip_invalid_grad_norm", "_update_scale", "unscale_and_clip_grads")
    if type(optimizer) is not FP16_UnfusedOptimizer or getattr(optimizer, "low_precision_dtype", None) != torch.bfloat16 \
            or getattr(optimizer, "fused_lamb_legacy", True) or getattr(optimizer, "mpu", None) is not None \
            or getattr(optimizer, "custom_loss_scaler", True) or not all(hasattr(optimizer, n) for n in needed) \
            or any(is_moe_param(p) for group in optimizer.fp16_groups for p in group):
        return False
    optimizer.step = types.MethodType(fast_bf16_step, optimizer)
    return True


def fast_bf16_step(self: Any, closure: Any = None) -> bool:
    """FP16_UnfusedOptimizer.step for bf16, the same update: the bf16 gradients copied into fp32 ones, their
    global norm (a non-finite norm skips the step, as DeepSpeed's overflow check and its invalid-norm check
    do), the gradients scaled by DeepSpeed's own clip coefficient, the torch optimizer's step on the fp32
    masters, the masters copied back into the bf16 weights, the fp32 gradients freed.

    What it leaves out costs DeepSpeed, per step, one pass over the gradients for the overflow check (amax
    and amin of each), one fp32 copy of each for the norm (`.float().norm()`: a bf16 norm is slow on a
    CPU), and a multiply by 1.0 when no clipping is needed. The copies are torch's batched (_foreach) ops.
    Returns the overflow flag, as DeepSpeed's step does."""
    import torch

    pairs = [(p32, p16) for g32, g16 in zip(self.fp32_groups, self.fp16_groups) for p32, p16 in zip(g32, g16)]
    src, dst = [], []
    for p32, p16 in pairs:
        if p16.grad is None:
            p32.grad = torch.zeros_like(p32)  # as DeepSpeed: the optimizer still steps the parameter
        else:
            p32.grad = torch.empty_like(p32)
            src.append(p16.grad)
            dst.append(p32.grad)
    if dst:
        torch._foreach_copy_(dst, src)
    total = math.sqrt(float(_sum_of_squares(dst))) if dst else 0.0
    if not math.isfinite(total):
        return self._skip_invalid_grad_norm()
    self.overflow = False
    self._global_grad_norm = total
    self._update_scale(False)
    combined = self.unscale_and_clip_grads(total, apply_scale=False)
    if combined != 1.0:
        torch._foreach_mul_([p32.grad for p32, _ in pairs], 1.0 / combined)
    self.optimizer.step()
    torch._foreach_copy_([p16.data for _, p16 in pairs], [p32.data for p32, _ in pairs])
    for p32, _ in pairs:
        p32.grad = None
    return self.overflow


def _sum_of_squares(tensors: list[Any]) -> Any:
    """sum(t . t) over fp32 tensors, a 0-d fp32 tensor: on a CPU one dot product per tensor (half the time
    of its norm), elsewhere torch's batched norm."""
    import torch

    if tensors[0].device.type == "cpu":
        return torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).sum()
    return torch.stack(torch._foreach_norm(tensors)).square().sum()
