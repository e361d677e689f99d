"""RunSpec + Plan -> DeepSpeed config dict. Pure: the same inputs give the same dict, and every
derived number (batch, buckets) is copied from the Plan, none computed here.

Every number is explicit (no "auto"), so the file works with the plain `deepspeed` CLI as well as
with transformers' Trainer. The LR schedule is not in it: it belongs to the training arguments
(transformers' scheduler, see rank/loop.py).
"""

from __future__ import annotations

from typing import Any

from launcher.config.resolve import deep_merge
from launcher.config.spec import RunSpec, merged_zero
from launcher.plan.memory import ZERO3_SUB_GROUP
from launcher.plan.plan import Plan, ZeroBuckets, zero_buckets

_DTYPE_NAMES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _offload(device: str, nvme_path: str | None, *, optimizer: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        cfg["nvme_path"] = nvme_path
        cfg["buffer_count"] = 4 if optimizer else 5
        if not optimizer:
            cfg["buffer_size"] = 100_000_000
            cfg["max_in_cpu"] = 1_000_000_000
    return cfg


def zero_section(spec: RunSpec, buckets: ZeroBuckets, stage: int) -> dict[str, Any]:
    z = spec.zero
    cfg: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return cfg
    cfg.update(
        overlap_comm=z.overlap_comm,
        contiguous_gradients=z.contiguous_gradients,
        reduce_bucket_size=buckets.reduce,
        reduce_scatter=True,
    )
    if stage in (1, 2):
        cfg["allgather_partitions"] = True
        cfg["allgather_bucket_size"] = buckets.allgather
    if z.offload_optimizer != "none":
        cfg["offload_optimizer"] = _offload(z.offload_optimizer, z.nvme_path, optimizer=True)
    if stage == 3:
        if z.offload_param != "none":
            cfg["offload_param"] = _offload(z.offload_param, z.nvme_path, optimizer=False)
        cfg.update(
            stage3_prefetch_bucket_size=buckets.prefetch,
            stage3_param_persistence_threshold=buckets.persistence,
            stage3_max_live_parameters=z.stage3_max_live_parameters,
            stage3_max_reuse_distance=z.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=z.gather_16bit_weights_on_save,
            sub_group_size=ZERO3_SUB_GROUP,
        )
    return cfg


def optimizer_section(spec: RunSpec, plan: Plan | None) -> dict[str, Any]:
    o = spec.optim
    params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    # The optimizer the plan chose (plan.choose_optimizer): torch's fused AdamW on every device, CPU ranks
    # included; with optimizer offload DeepSpeed runs its CPU Adam whatever the section says. A preset (no
    # plan) says torch's AdamW, which needs no compiled DeepSpeed op, and leaves `fused` to the plan.
    if merged_zero(spec.zero, []).offload_optimizer == "none":
        params["torch_adam"] = True
        if plan is not None:
            params["fused"] = True
    return {"type": "AdamW", "params": params}


def precision_sections(spec: RunSpec, dtype: str) -> dict[str, Any]:
    p = spec.precision
    fp16: dict[str, Any] = {"enabled": dtype == "fp16"}
    if dtype == "fp16":
        fp16.update(loss_scale=0, initial_scale_power=p.initial_scale_power, loss_scale_window=p.loss_scale_window,
                    hysteresis=p.hysteresis, min_loss_scale=p.min_loss_scale)
    return {"bf16": {"enabled": dtype == "bf16"}, "fp16": fp16}


def render(spec: RunSpec, plan: Plan | None, *, preset: bool = False) -> dict[str, Any]:
    """The DeepSpeed config. `preset=True` leaves out train_batch_size (DeepSpeed derives it from
    micro batch x accumulation x the world size it runs at) and model-specific sizes."""
    micro = plan.micro_batch if plan else spec.optim.micro_batch
    accum = plan.grad_accum if plan else 1
    cfg: dict[str, Any] = {}
    if not preset:
        assert plan is not None
        cfg["train_batch_size"] = plan.global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["gradient_clipping"] = spec.optim.grad_clip
    # A preset has no plan: its spec states the stage and precision (nothing is left auto).
    cfg.update(precision_sections(spec, plan.precision if plan is not None else str(spec.precision.dtype)))
    # A preset has no model: the buckets the plan gives an unknown hidden size (DeepSpeed's defaults).
    buckets = plan.zero_buckets if plan is not None and not preset else zero_buckets(spec.zero, None)
    cfg["zero_optimization"] = zero_section(spec, buckets, plan.zero_stage if plan is not None else int(spec.zero.stage))
    cfg["optimizer"] = optimizer_section(spec, None if preset else plan)
    # No "scheduler": the LR schedule is transformers' (rank/loop.py, HF_SCHEDULERS), exactly its lr at every
    # step; DeepSpeed's schedulers lag it by one step and have no equivalent of its cosine. zero.extra can
    # still add a DeepSpeed "scheduler" section, which then runs instead.
    if spec.zero.comm_dtype:
        cfg["communication_data_type"] = _DTYPE_NAMES[spec.zero.comm_dtype]
    if spec.model.grad_ckpt:
        # Read by DeepSpeed's own checkpointing API; the model itself checkpoints through
        # transformers (non-reentrant), so activations are neither partitioned nor moved to CPU.
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False, "number_checkpoints": None,
                                           "synchronize_checkpoint_boundary": False, "profile": False}
    cfg["steps_per_print"] = max(spec.optim.max_steps, 1) * 1000  # our own loop logs every step
    cfg["wall_clock_breakdown"] = spec.zero.wall_clock_breakdown
    if spec.zero.extra:
        cfg = deep_merge(cfg, spec.zero.extra)
    return cfg
