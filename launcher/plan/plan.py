"""Derived numbers, computed once: world size, batch arithmetic, tokens per step, trainable
parameters, the ZeRO bucket sizes, and what each `auto` of the spec becomes (ZeRO stage, precision,
loss) with the reason, plus the optimizer the device runs fastest.

Everything downstream (DeepSpeed JSON, training arguments, Slurm script, estimates) reads these
numbers from the Plan; none recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from launcher.config.profiles import mem_mib
from launcher.config.resolve import with_overrides
from launcher.config.spec import (PROMPT_METHODS, TRL_CLASSES, ClusterSpec, RunSpec, ZeroSpec, merged_zero,
                                  sequences_per_example)
from launcher.errors import SpecError, UserError
from launcher.plan import hardware, memory, modelinfo
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
    zero_stage: int = 0
    precision: str = "fp32"  # bf16 | fp16 | fp32
    loss: str = "standard"  # standard | chunked | liger
    optimizer: str = "torch AdamW"
    sequences: int = 1  # sequences per example: 2 for preference tasks (chosen and rejected)
    choices: tuple[str, ...] = ()  # one line per decision: what it is and why
    cpus_per_rank: int | None = None  # CPU cores each rank gets (OMP_NUM_THREADS); None: Slurm's default
    mem_per_node: str | None = None  # Slurm --mem of the training job ("0" = all of the node's); None: the default

    def setup(self, stage: int | None = None, loss: str | None = None) -> memory.Setup:
        """The plan's choices as the memory model takes them (another stage or loss to size that one)."""
        return memory.Setup(self.zero_stage if stage is None else stage, self.precision,
                            self.loss if loss is None else loss, self.world_size, self.nproc_per_node,
                            self.zero_buckets)

    def following(self, ds_config: dict[str, Any]) -> "Plan":
        """This plan with the ZeRO stage and precision the run dir's ds_config.json records: a rank
        follows the decision made where the run dir was created (its CPU flags may differ), and a
        hand-edited file."""
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        prec = ("bf16" if ds_config.get("bf16", {}).get("enabled") else
                "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")
        return replace(self, zero_stage=stage, precision=prec)

    @property
    def compiles_ops(self) -> bool:
        """The ranks JIT-compile a DeepSpeed op (its CPU Adam) into TORCH_EXTENSIONS_DIR on first use."""
        return self.optimizer.startswith("DeepSpeed")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.sequences * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    def summary(self) -> list[str]:
        lines = [
            f"ranks        {self.nodes} node(s) x {self.nproc_per_node} rank(s) = world size {self.world_size} "
            f"({self.device})",
            f"batch        micro {self.micro_batch} x accumulation {self.grad_accum} x world {self.world_size} "
            f"= {self.global_batch} {'examples (pairs)' if self.sequences > 1 else 'sequences'}/step",
            f"tokens       {self.global_batch}{' x ' + str(self.sequences) + ' sequences' if self.sequences > 1 else ''}"
            f" x seq_len {self.seq_len} = {self.tokens_per_step:,} tokens/step; "
            f"{self.max_steps} steps = {self.total_tokens:,} tokens",
        ]
        if self.model is not None:
            m = self.model
            n = f"{m.total_params():,} parameters" if m.counted else "parameters not counted for this architecture"
            lines.append(f"model        {m.model_type}, hidden {m.hidden_size}, {m.num_layers} layers, {n}")
            lines.append(f"config       {m.describe_origin()}")
        if self.cpus_per_rank or self.mem_per_node or self.device == "cuda":
            # what each rank gets from the scheduler; a CPU run that asks for nothing has nothing to say
            lines.append(self.host_line())
        if self.trainable_params is not None:
            lines.append(f"trainable    {self.trainable_params:,} parameters ({self.method})")
        else:
            lines.append(f"trainable    not counted for this model ({self.method}); the training log gives the count")
        return lines + list(self.choices)


    def host_line(self) -> str:
        """The CPUs and host memory each rank gets, and where they come from."""
        cpus = (f"{self.cpus_per_rank} CPU core(s) per rank (OMP_NUM_THREADS={self.cpus_per_rank})"
                if self.cpus_per_rank else "CPUs per rank: Slurm's default (one per task unless the site says more)")
        if self.mem_per_node == "0":
            mem = f"all of each node's memory, shared by {self.nproc_per_node} rank(s)"
        elif self.mem_per_node:
            per_rank = mem_mib(self.mem_per_node) / self.nproc_per_node / 1024
            mem = f"{self.mem_per_node} per node = {per_rank:,.1f} GiB per rank"
        else:
            mem = "memory: Slurm's default"
        return f"host         {cpus}; {mem}"


def host_resources(c: ClusterSpec, nproc: int) -> tuple[int | None, str | None]:
    """(CPU cores per rank, --mem per node) of the training job. What the spec states wins; a GPU job
    otherwise gets its node's share from the cluster profile (cpus_per_node / ranks, mem_per_node, or
    --mem=0 on exclusive nodes): with one torchrun task per node, Slurm's default is one CPU for all
    the node's ranks, NCCL's threads and the data loaders."""
    gpu = c.gpus_per_node > 0
    cpus = c.cpus_per_task
    if cpus is None and gpu and c.cpus_per_node:
        cpus = max(1, c.cpus_per_node // nproc)
    mem = c.mem
    if mem is None and gpu:
        mem = "0" if c.exclusive else c.mem_per_node
    return cpus, mem


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

    model = modelinfo.load_for(spec)
    if model is not None and model.max_positions and seq > model.max_positions:
        raise SpecError(f"data.seq_len={seq} exceeds the model's max_position_embeddings={model.max_positions} "
                        f"({model.source}); use --seq-len {model.max_positions} or less")

    plan = Plan(
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
        sequences=sequences_per_example(spec.task),
    )
    cpus, mem = host_resources(c, nproc)
    return _choose(spec, replace(plan, cpus_per_rank=cpus, mem_per_node=mem))


def settled(spec: RunSpec, plan: Plan | None = None) -> RunSpec:
    """`spec` with each `auto` the plan decides replaced by its choice (ZeRO stage, precision, loss), for
    the code that builds the model and its trainer from the spec."""
    if plan is None and "auto" not in (spec.zero.stage, spec.precision.dtype, spec.optim.loss):
        return spec  # already concrete (the rank's and eval's spec, settled once): no second plan
    plan = plan or make_plan(spec)
    if (spec.zero.stage, spec.precision.dtype, spec.optim.loss) == (plan.zero_stage, plan.precision, plan.loss):
        return spec
    return with_overrides(spec, {"zero": {"stage": plan.zero_stage}, "precision": {"dtype": plan.precision},
                                 "optim": {"loss": plan.loss}})


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
    if plan.device == "cpu" and plan.precision == "fp16":
        return ("precision.dtype=fp16 does not run on CPU ranks (cluster.gpus_per_node=0: DeepSpeed has no "
                "CPU fp16 kernels); use --precision fp32 or bf16, or --gpus-per-node N")
    return None


# --------------------------------------------------------------------------- the choices behind `auto`

FIT_MARGIN = 0.85
"""`zero.stage: auto` takes a stage whose estimated peak is within this share of the device's memory:
the rest is for what the estimate leaves out (CUDA context and allocator fragmentation, NCCL buffers,
the data loader)."""

LOGITS_SHARE = 0.25
"""`optim.loss: auto` takes the chunked loss when the standard loss's logits would be at least this
share of the activation memory (saved activations + logits peak): there the logits are worth not
holding, at the cost of nothing (each chunk's gradient is computed as its logits are)."""


def _choose(spec: RunSpec, plan: Plan) -> Plan:
    prec, why_prec = choose_precision(spec, plan.device)
    plan = replace(plan, precision=prec)
    loss, why_loss = choose_loss(spec, plan)
    plan = replace(plan, loss=loss)
    stage, why_stage = choose_stage(spec, plan)
    plan = replace(plan, zero_stage=stage)
    opt, why_opt = choose_optimizer(spec, plan)
    return replace(plan, optimizer=opt, choices=(
        f"precision    {prec}: {why_prec}",
        f"ZeRO stage   {stage}: {why_stage}",
        f"loss         {loss}: {why_loss}",
        f"optimizer    {opt}: {why_opt}",
    ))


def choose_precision(spec: RunSpec, device: str) -> tuple[str, str]:
    d = spec.precision.dtype
    if d != "auto":
        return d, "set in the spec"
    qc = spec.method.quant.compute_dtype
    if spec.method.name == "qlora" and qc != "auto":
        return qc, "auto: method.quant.compute_dtype"
    if device == "cuda":
        gpu = spec.cluster.gpu_type
        if gpu and hardware.NO_BF16.search(gpu):
            return "fp16", f"auto: the {gpu} has no bf16 arithmetic (fp16 with loss scaling)"
        return "bf16", f"auto: the {gpu or 'GPU'} runs bf16 on its tensor cores"
    flag = hardware.cpu_bf16_flag()
    if flag:
        return "bf16", f"auto: this CPU has {flag} (fast bf16 matmuls; DeepSpeed keeps an fp32 master copy)"
    if spec.method.name == "qlora" or spec.model.attn == "flash2":
        return "bf16", f"auto: method {spec.method.name} / attention {spec.model.attn} computes in 16 bits"
    return "fp32", "auto: this CPU has no amx_bf16 or avx512_bf16 (bf16 would be emulated, slower than fp32)"


def choose_loss(spec: RunSpec, plan: Plan) -> tuple[str, str]:
    if spec.task in TRL_CLASSES:  # the spec refuses chunked and liger for these tasks
        return "standard", (f"the {spec.task} task: TRL's {TRL_CLASSES[spec.task][1]} computes its own loss "
                            f"from both sequences' log-probs (optim.loss does not apply)")
    kind = spec.optim.loss
    if kind != "auto":
        return kind, "set in the spec"
    if plan.device == "cuda" and liger_importable():
        return "liger", "auto: CUDA and the liger-kernel package are there (fused kernels)"
    m = plan.model
    if m is None or not m.counted:
        return "standard", "auto: the model's shapes are unknown here, so the logits' share is too"
    if m.scaled_logits:
        return "standard", f"auto: the model's config sets {m.scaled_logits} (the chunked loss computes plain logits)"
    tokens, chunk = plan.micro_batch * plan.seq_len, spec.optim.loss_chunk_tokens
    s = plan.setup(loss="standard")
    saved, _, logits, _ = memory.activation_bytes(m, spec, s, plan.micro_batch, plan.seq_len)
    share = logits / max(1, saved + logits)
    if share < LOGITS_SHARE:
        return "standard", f"auto: the logits are {share:.0%} of the activation memory (< {LOGITS_SHARE:.0%})"
    if tokens <= chunk:
        return "standard", (f"auto: the micro batch's {tokens:,} tokens fit in one {chunk:,}-token chunk "
                            f"(optim.loss_chunk_tokens), nothing to save")
    chunked = memory.logits_bytes(m, spec, plan.precision, "chunked", tokens)
    return "chunked", (f"auto: the full logits would be {share:.0%} of the activation memory (>= {LOGITS_SHARE:.0%}); "
                       f"{chunk:,}-token chunks hold {chunked / 2**20:,.0f} MiB of them instead of "
                       f"{logits / 2**20:,.0f} MiB")


def liger_importable() -> bool:
    """Whether the liger-kernel package is installed here (found, not imported: no torch)."""
    import importlib.util

    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):  # a broken installation (a module without a spec)
        return False


def device_memory(spec: RunSpec, plan: Plan) -> tuple[int | None, str]:
    """Memory of one rank's device: the GPU model's (cluster.gpu_type), or this host's memory shared by
    its ranks on CPU; with where it comes from."""
    if plan.device == "cuda":
        dev = hardware.find(spec.cluster.gpu_type)
        if dev is not None:
            return dev.memory_bytes, dev.key
        default = hardware.DEVICES["H100-80GB"]
        return default.memory_bytes, f"{default.key} assumed (no known cluster.gpu_type)"
    host = hardware.host_memory_bytes()
    return (None, "unknown") if host is None else (host // plan.nproc_per_node,
                                                   f"this host's memory / {plan.nproc_per_node} rank(s)")


def choose_stage(spec: RunSpec, plan: Plan) -> tuple[int, str]:
    z = merged_zero(spec.zero, [])  # offload set through zero.extra counts too
    if z.stage != "auto":
        return int(z.stage), "set in the spec"
    if z.offload_param != "none":
        return 3, "auto: parameter offload needs stage 3"
    allowed = [0, 1, 2, 3]
    if z.offload_optimizer != "none":
        allowed.remove(0)
    if spec.method.name in PROMPT_METHODS or spec.model.compile:
        allowed.remove(3)
    if plan.world_size == 1:
        return allowed[0], "auto: one rank, nothing to shard"
    m = plan.model
    if m is None or not m.counted:
        return 2, "auto: the model's size is unknown here; stage 2 shards gradients and optimizer states"
    mem, where = device_memory(spec, plan)
    p = count_params(m, spec)
    peaks = {k: memory.peak(m, spec, plan.setup(stage=k), p, plan.micro_batch, plan.seq_len).total for k in allowed}
    if mem is None:
        return 2 if 2 in allowed else allowed[-1], "auto: the device's memory is unknown here"
    for k in allowed:
        if peaks[k] <= FIT_MARGIN * mem:
            return k, (f"auto: the lowest stage whose estimate, {peaks[k] / 2**30:.2f} GiB per rank, is within "
                       f"{FIT_MARGIN:.0%} of {mem / 2**30:.1f} GiB ({where}) at world size {plan.world_size}")
    k = allowed[-1]
    return k, (f"auto: no stage fits {FIT_MARGIN:.0%} of {mem / 2**30:.1f} GiB ({where}); stage {k} needs the least, "
               f"{peaks[k] / 2**30:.2f} GiB per rank (pre-flight checks the fit)")


def choose_optimizer(spec: RunSpec, plan: Plan) -> tuple[str, str]:
    """AdamW as the device runs it fastest, all exact (fp32 arithmetic on fp32 states)."""
    if merged_zero(spec.zero, []).offload_optimizer != "none":
        return "DeepSpeed CPUAdam", ("the optimizer runs on the CPU (offload): DeepSpeed's AVX-512 Adam (a resume "
                                      "matches an uninterrupted run to rounding, not bitwise: README)")
    if plan.device == "cuda":
        return "torch fused AdamW", ("one fused CUDA kernel over all tensors, as fast as DeepSpeed's FusedAdam "
                                     "and with no op to compile on the nodes")
    return "torch fused AdamW", ("torch's fused CPU kernel, as fast as DeepSpeed's AVX-512 Adam, and exact on "
                                 "resume: it takes Adam's bias correction from the step count, where DeepSpeed's "
                                 "kernel multiplies it up step by step and starts again from pow() after a resume")
