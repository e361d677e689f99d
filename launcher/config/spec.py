"""The run spec's schema: one typed, immutable description of a run, its combination checks and the
text of its errors. `validate` turns a merged tree into a RunSpec; the layers are merged in
launcher/config/resolve.py.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictInt, ValidationError, field_validator,
                      model_validator)

from launcher import yamlio
from launcher.errors import SpecError

Task = Literal["pretrain", "sft", "dpo", "orpo", "kto", "simpo", "rm"]
# Preference tuning on TRL's trainers: pairs {prompt, chosen, rejected} (KTO: {prompt, completion, label}).
PREFERENCE_TASKS = ("dpo", "orpo", "kto", "simpo", "rm")
# Each preference task's TRL trainer and config: (module, trainer class, config class), imported by the ranks
# (rank/preference.py) and named by the plan
TRL_CLASSES = {"dpo": ("trl", "DPOTrainer", "DPOConfig"), "kto": ("trl", "KTOTrainer", "KTOConfig"),
               "rm": ("trl", "RewardTrainer", "RewardConfig"),
               "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
               "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig")}
# The methods a preference task trains with (the LoRA family keeps the reference as the base with the adapter
# disabled; full keeps none in the training job when the reference log-probs are precomputed).
PREFERENCE_METHODS = ("full", "lora", "qlora", "dora")  # orpo, kto, simpo, rm: verified with TRL's trainers here
# dpo: every method (IA3, prefix and prompt tuning through peft_config, freeze like full), each trained on a CPU rank


def sequences_per_example(task: str) -> int:
    """Sequences one training example puts through the model: 2 for a preference task (chosen and rejected in one
    batch; KTO's completion and the mismatched completion of its KL term), else 1. Tokens/s, $ per 1M tokens and
    the activation memory count them all."""
    return 2 if task in PREFERENCE_TASKS else 1


def reference_mode(spec: "RunSpec") -> str:
    """How a task's loss gets its reference: 'none' (orpo, simpo, rm need none), 'adapter' (the base with the
    adapter disabled), 'precomputed' (full dpo: log-probs computed before training by their own job) or
    'in_memory' (a frozen copy in the training job: pref.reference=in_memory, and full kto)."""
    if spec.task not in ("dpo", "kto"):
        return "none"
    if spec.method.name in PEFT_METHODS:
        return "adapter"
    if spec.task == "kto" or spec.pref.reference == "in_memory":
        return "in_memory"
    return "precomputed"
MethodName = Literal["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "freeze"]
PEFT_METHODS = ("lora", "qlora", "dora", "ia3", "prefix", "prompt")  # trained through peft (final/ is an adapter)
PROMPT_METHODS = ("prefix", "prompt")  # virtual tokens before the input (peft prompt learning)
# Adapters that add into the base weights (peft's merge_and_unload): the LoRA family and IA3; prefix/prompt
# tuning keep virtual tokens apart from the weights, full and freeze train the weights themselves.
MERGEABLE_METHODS = tuple(m for m in PEFT_METHODS if m not in PROMPT_METHODS)
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
LossKind = Literal["auto", "standard", "chunked", "liger"]
Attn = Literal["auto", "flash2", "sdpa", "eager"]
Offload = Literal["none", "cpu", "nvme"]
# Numbers as typed: `true` is not 1 and "4" is not 4 (pydantic's lax mode takes both); a float field takes an
# int (2 means 2.0) but neither inf nor nan, which no consumer of a spec number accepts.
Int = StrictInt
Float = Annotated[float, Strict(), AllowInfNan(False)]
SEED_MAX = 2**32 - 1  # torch.manual_seed and numpy's seed take 0 .. 2**32 - 1
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class _Shorthand(_Section):
    """A section that may be written as one string, the value of its main field: `model: NAME` is
    `model: {name: NAME}`."""

    main_field: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {cls.main_field: v} if isinstance(v, str) else v


class ModelSpec(_Shorthand):
    main_field: ClassVar[str] = "name"

    name: str = Field("tiny", description="'tiny' (embedded), a local model directory, or a hub id")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code")
    attn: Attn = Field("auto", description="attention kernel: auto takes flash2 when usable, else sdpa")
    grad_ckpt: bool = Field(False, description="gradient checkpointing (non-reentrant)")
    compile: bool = Field(False, description="torch.compile each decoder block (the first steps pay the compile)")


class SourceSpec(_Section):
    """One source of a pretraining mixture (data.sources): its own files and share of the tokens."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="short name (letters, digits, . _ -): shown in plan.txt, metrics and eval")
    path: str = Field(..., min_length=1, description="file, folder or glob of jsonl/json/parquet/csv/txt files")
    weight: Float = Field(..., gt=0, description="share of the training tokens (normalized over the sources)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "txt"] | None = Field(
        None, description="none = data.format")
    text_field: str | None = Field(None, description="none = data.text_field")
    eval_fraction: Float | None = Field(None, ge=0.0, lt=1.0, description="held-out share; none = data.eval_fraction")


class StageSpec(_Section):
    """A stretch of the run with its own mixture (annealing): these weights until `until_step`."""

    until_step: Int = Field(..., ge=1, description="the stage covers the steps before this one")
    weights: dict[str, Float] = Field(..., min_length=1, description="source name -> weight (missing: 0)")


class DataSpec(_Section):
    path: str | None = Field(None, description="file, folder or datasets hub name; none = embedded corpus")
    sources: list[SourceSpec] = Field(default_factory=list, description="a pretraining mixture of weighted sources "
                                      "(instead of path), prepared into memory-mapped token shards")
    stages: list[StageSpec] = Field(default_factory=list, description="mixture weights per stretch of steps; "
                                    "after the last stage its weights stay")
    doc_mask: bool = Field(False, description="pretrain: position ids restart at each document start in a block, "
                           "so documents do not attend to each other")
    shard_mb: Float = Field(64.0, gt=0, description="mixture sources: input bytes per token shard (a unit of "
                            "preparation work)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "txt", "hub"] = "auto"
    split: str = "train"
    seq_len: Int = Field(512, ge=8, le=1 << 20, description="tokens per training sequence")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = Field("chosen", description="preference tasks: the preferred response (string or messages)")
    rejected_field: str = Field("rejected", description="preference tasks: the dispreferred response")
    completion_field: str = Field("completion", description="kto: the response a label judges")
    label_field: str = Field("label", description="kto: true when the completion is desirable")
    packing: bool = Field(False, description="SFT: pack examples into seq_len, attention kept per example")
    eval_fraction: Float = Field(0.0, ge=0.0, lt=1.0, description="held-out share for evaluation")
    num_proc: Int | None = Field(None, ge=1, description="tokenizer processes; none = chosen by size")
    cache_dir: str | None = Field(None, description="tokenized-data cache; none = $LAUNCHER_CACHE/data or ~/.cache/launcher/data")

    @model_validator(mode="after")
    def _mixture(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.sources: names must be unique; {', '.join(dup)} appear(s) more than once")
        if self.sources and self.path is not None:
            raise ValueError("data.path and data.sources are both set; data.path is the one-source shorthand: "
                             "keep one of them")
        if self.stages and not self.sources:
            raise ValueError("data.stages needs data.sources (stages set mixture weights per source)")
        last = 0
        for i, st in enumerate(self.stages):
            if st.until_step <= last:
                raise ValueError(f"data.stages[{i}].until_step={st.until_step} must be greater than the previous "
                                 f"stage's ({last}): stages run in increasing step order")
            last = st.until_step
            unknown = sorted(set(st.weights) - set(names))
            if unknown:
                raise ValueError(f"data.stages[{i}].weights names {', '.join(unknown)}, not in data.sources "
                                 f"({', '.join(names)})")
            bad = [k for k, w in st.weights.items() if w < 0]
            if bad or not any(w > 0 for w in st.weights.values()):
                raise ValueError(f"data.stages[{i}].weights: weights must be >= 0 with at least one positive")
        return self


class LoraSpec(_Section):
    r: Int = Field(16, ge=1, le=4096)
    alpha: Float = Field(32, gt=0)
    dropout: Float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)


class QuantSpec(_Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16"] = Field("auto", description="auto = precision.dtype")


class PrefixSpec(_Section):
    num_virtual_tokens: Int = Field(20, ge=1, le=4096, description="key/value vectors prepended in every layer")
    projection: bool = Field(False, description="produce the prefix through a 2-layer MLP (more trainable parameters)")
    projection_hidden: Int | None = Field(None, ge=1, description="the MLP's hidden size; none = the prefix width "
                                                                  "(key/value heads x head dim)")


class PromptSpec(_Section):
    num_virtual_tokens: Int = Field(20, ge=1, le=4096, description="trainable embeddings prepended to the input")
    init: Literal["vocab", "random", "text"] = Field("vocab", description="start from random vocabulary rows, "
                                                     "random values, or the embeddings of init_text")
    init_text: str | None = Field(None, description="text whose token embeddings start the virtual tokens (init: text)")

    @model_validator(mode="before")
    @classmethod
    def _text_implies_init(cls, v: Any) -> Any:
        # `init_text: ...` alone means init from it; an explicit other init is a contradiction, refused below.
        if isinstance(v, dict) and v.get("init_text") and "init" not in v:
            return {**v, "init": "text"}
        return v

    @model_validator(mode="after")
    def _text_given(self) -> "PromptSpec":
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init 'text' needs method.prompt.init_text (the text whose embeddings start the prompt)")
        if self.init != "text" and self.init_text:
            raise ValueError(f"init_text is set but init is {self.init!r}; drop init_text or set init: text")
        return self


class IA3Spec(_Section):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1,
                                      description="linear layers whose activations get a learned scale")
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"],
                                           description="of those, the ones scaled at their input (feed-forward)")

    @model_validator(mode="after")
    def _ff_subset(self) -> "IA3Spec":
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                             f"a feed-forward module must also be a target")
        return self


class FreezeSpec(_Section):
    train_modules: list[str] = Field(default_factory=list, description="parameter names that train, dotted, "
                                     "matched as whole name parts with * wildcards: lm_head, norm, 'layers.*.mlp'")
    top_layers: Int = Field(0, ge=0, description="also train the last N decoder layers")

    @field_validator("train_modules")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pat in v:
            if not re.fullmatch(r"[A-Za-z0-9_*?\[\]-]+(\.[A-Za-z0-9_*?\[\]-]+)*", pat):
                raise ValueError(f"{pat!r} is not a dotted module name (e.g. lm_head, model.norm, layers.*.mlp)")
        return v


class MethodSpec(_Shorthand):
    main_field: ClassVar[str] = "name"

    name: MethodName = Field("full", description="full, lora, qlora, dora (LoRA + weight decomposition), ia3, "
                                                 "prefix (prefix tuning), prompt (prompt tuning), freeze")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="lora, qlora and dora")
    quant: QuantSpec = Field(default_factory=QuantSpec, description="qlora")
    prefix: PrefixSpec = Field(default_factory=PrefixSpec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    ia3: IA3Spec = Field(default_factory=IA3Spec)
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)


class PrefSpec(_Section):
    """Preference tuning (task dpo, orpo, kto, simpo, rm) on TRL's trainers."""

    beta: Float = Field(0.1, gt=0, description="dpo/kto: deviation from the reference; orpo: the odds-ratio weight "
                        "(lambda); simpo: the reward scale")
    simpo_gamma: Float = Field(0.5, ge=0, description="simpo: the target reward margin (gamma / beta)")
    reference: Literal["auto", "precomputed", "in_memory"] = Field(
        "auto", description="dpo/kto with method full: the reference log-probs computed by their own job before "
        "training and cached (precomputed; what auto picks), or a frozen copy in the training job (in_memory). "
        "LoRA-family methods use the base with the adapter disabled either way")


class OptimSpec(_Section):
    lr: Float = Field(2e-5, gt=0, lt=10)
    min_lr_ratio: Float = Field(0.1, ge=0, le=1, description="cosine floor as a share of lr")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Int = Field(0, ge=0)
    weight_decay: Float = Field(0.0, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.95)
    eps: Float = Field(1e-8, gt=0)
    grad_clip: Float = Field(1.0, ge=0, description="0 = no clipping")
    max_steps: Int = Field(100, ge=1)
    micro_batch: Int = Field(1, ge=1, le=65536, description="sequences per rank per forward pass")
    global_batch: Int | None = Field(None, ge=1, description="sequences per optimizer step, all ranks")
    global_batch_tokens: Int | None = Field(None, ge=1, description="tokens per optimizer step")
    seed: Int = Field(42, ge=0, le=SEED_MAX, description="0 .. 2**32-1 (what torch and numpy accept)")
    loss: LossKind = Field("auto", description="the LM loss: standard (full logits), chunked (the LM head and "
                           "cross-entropy over token chunks, never the whole logits), liger (Liger Kernel's fused "
                           "kernels, CUDA), auto (liger where it can run, else chunked when the logits are a large "
                           "share of memory, else standard)")
    loss_chunk_tokens: Int = Field(1024, ge=16, le=1 << 20, description="tokens per chunk of the chunked loss "
                                   "(one chunk's fp32 logits exist at a time)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class PrecisionSpec(_Shorthand):
    main_field: ClassVar[str] = "dtype"

    dtype: Dtype = Field("auto", description="auto: bf16 where the device runs it fast (CUDA GPUs with bf16, CPUs "
                         "with AMX or AVX512-BF16), fp32 otherwise")
    initial_scale_power: Int = Field(16, ge=0, le=32, description="fp16: initial loss scale 2^N")
    loss_scale_window: Int = Field(1000, ge=1)
    hysteresis: Int = Field(2, ge=1)
    min_loss_scale: Float = Field(1, gt=0)


class ZeroSpec(_Section):
    stage: Literal["auto", 0, 1, 2, 3] = Field("auto", description="auto: the lowest stage whose memory estimate "
                                                "fits the device with a margin at the run's world size")

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # Literal[1] takes True
            raise ValueError("a ZeRO stage is auto, 0, 1, 2 or 3, not true/false")
        return v
    offload_optimizer: Offload = "none"
    offload_param: Offload = "none"
    nvme_path: str | None = Field(None, description="local NVMe folder for nvme offload")
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: Int | None = Field(None, ge=1, description="none = hidden_size^2 when known")
    allgather_bucket_size: Int | None = Field(None, ge=1)
    stage3_prefetch_bucket_size: Int | None = Field(None, ge=0)
    stage3_param_persistence_threshold: Int | None = Field(None, ge=0)
    stage3_max_live_parameters: Int = Field(1_000_000_000, ge=1)
    stage3_max_reuse_distance: Int = Field(1_000_000_000, ge=0)
    gather_16bit_weights_on_save: bool = True
    comm_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(None, description="gradient all-reduce dtype")
    wall_clock_breakdown: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed keys merged last")


class NcclSpec(_Section):
    ib_hca: str | None = Field(None, description="NCCL_IB_HCA, e.g. mlx5")
    debug: Literal["", "VERSION", "WARN", "INFO", "TRACE"] = "WARN"
    async_error_handling: bool = True
    timeout_s: Int = Field(1800, ge=10, description="collective timeout before a rank gives up")


class ContainerSpec(_Section):
    runtime: Literal["pyxis", "apptainer"] = "pyxis"
    image: str
    mounts: list[str] = Field(default_factory=list)


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class PrepSpec(_Section):
    """The CPU job that tokenizes and packs the data before training (`launcher slurm --submit`)."""

    partition: str | None = Field(None, description="none = the training partition")
    cpus: Int = Field(4, ge=1, le=512, description="CPUs for tokenization")
    mem: str | None = Field(None, description="memory, Slurm syntax; none = the partition default")
    time: str = Field("01:00:00", description="time limit of the preparation job")
    tasks: Int = Field(1, ge=1, le=10000, description="mixture sources (data.sources): a job array of this many "
                       "tasks, each writing its share of the token shards")
    retries: Int = Field(1, ge=0, le=100, description="mixture sources: times a failed preparation task runs again "
                         "(it writes only the shards still missing)")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        return _check_slurm_time(v)


def _check_slurm_time(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("a time limit is not true/false; write it as \"HH:MM:SS\"")
    if isinstance(v, int):
        if v <= 0:
            raise ValueError(f"{v} is not a time limit; give a positive number of minutes or [D-]HH:MM:SS")
        return str(v)  # Slurm's meaning of a bare number: minutes
    if isinstance(v, str) and not _SLURM_TIME.match(v.strip()):
        raise ValueError(f"{yamlio.quote(v)} is not a Slurm time; write [D-]HH:MM:SS, MM:SS or minutes")
    if isinstance(v, str) and slurm_time_seconds(v.strip()) <= 0:
        raise ValueError(f"{v!r} is a time limit of zero; give a positive time ([D-]HH:MM:SS, MM:SS or minutes)")
    return v.strip() if isinstance(v, str) else v


def slurm_time_seconds(text: str) -> int:
    """Seconds of a time in Slurm's syntax (already matched by _SLURM_TIME)."""
    d, a, b, c = _SLURM_TIME.match(text).groups()  # type: ignore[union-attr]
    parts = [int(x) for x in (a, b, c) if x is not None]
    if d is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(d) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60  # minutes
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # MM:SS
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


class ClusterSpec(_Section):
    profile: str | None = Field(None, description="cluster profile this run was resolved with (--cluster)")
    nodes: Int = Field(1, ge=1, le=4096)
    gpus_per_node: Int = Field(0, ge=0, le=64, description="GPUs each node has; 0 = CPU ranks over gloo")
    gpu_type: str | None = Field(None, description="the GPU model (e.g. h100), from the cluster profile's partition; "
                                 "sizes the memory the plan fits")
    nproc_per_node: Int | None = Field(None, ge=1, le=256, description="ranks per node; none = GPUs or 1")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field("01:00:00", description="Slurm time limit: [D-]HH:MM:SS, MM:SS or minutes")
    mem: str | None = Field(None, description="memory per node, Slurm syntax (e.g. 200G; 0 = all)")
    cpus_per_task: Int | None = Field(None, ge=1, description="CPUs per rank; none = the cluster profile's "
                                      "cpus_per_node shared by the ranks on GPU nodes, else Slurm's default")
    cpus_per_node: Int | None = Field(None, ge=1, description="CPUs a node has, from the cluster profile's partition; "
                                      "fills cpus_per_task of GPU jobs")
    mem_per_node: str | None = Field(None, description="memory a node has, from the cluster profile's partition; "
                                     "fills mem of GPU jobs")
    constraint: str | None = None
    reservation: str | None = None
    exclusive: bool = False
    job_name: str = "launcher"
    launcher: Literal["torchrun", "srun"] = Field("torchrun", description="per-node launcher or one srun task per rank")
    setup: list[str] = Field(default_factory=list, description="shell lines run before launch (modules, venv)")
    container: ContainerSpec | None = None
    net_ifname: str | None = Field(None, description="NCCL/GLOO_SOCKET_IFNAME")
    nccl: NcclSpec = Field(default_factory=NcclSpec)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the ranks")
    signal_grace_s: Int = Field(90, ge=0, le=3600, description="warning before the time limit")
    requeue: bool = True
    max_requeues: Int = Field(3, ge=0)
    max_retries: Int = Field(0, ge=0)
    dependency: str | None = None
    array: str | None = None
    usd_per_gpu_hour: Float | None = Field(None, ge=0, description="price, from the cluster profile")
    usd_per_node_hour: Float | None = Field(None, ge=0, description="price of a CPU node-hour")
    # Below nccl.timeout_s (1800) by design: the watchdog fires first on a rank stuck outside a collective,
    # names it with its stacks and a marker and ends the step, before NCCL's own watchdog aborts the ranks
    # blocked in the collective (SIGABRT, no marker). With its 60 s grace for ranks in a collective, 1260 s.
    hang_timeout_s: Int = Field(1200, ge=0, description="watchdog: a rank with no finished optimizer step for this "
                                "long writes every thread's stack to its log and exits 4; 0 = off")
    hf_home: str | None = Field(None, description="shared Hugging Face cache filled by `launcher stage`; jobs run "
                                "with HF_HOME set to it and HF_HUB_OFFLINE=1")
    prep: PrepSpec = Field(default_factory=PrepSpec)

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        return _check_slurm_time(v)

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"{k!r} is not an environment variable name (letters, digits, _)")
        return v

    @field_validator("net_ifname")
    @classmethod
    def _ifname(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.^,-]{1,64}", v):
            raise ValueError(f"{v!r} is not a network interface name (e.g. eth0, ib0, ^lo)")
        return v

    def time_seconds(self) -> int:
        return slurm_time_seconds(self.time)


Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKER_EXTRA = "pip install 'launcher[trackers]'"  # where wandb and mlflow come from (an optional extra)
# Where an MLflow tracking server or store can be: a server (http/https), a database backend, a Databricks
# workspace, or a local store (file: or an absolute path).
MLFLOW_URI_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


class WandbSpec(_Section):
    project: str | None = Field(None, description="W&B project; none = the run's name")
    entity: str | None = Field(None, description="W&B team or user; none = the API key's default")
    mode: Literal["online", "offline"] = Field("online", description="offline: write the run into the run dir "
                                               "(nodes without internet); `launcher sync RUN_DIR` uploads it later")
    tags: list[str] = Field(default_factory=list)


class MlflowSpec(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking server or store (http://host:5000, "
                                     "sqlite:///path.db, ...); none = the cluster profile's, else $MLFLOW_TRACKING_URI")
    experiment: str | None = Field(None, description="MLflow experiment; none = the run's name")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_tracking_uri(v)


# An error text that starts so is not followed by the value given (it may hold a password).
NOT_ECHOED = "the value is not shown"


def check_tracking_uri(v: str) -> str:
    """An MLflow tracking URI launcher can hand to MLflow: a known scheme (or an absolute path), no spaces, no
    credentials in it (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN from the environment)."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", v)
    if v.startswith("/"):
        return v
    if not m or any(c.isspace() for c in v) or m.group(1).split("+")[0].lower() not in MLFLOW_URI_SCHEMES:
        raise ValueError(f"{yamlio.quote(v)} is not an MLflow tracking URI; give http(s)://HOST:PORT, "
                         f"sqlite:///PATH.db, file:///PATH, databricks or another of {', '.join(MLFLOW_URI_SCHEMES)}")
    if m.group(1).lower() in ("http", "https"):
        host = m.group(2).removeprefix("//").split("/", 1)[0]
        if "@" in host:
            raise ValueError(f"{NOT_ECHOED}: the tracking URI carries a user or password; secrets are not written into the spec: "
                             "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if not host:
            raise ValueError(f"{yamlio.quote(v)} names no host; give http(s)://HOST:PORT")
    return v


class OutputSpec(_Section):
    dir: str = Field("runs/run", description="where checkpoints, logs and the final model go")
    save_every: Int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    keep_last: Int = Field(2, ge=1)
    log_every: Int = Field(1, ge=1)
    eval_every: Int = Field(0, ge=0)
    resume: str = Field("auto", description="auto (newest complete checkpoint), never, or a checkpoint path")
    tensorboard: bool = Field(True, description="false drops tensorboard from output.trackers")
    trackers: list[Tracker] = Field(default_factory=lambda: ["tensorboard"],
                                    description="experiment trackers rank 0 logs to: tensorboard, wandb, mlflow; "
                                    "one tracker run across every attempt of the run")
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)

    @field_validator("trackers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        twice = sorted({t for t in v if v.count(t) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return v

    def active_trackers(self) -> list[str]:
        """The trackers this run logs to: output.trackers, less tensorboard when output.tensorboard is false."""
        return [t for t in self.trackers if t != "tensorboard" or self.tensorboard]


class RunSpec(_Section):
    """Everything about one run. Immutable; build it with `launcher.config.resolve.resolve()`."""

    name: str = Field("run", description="run name; also the default Slurm job name")
    task: Task = "pretrain"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    pref: PrefSpec = Field(default_factory=PrefSpec)
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    zero: ZeroSpec = Field(default_factory=ZeroSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yamlio.dumps(self.to_dict())


def expand_shorthands(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with each section written as one string (`model: NAME`) in its full form, so that layers
    merge field by field (`model: NAME` in a file and `--set model.attn=sdpa` keep both)."""
    out = dict(tree)
    for key, f in RunSpec.model_fields.items():
        section = f.annotation
        if isinstance(section, type) and issubclass(section, _Shorthand) and isinstance(out.get(key), str):
            out[key] = {section.main_field: out[key]}
    return out


# --------------------------------------------------------------------------- validation

def validate(tree: dict[str, Any]) -> RunSpec:
    """The RunSpec of a merged tree. Raises SpecError with every problem, one line each."""
    try:
        spec = RunSpec.model_validate(tree)
    except ValidationError as exc:
        raise SpecError(_explain(exc)) from None
    problems = check_combinations(spec)
    if problems:
        raise SpecError(problems)
    return spec


_OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def merged_zero(z: ZeroSpec, problems: list[str]) -> ZeroSpec:
    """The ZeRO settings of the rendered DeepSpeed config: zero.extra.zero_optimization's stage and offload
    devices over the typed fields, so that raw keys meet the same checks. What DeepSpeed would not take
    there, and a stage other than zero.stage (the plan sizes memory and buckets by zero.stage), is added
    to `problems`."""
    zo = z.extra.get("zero_optimization")
    if zo is None:
        return z
    if not isinstance(zo, dict):
        problems.append("zero.extra.zero_optimization must be a mapping of DeepSpeed ZeRO keys")
        return z
    update: dict[str, Any] = {}
    if "stage" in zo and zo["stage"] != z.stage or isinstance(zo.get("stage"), bool):
        stage = zo["stage"]
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            problems.append(f"zero.extra.zero_optimization.stage: {yamlio.quote(stage)} is not a ZeRO stage; "
                            f"set the stage with --zero 0..3 (zero.stage)")
        else:
            update["stage"] = stage
            if stage != z.stage:
                problems.append(f"zero.extra.zero_optimization.stage={stage} differs from zero.stage={z.stage}: "
                                f"the plan (memory, buckets) follows zero.stage; set --zero {stage} and drop it "
                                f"from zero.extra")
    for key in ("offload_optimizer", "offload_param"):
        if key not in zo:
            continue
        section = zo[key]
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device is None:
            device = "none"
        if device not in _OFFLOAD_DEVICES:
            problems.append(f"zero.extra.zero_optimization.{key}: device {yamlio.quote(device)} is not one of "
                            f"none, cpu, nvme; use --{key.replace('_', '-')} instead")
            continue
        update[key] = device
        if device == "nvme" and isinstance(section, dict) and section.get("nvme_path"):
            update["nvme_path"] = str(section["nvme_path"])
    return z.model_copy(update=update)


def check_combinations(spec: RunSpec) -> list[str]:
    """Options that are each valid but cannot go together. Every message says how to fix it."""
    p: list[str] = []
    # the checks below read the ZeRO settings DeepSpeed will get: zero.extra is merged over the typed fields
    z, prec, meth = merged_zero(spec.zero, p), spec.precision.dtype, spec.method.name
    name = {k: f"zero.extra.zero_optimization.{k}" + (".device" if k.startswith("offload") else "")
            if getattr(z, k) != getattr(spec.zero, k) else f"zero.{k}" for k in ("stage", "offload_param",
                                                                                 "offload_optimizer")}
    if z.offload_param != "none" and z.stage not in (3, "auto"):
        p.append(f"{name['offload_param']}={z.offload_param} needs ZeRO stage 3 (only stage 3 partitions parameters); "
                 f"use --zero 3 or --offload-param none")
    if z.offload_optimizer != "none" and z.stage == 0:
        p.append(f"{name['offload_optimizer']}={z.offload_optimizer} needs ZeRO stage 1, 2 or 3; "
                 f"use --zero 2 or --offload-optimizer none")
    if "nvme" in (z.offload_optimizer, z.offload_param) and not z.nvme_path:
        p.append("NVMe offload needs zero.nvme_path, a folder on a local NVMe disk of every node; "
                 "set --nvme-path /local/nvme or choose --offload-optimizer/--offload-param cpu")
    extra_fp = {k for k in ("fp16", "bf16") if isinstance(z.extra.get(k), dict) and z.extra[k].get("enabled")}
    if len(extra_fp) == 2 or (extra_fp and prec not in extra_fp):
        p.append(f"zero.extra enables {', '.join(sorted(extra_fp))} but precision.dtype is {prec}: set the precision "
                 f"with --precision (fp16 and bf16 cannot both be on) and drop them from zero.extra")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in z.extra:
            p.append(f"zero.extra.{key}: batch numbers are computed from optim.micro_batch, optim.global_batch and "
                     f"the world size; set those instead")
    if meth == "qlora" and prec == "fp32":
        p.append("method qlora computes in bf16 or fp16 (4-bit weights are dequantized to the compute dtype); "
                 "use --precision bf16 (or fp16)")
    qc = spec.method.quant.compute_dtype
    if meth == "qlora" and qc != "auto" and prec != "auto" and qc != prec:
        p.append(f"method.quant.compute_dtype={qc} differs from precision.dtype={prec}; "
                 f"set them equal or leave compute_dtype auto")
    if meth == "prefix" and spec.model.grad_ckpt:
        p.append("method prefix (prefix tuning) cannot run with gradient checkpointing: peft refuses it (the prefix "
                 "is passed as a key/value cache, which checkpointed layers do not take); use --no-grad-ckpt, or "
                 "--method prompt / lora")
    if meth in PROMPT_METHODS and spec.data.packing:
        why = ("peft drops position_ids for prompt tuning" if meth == "prompt" else
               "the prefix is a key/value cache, and transformers separates packed examples only without one")
        p.append(f"method {meth} with data.packing: packed examples would attend to each other ({why}); "
                 f"use --no-packing with --method {meth}")
    if meth in PROMPT_METHODS and z.stage == 3:
        p.append(f"method {meth} cannot use ZeRO stage 3 ({name['stage']}=3): peft saves the virtual tokens by running their encoder on "
                 f"rank 0 alone, and under ZeRO-3 its weights are partitioned, so gathering them waits for the other "
                 f"ranks forever (seen with 2 ranks: the run hangs after its last step, while saving); use --zero 2 "
                 f"(or 0/1): the trainable part is small, only the frozen base would have been sharded")
    if meth == "freeze" and not spec.method.freeze.train_modules and spec.method.freeze.top_layers == 0:
        p.append("method freeze trains nothing as set: give method.freeze.top_layers=N (the last N decoder layers) "
                 "and/or method.freeze.train_modules=[lm_head, norm, ...]")
    if spec.model.attn == "flash2" and prec == "fp32":
        p.append("model.attn=flash2 runs only in bf16 or fp16; use --precision bf16 or --attn sdpa")
    if spec.optim.loss == "liger" and spec.cluster.gpus_per_node == 0:
        p.append("optim.loss=liger runs Liger Kernel's Triton kernels, which need CUDA GPUs, but cluster.gpus_per_node "
                 "is 0 (CPU ranks); use --loss chunked (the same memory saving in plain PyTorch) or --gpus-per-node N")
    if spec.model.compile and z.stage == 3:
        p.append("model.compile with ZeRO stage 3: DeepSpeed gathers and releases each layer's parameters in hooks "
                 "around the compiled blocks, which torch.compile breaks into graph pieces (no speed-up, recompiles); "
                 "use --zero 2 (or auto, which then picks 0-2) or --no-compile")
    if spec.model.compile and meth in PROMPT_METHODS:
        p.append(f"model.compile with method {meth}: the virtual tokens change the blocks' input shapes and cache "
                 f"(recompiles every step); use --no-compile")
    o = spec.optim
    if o.global_batch is not None and o.global_batch_tokens is not None:
        p.append("give optim.global_batch (sequences) or optim.global_batch_tokens, not both")
    if o.warmup_steps >= o.max_steps and o.warmup_steps > 0:
        p.append(f"optim.warmup_steps={o.warmup_steps} is not below optim.max_steps={o.max_steps}; "
                 f"lower the warmup or raise --max-steps")
    c = spec.cluster
    if c.gpus_per_node and c.nproc_per_node and c.nproc_per_node > c.gpus_per_node:
        p.append(f"cluster.nproc_per_node={c.nproc_per_node} is more than cluster.gpus_per_node={c.gpus_per_node}; "
                 f"one rank per GPU: lower --nproc-per-node")
    if spec.task in PREFERENCE_TASKS and spec.data.packing:
        p.append(f"data.packing is for --task sft; task {spec.task} compares whole sequences (chosen and rejected) "
                 f"and never packs them: drop --packing")
    if spec.task in PREFERENCE_TASKS and spec.task != "dpo" and meth not in PREFERENCE_METHODS:
        p.append(f"task {spec.task} runs with method {', '.join(PREFERENCE_METHODS)} (dpo with every method); method "
                 f"{meth} is not one of them (not verified with TRL's trainers here): use --method lora or --method full")
    if spec.task in PREFERENCE_TASKS and spec.optim.loss in ("chunked", "liger"):
        p.append(f"optim.loss={spec.optim.loss} is for the language-model loss of pretrain/sft; task {spec.task} runs "
                 f"TRL's own loss (its fused LM head computes the log-probs without the full logits); drop --loss")
    if spec.task == "kto" and spec.optim.micro_batch < 2:
        p.append("task kto estimates its KL term from the other completions of the micro batch, so it needs "
                 "optim.micro_batch of 2 or more; use --micro-batch 2")
    if spec.task in PREFERENCE_TASKS and spec.model.compile:
        p.append(f"model.compile with task {spec.task}: TRL's trainers run the chosen and rejected sequences of "
                 f"varying lengths through the model (recompiles); use --no-compile")
    if spec.task != "pretrain" and (spec.data.sources or spec.data.doc_mask):
        p.append(f"data.{'sources' if spec.data.sources else 'doc_mask'} is for --task pretrain (SFT data keeps "
                 f"its examples: use data.path, and --packing for per-example attention)")
    if spec.data.doc_mask and not spec.data.sources and spec.task == "pretrain":
        p.append("data.doc_mask needs data.sources (the token shards keep where documents start); write the data "
                 "as one source: data.sources: [{name: main, path: ..., weight: 1}]")
    if spec.task == "pretrain" and spec.data.packing:
        p.append("data.packing is for --task sft (pretraining text is always concatenated and cut into blocks); "
                 "drop --packing")
    for k in c.env:
        if k.upper() in SECRET_ENV or SECRET_NAME.search(k):
            p.append(f"cluster.env.{k}: this name holds a credential, and secrets are not written into the spec "
                     f"or the run dir; export {k} in the shell that submits, and the job inherits it")
    p += [f"{where}: this value looks like a credential ({kind}); secrets are not written into the spec or the "
          f"run dir: export it in the shell that submits, and the job inherits it" for where, kind in
          secret_values(spec.to_dict())]
    return p


# Names of environment variables that hold credentials, and the shapes of well-known tokens: both are refused
# wherever the spec would carry them into spec.yaml and the batch scripts.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
SECRET_VALUES = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "a GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "an API secret key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def secret_values(tree: Any, where: str = "") -> list[tuple[str, str]]:
    """(field, kind) of every string in `tree` shaped like a known token (the value itself is never shown)."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(where, tree)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{at}.{k}" if at else str(k), x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{at}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str):
            kind = next((k for k, rx in SECRET_VALUES.items() if rx.search(v)), None)
            if kind:
                found.append((at or "(top level)", kind))
    return sorted(found)


# --------------------------------------------------------------------------- error text

def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in ("list[str]", "literal['all-linear']", "ContainerSpec"):
            continue  # pydantic's names for union members, not keys the user wrote
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts) or "(top level)"


def _model_at(loc: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: Any = root or RunSpec
    for key in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def explain_errors_of(exc: ValidationError, where: str) -> list[str]:
    """Messages for a model other than RunSpec (e.g. a cluster profile), prefixed with its place."""
    return [f"{where}: {m}" for m in _explain(exc, root=exc.title and _MODELS.get(exc.title))]


def _explain(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        where = _loc(loc)
        kind = err["type"]
        given = err.get("input")
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1], root)
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1])[:100], valid, n=1, cutoff=0.5)
            hint = f" Did you mean {_loc(loc[:-1] + (close[0],))!r}?" if close else ""
            msg = f"unknown key {yamlio.quote(where)}.{hint} Valid keys here: {', '.join(valid)}"
        elif kind == "literal_error":
            msg = f"{where}: {yamlio.quote(given)} is not allowed; {err['msg'].replace('Input should be', 'use')}"
        elif kind in ("model_type", "dict_type") and loc and _model_at(loc, root):
            keys = ", ".join(sorted(_model_at(loc, root).model_fields))  # type: ignore[union-attr]
            msg = f"{where}: expected a mapping with keys {keys}, got {yamlio.quote(given)}"
        else:
            text = err["msg"].removeprefix("Value error, ")
            text = text[0].lower() + text[1:] if text else text
            shown = yamlio.quote(given) if not isinstance(given, dict) else "a mapping"
            msg = f"{where}: {text}" + ("" if text.startswith(NOT_ECHOED) else f" (got {shown})")
            if "valid number" in text or "valid integer" in text or "finite number" in text:
                msg += "; write a plain number (true/false and quoted text are not numbers)"
        if msg not in seen:
            seen.add(msg)
            out.append(msg)
    return out


_MODELS: dict[str, type[BaseModel]] = {}


def register_model(model: type[BaseModel]) -> type[BaseModel]:
    """Let error messages of another top-level model (a profile) suggest keys from it."""
    _MODELS[model.__name__] = model
    return model
