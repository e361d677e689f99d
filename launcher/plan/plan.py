"""Derived numbers, computed once: world size, batch arithmetic, tokens per step, trainable
parameters and the ZeRO bucket sizes.

Everything downstream (DeepSpeed JSON, training arguments, Slurm script, estimates) reads these
numbers from the Plan; none recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.spec import ClusterSpec, RunSpec, ZeroSpec
from launcher.errors import SpecError, UserError
from launcher.plan import modelinfo
from launcher.plan.modelinfo import ModelInfo
from launcher.plan.params import count_params

# DeepSpeed's own defaults, used when the model's hidden size is unknown (presets, hub ids).
DEFAULT_BUCKET = 500_000_000
DEFAULT_PREFETCH = 50_000_000
DEFAULT_PERSISTENCE = 100_000


@dataclass(frozen=True)
class ZeroBuckets:
    """Element counts of ZeRO's communication buffers, as the DeepSpeed config carries them."""

    reduce: int
    """reduce_bucket_size (every stage above 0)."""
    allgather: int
    """allgather_bucket_size (stages 1 and 2)."""
    prefetch: int
    """stage3_prefetch_bucket_size."""
    persistence: int
    """stage3_param_persistence_threshold."""


def zero_buckets(z: ZeroSpec, hidden: int | None) -> ZeroBuckets:
    """The spec's sizes where it sets them, else scaled as transformers' DeepSpeed integration scales
    them (buckets ~ hidden^2, prefetch 0.9 x hidden^2, persistence 10 x hidden), else DeepSpeed's
    defaults when the hidden size is unknown."""
    bucket = z.reduce_bucket_size or (hidden * hidden if hidden else DEFAULT_BUCKET)
    prefetch = z.stage3_prefetch_bucket_size
    persist = z.stage3_param_persistence_threshold
    return ZeroBuckets(
        reduce=bucket,
        allgather=z.allgather_bucket_size or bucket,
        prefetch=prefetch if prefetch is not None else (int(0.9 * hidden * hidden) if hidden else DEFAULT_PREFETCH),
        persistence=persist if persist is not None else (10 * hidden if hidden else DEFAULT_PERSISTENCE),
    )


@dataclass(frozen=True)
class Plan:
    nodes: int
    nproc_per_node: int
    world_size: int
    device: str  # "cuda" or "cpu": from cluster.gpus_per_node, never from the submitting host
    micro_batch: int
    grad_accum: int
    global_batch: int
    seq_len: int
    max_steps: int
    model: ModelInfo | None
    zero_buckets: ZeroBuckets
    method: str = "full"
    trainable_params: int | None = None  # what method trains, counted from config.json (None: not counted)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    def summary(self) -> list[str]:
        lines = [
            f"ranks        {self.nodes} node(s) x {self.nproc_per_node} rank(s) = world size {self.world_size} "
            f"({self.device})",
            f"batch        micro {self.micro_batch} x accumulation {self.grad_accum} x world {self.world_size} "
            f"= {self.global_batch} sequences/step",
            f"tokens       {self.global_batch} x seq_len {self.seq_len} = {self.tokens_per_step:,} tokens/step; "
            f"{self.max_steps} steps = {self.total_tokens:,} tokens",
        ]
        if self.model is not None:
            m = self.model
            n = f"{m.total_params():,} parameters" if m.counted else "parameters not counted for this architecture"
            lines.append(f"model        {m.model_type}, hidden {m.hidden_size}, {m.num_layers} layers, {n}")
        if self.trainable_params is not None:
            lines.append(f"trainable    {self.trainable_params:,} parameters ({self.method})")
        else:
            lines.append(f"trainable    not counted for this model ({self.method}); the training log gives the count")
        return lines


def _nearest_multiples(value: int, unit: int) -> list[int]:
    low = (value // unit) * unit
    return [x for x in (low, low + unit) if x > 0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ranks_per_node(cluster: ClusterSpec) -> int:
    """cluster.nproc_per_node, else one rank per GPU, else one CPU rank."""
    return cluster.nproc_per_node or (cluster.gpus_per_node if cluster.gpus_per_node > 0 else 1)


def make_plan(spec: RunSpec) -> Plan:
    c, o = spec.cluster, spec.optim
    nproc = ranks_per_node(c)
    world = c.nodes * nproc
    seq = spec.data.seq_len
    micro = o.micro_batch
    unit = micro * world

    if o.global_batch_tokens is not None:
        if o.global_batch_tokens % seq:
            near = ", ".join(f"{x:,}" for x in _nearest_multiples(o.global_batch_tokens, seq))
            raise SpecError(f"optim.global_batch_tokens={o.global_batch_tokens:,} is not a multiple of data.seq_len={seq} "
                            f"({o.global_batch_tokens} / {seq} = {o.global_batch_tokens / seq:.4g} sequences); "
                            f"nearest valid values: {near}")
        global_batch = o.global_batch_tokens // seq
        field = f"optim.global_batch_tokens={o.global_batch_tokens:,} (= {global_batch} sequences of {seq})"
    elif o.global_batch is not None:
        global_batch = o.global_batch
        field = f"optim.global_batch={global_batch}"
    else:
        global_batch = unit  # no accumulation

    if global_batch % unit:
        near = " or ".join(str(x) for x in _nearest_multiples(global_batch, unit))
        msg = (f"{field} is not divisible by micro_batch x world size = {micro} x {world} = {unit} "
               f"({global_batch} / {unit} = {global_batch / unit:.4g}); nearest valid global batches: {near}")
        if global_batch % world == 0:
            per_rank = global_batch // world
            msg += f"; or a micro batch that divides the {per_rank} sequences per rank: " \
                   f"{', '.join(map(str, _divisors(per_rank)[:12]))}"
        else:
            msg += f"; {global_batch} sequences cannot be split evenly over {world} ranks"
        raise SpecError(msg)

    model = modelinfo.load(spec.model.name)
    if model is not None and model.max_positions and seq > model.max_positions:
        raise SpecError(f"data.seq_len={seq} exceeds the model's max_position_embeddings={model.max_positions} "
                        f"({model.source}); use --seq-len {model.max_positions} or less")

    return Plan(
        nodes=c.nodes,
        nproc_per_node=nproc,
        world_size=world,
        device="cuda" if c.gpus_per_node > 0 else "cpu",
        micro_batch=micro,
        grad_accum=global_batch // unit,
        global_batch=global_batch,
        seq_len=seq,
        max_steps=o.max_steps,
        model=model,
        zero_buckets=zero_buckets(spec.zero, model.hidden_size if model is not None else None),
        method=spec.method.name,
        trainable_params=_trainable(model, spec),
    )


def _trainable(model: ModelInfo | None, spec: RunSpec) -> int | None:
    """The trainable-parameter count of spec.method (params.count_params, the numbers peft itself
    reports); None where config.json alone cannot tell (another architecture, unknown target modules:
    pre-flight says why)."""
    if model is None or not model.counted:
        return None
    try:
        return count_params(model, spec).trainable
    except UserError:
        return None


def unsupported_precision(spec: RunSpec, plan: Plan) -> str | None:
    """Why the plan's device cannot run the spec's precision, or None. Pre-flight reports it, and every
    rank checks it again before DeepSpeed starts (the bench's job array and a hand-written run dir
    reach the ranks without pre-flight)."""
    if plan.device == "cpu" and spec.precision.dtype == "fp16":
        return ("precision.dtype=fp16 does not run on CPU ranks (cluster.gpus_per_node=0: DeepSpeed has no "
                "CPU fp16 kernels); use --precision fp32 or bf16, or --gpus-per-node N")
    return None
