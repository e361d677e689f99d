"""Load the model every rank trains: dtype from precision, attention kernel, ZeRO-3-aware loading,
LoRA / QLoRA through peft and bitsandbytes, gradient checkpointing; the tokenizer that data
preparation and training both load; the names of the weight files a model folder holds.

Heavy libraries (torch, transformers, peft, bitsandbytes) are imported inside the functions.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from launcher import assets
from launcher.config.spec import PEFT_METHODS, PREFERENCE_TASKS, RunSpec
from launcher.errors import UserError
from launcher.plan.params import freeze_selection
from launcher.requirements import flash_attn_import_error
from launcher.rundir.layout import RunDir

ATTN_IMPL = {"flash2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}
TINY = "tiny"
# The weight files transformers' from_pretrained reads: each whole, or sharded beside FILE.index.json.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = tuple(f"{f}.index.json" for f in WEIGHT_FILES)
ADAPTER_CONFIG = "adapter_config.json"  # peft's file in an adapter folder: the method and its base model
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """peft's adapter_config.json of an adapter folder as a dict; UserError naming the file when it cannot
    be read as a JSON object (written by hand, cut off)."""
    import json

    path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0][:160]
        raise UserError(f"{path} is not a readable adapter config ({why}); restore the adapter folder that "
                        f"training wrote", field=ADAPTER_CONFIG) from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} holds a JSON {type(cfg).__name__}, not the object peft writes; restore the "
                        f"adapter folder that training wrote", field=ADAPTER_CONFIG)
    return cfg


def torch_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def has_weights(path: str | os.PathLike[str], *, adapter: bool = False) -> bool:
    """Whether the folder holds a model's weights (with adapter=True: or a peft adapter's)."""
    names = WEIGHT_FILES + WEIGHT_INDEXES + (ADAPTER_WEIGHT_FILES if adapter else ())
    return any((Path(path) / f).is_file() for f in names)


# --------------------------------------------------------------------------- where the model comes from

def model_source(spec: RunSpec) -> str:
    """Directory or hub id that from_pretrained reads. 'tiny' is the run dir's initialised copy of the
    embedded model (made by `ensure_tiny_base`), so every rank, the adapter and `merge` share one base."""
    name = spec.model.name
    if name == TINY:
        return str(RunDir(Path(spec.output.dir)).base)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"model.name={name!r}: a local model is a directory with config.json (and weights); "
                            f"got {p}")
        return str(p.resolve())
    return name


def ensure_tiny_base(run_dir: Path, seed: int, cache: Path | None = None) -> Path:
    """Write the embedded tiny model, initialised from `seed`, to RUN_DIR/base (fp32 safetensors +
    tokenizer) unless it is there. Safe when several processes race: each writes a temporary folder
    and renames it into place; the first rename wins.

    `cache` (the data cache's root): a base made once is kept there under a key of its config, seed and
    the torch/transformers versions that initialised it, and later run dirs get a copy of those very bytes
    (no torch import, no initialisation: 2-3 s of every `launcher run` of the tiny model)."""
    dest = RunDir(Path(run_dir)).base
    if has_weights(dest):
        return dest
    kept = cache / f"tiny-base-{tiny_base_key(seed)}" if cache is not None else None
    if kept is not None and has_weights(kept):
        _place(lambda tmp: shutil.copytree(kept, tmp, dirs_exist_ok=True), dest, run_dir)
        return dest
    _place(lambda tmp: _make_tiny_base(tmp, seed), dest, run_dir)
    if kept is not None:
        try:  # best effort: a cache that cannot be written only costs the next run the 2-3 s
            kept.parent.mkdir(parents=True, exist_ok=True)
            _place(lambda tmp: shutil.copytree(dest, tmp, dirs_exist_ok=True), kept, kept.parent)
        except OSError:
            pass
    return dest


def tiny_base_key(seed: int) -> str:
    """What the tiny base's bytes depend on: its config and tokenizer files, the seed, and the versions of the
    code that initialises it (read from the installed packages' metadata: no import)."""
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        h.update(name.encode() + (assets.tiny_dir() / name).read_bytes())
    h.update(f"seed={seed} torch={version('torch')} transformers={version('transformers')}".encode())
    return h.hexdigest()[:16]


def _make_tiny_base(folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(assets.tiny_dir())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    load_tokenizer_from(assets.tiny_dir()).save_pretrained(folder)


def _place(fill: Any, dest: Path, parent: Path) -> None:
    """fill(tmp) writes a folder in `parent`, renamed to `dest`; when another process got there first, its
    folder stays."""
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not has_weights(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_tiny_base(run_dir: Path, seed: int, timeout_s: float = 600) -> Path:
    """On ranks: `launcher run` or the job's preparation step made the base before any rank started;
    a rank started some other way makes it (global rank 0: transformers' save_pretrained writes
    only there once a process group exists) or waits for it (every other rank, on any node)."""
    dest = RunDir(Path(run_dir)).base
    if has_weights(dest):
        return dest
    if int(os.environ.get("RANK", "0")) == 0:
        return ensure_tiny_base(run_dir, seed)
    deadline = time.monotonic() + timeout_s
    while not has_weights(dest):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dest} did not appear within {timeout_s:.0f} s (made by global rank 0)")
        time.sleep(0.5)
    return dest


# --------------------------------------------------------------------------- tokenizer

def load_tokenizer_from(source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The tokenizer in a folder or hub repository, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # a pad id for the collators; labels mask it anyway
    return tok


def load_tokenizer(spec: RunSpec) -> Any:
    """The tokenizer of spec.model.name ('tiny': the embedded one, no weights needed), as `prepare`
    tokenizes the data with it and the ranks pad with it."""
    if spec.model.name == TINY:
        return load_tokenizer_from(assets.tiny_dir())
    return load_tokenizer_from(model_source(spec), trust_remote_code=spec.model.trust_remote_code,
                               revision=spec.model.revision)


# --------------------------------------------------------------------------- attention

def flash2_problems(precision: str) -> list[str]:
    """What stops FlashAttention-2 here; empty when it is usable."""
    import torch

    problems = []
    if importlib.util.find_spec("flash_attn") is None:
        problems.append("the flash_attn package is not installed (pip install flash-attn --no-build-isolation)")
    elif (error := flash_attn_import_error()) is not None:
        # found but broken, e.g. an undefined symbol after a torch upgrade: every rank would crash loading it
        problems.append(f"flash_attn is installed but does not import ({error}); reinstall it against this torch "
                        f"(pip install --force-reinstall --no-build-isolation flash-attn)")
    elif torch.cuda.is_available() and not _transformers_flash2_available():
        problems.append("transformers does not find FlashAttention-2 usable here (is_flash_attn_2_available(): "
                        "flash-attn 2.3.3 or newer, built for CUDA)")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    else:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 0):
            problems.append(f"the GPU has compute capability {major}.{minor}; FlashAttention-2 needs 8.0+ "
                            f"(A100, H100, L4, RTX 30xx or newer)")
    if precision not in ("bf16", "fp16"):
        problems.append(f"precision is {precision}; FlashAttention-2 runs in bf16 or fp16")
    return problems


def _transformers_flash2_available() -> bool:
    """transformers' own check: the one from_pretrained(attn_implementation="flash_attention_2") applies."""
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def choose_attn(spec: RunSpec) -> str:
    """transformers' attn_implementation for spec.model.attn."""
    want = spec.model.attn
    if want in ("sdpa", "eager"):
        return ATTN_IMPL[want]
    problems = flash2_problems(spec.precision.dtype)
    if want == "flash2":
        if problems:
            raise UserError("--attn flash2 cannot run here: " + "; ".join(problems) +
                            ". Use --attn sdpa (or auto, which falls back to sdpa)")
        return ATTN_IMPL["flash2"]
    return ATTN_IMPL["flash2"] if not problems else ATTN_IMPL["sdpa"]


# --------------------------------------------------------------------------- model

def quantization_config(spec: RunSpec) -> Any:
    from transformers import BitsAndBytesConfig

    q = spec.method.quant
    compute = torch_dtype(spec.precision.dtype if q.compute_dtype == "auto" else q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        # Quantized weights stored in the compute dtype: ZeRO-3 partitions floating-point tensors only.
        bnb_4bit_quant_storage=compute,
    )


def lora_config(spec: RunSpec) -> Any:
    from peft import LoraConfig

    lo = spec.method.lora
    target = lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules)
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=target,
        # a reward model's score head starts at random: it trains in full beside the adapter
        modules_to_save=list(lo.modules_to_save) or (["score"] if spec.task == "rm" else None),
        bias="none",
        task_type="SEQ_CLS" if spec.task == "rm" else "CAUSAL_LM",
        use_dora=spec.method.name == "dora",  # DoRA: LoRA + a learned magnitude per output feature
    )


def peft_config(spec: RunSpec) -> Any:
    """The peft config of a method trained through peft (lora, qlora, dora, ia3, prefix, prompt)."""
    method = spec.method.name
    if method in ("lora", "qlora", "dora"):
        return lora_config(spec)
    if method == "ia3":
        from peft import IA3Config

        ia = spec.method.ia3
        return IA3Config(target_modules=list(ia.target_modules), feedforward_modules=list(ia.feedforward_modules),
                         task_type="CAUSAL_LM")
    if method == "prefix":
        from peft import PrefixTuningConfig

        pf = spec.method.prefix
        return PrefixTuningConfig(num_virtual_tokens=pf.num_virtual_tokens, prefix_projection=pf.projection,
                                  encoder_hidden_size=pf.projection_hidden, task_type="CAUSAL_LM")
    if method == "prompt":
        from peft import PromptTuningConfig

        pr = spec.method.prompt
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[pr.init]
        tok = str(assets.tiny_dir()) if spec.model.name == TINY else model_source(spec)
        text = {"prompt_tuning_init_text": pr.init_text, "tokenizer_name_or_path": tok} if pr.init == "text" else {}
        return PromptTuningConfig(num_virtual_tokens=pr.num_virtual_tokens, prompt_tuning_init=init,
                                  task_type="CAUSAL_LM", **text)
    raise ValueError(f"method {method!r} is not trained through peft")


def apply_freeze(spec: RunSpec, model: Any) -> int:
    """method freeze: only the parameters method.freeze names (and the top N layers) train. Returns
    how many parameters train. Names are matched by params.freeze_selection, as the plan counts them."""
    named = list(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight is listed too
    layers = int(model.config.num_hidden_layers)
    chosen = freeze_selection([n for n, _ in named], spec.method.freeze, layers)
    trainable = {id(p) for n, p in named if n in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in trainable)
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def load_model(spec: RunSpec, *, ds_config: dict[str, Any] | None = None, device: str = "cpu") -> Any:
    """The model to train, on CPU (DeepSpeed moves it to the rank's device), ready for the Trainer.

    Under ZeRO-3 transformers must see the DeepSpeed config before from_pretrained, so that each rank
    materialises only its shard (deepspeed.zero.Init). The Trainer's TrainingArguments(deepspeed=...)
    registers it; build those first. Given `ds_config` and no live registration, one is made here and
    kept alive on the returned model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled

    keepalive = None
    zero3 = bool(ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3)
    if zero3 and not is_deepspeed_zero3_enabled():
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)

    source = model_source(spec)
    if spec.model.name == TINY:
        wait_for_tiny_base(Path(spec.output.dir), spec.optim.seed)
    method = spec.method.name
    dtype = torch_dtype(spec.precision.dtype)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=choose_attn(spec),
        trust_remote_code=spec.model.trust_remote_code,
    )
    if spec.model.revision:
        kwargs["revision"] = spec.model.revision
    auto = AutoModelForCausalLM
    if spec.task == "rm":  # a reward model: the decoder with a one-output score head (new, at random)
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(spec)
        if not zero3:
            # bitsandbytes quantizes while placing the weights: straight onto this rank's device.
            local = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": f"cuda:{local}" if device == "cuda" else "cpu"}
    try:
        model = auto.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name={spec.model.name!r}: cannot load it ({exc}). Give 'tiny', a local model "
                        f"directory, or a hub id that this machine can download") from None
    model.config.use_cache = False  # training: no KV cache (also required for packed examples)
    if method == "qlora":
        fix_bnb_cpu_inference(model)

    model = apply_method(spec, model)
    if spec.model.compile:
        compile_blocks(model)
    if keepalive is not None:
        model._launcher_hf_ds_config = keepalive
    return model


QUANTIZING_METHODS = ("qlora",)  # the methods that load the base through bitsandbytes


def keep_bitsandbytes_out(method: str) -> bool:
    """Keep bitsandbytes from being imported in this process when `method` does not quantize; True if so.

    transformers' Trainer imports peft, and peft imports bitsandbytes whenever it is installed; on a CPU with
    AVX512-BF16, bitsandbytes then warns that the `kernels` package is missing, in a run that has no 4-bit
    layer. A None entry in sys.modules makes `import bitsandbytes` fail as if it were not installed, and
    importlib.util.find_spec (which peft and transformers ask) answer None, so both take their paths without
    it. Too late once imported; a quantizing method keeps it (and its warning, which it can act on)."""
    import sys

    if method in QUANTIZING_METHODS or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True


def fix_bnb_cpu_inference(model: Any) -> int:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights for a fast no-grad kernel
    (evaluation, generation) that needs out_features % 32 == 0 and in_features % blocksize == 0;
    other layers (the tiny model's MLP: 688) crash there ("N must be divisible by block_n", "shape
    [256, 10] is invalid"). Those layers keep the generic path. Returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - only 4-bit models get here
        return 0
    n = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        qs = getattr(m.weight, "quant_state", None)
        blocksize = getattr(qs, "blocksize", 64) or 64
        if m.out_features % 32 or m.in_features % blocksize:
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def apply_method(spec: RunSpec, model: Any) -> Any:
    """Gradient checkpointing, then the peft wrapper (lora, qlora, dora, ia3, prefix, prompt; it freezes
    the base) or, for freeze, requires_grad on the chosen parameters only."""
    method = spec.method.name
    gc_kwargs = {"use_reentrant": False}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts norms/embeddings to fp32; checkpointing is enabled below through
        # transformers' current API (peft's path calls the deprecated gradient_checkpointing_enable).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.model.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if method == "freeze":
        apply_freeze(spec, model)
        embeddings = model.get_input_embeddings().weight
        if spec.model.grad_ckpt and not embeddings.requires_grad:
            model.enable_input_require_grads()  # as for the adapters below
    if method in PEFT_METHODS and spec.task in PREFERENCE_TASKS:
        if spec.model.grad_ckpt:
            model.enable_input_require_grads()
        return model  # TRL's trainer wraps it (peft_config): its reference is then the base, adapter disabled
    if method in PEFT_METHODS:
        from peft import get_peft_model

        if spec.model.grad_ckpt:
            # Frozen embeddings give activations without grad; checkpointed blocks then have no path
            # for the gradient to the adapters ("does not require grad"). Make the inputs require it.
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config(spec))
    return model


def decoder_blocks(model: Any) -> Any:
    """The decoder's list of blocks (`model.layers` in the Llama family), through peft's wrappers."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for owner in (decoder, base):
        for name in ("layers", "h", "blocks"):
            blocks = getattr(owner, name, None) if owner is not None else None
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return blocks
    raise UserError(f"model.compile: no list of decoder blocks found in {type(base).__name__}; use --no-compile")


def compile_blocks(model: Any) -> int:
    """torch.compile each decoder block in place (`Module.compile`: the module stays itself, so DeepSpeed's
    and peft's hooks and the checkpoint's state-dict names are unchanged). Blocks, not the whole model: one
    graph per block shape, compiled once and reused by every layer; the loss and the optimizer step stay
    eager. Shapes: pretraining and packed blocks are all seq_len long (one graph); unpacked SFT batches are
    padded to their longest row, so after the first change torch marks the length dynamic (one more graph)."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def activation_checkpointing_on(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_activation_checkpointing", False))


def describe(model: Any) -> str:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    ckpt = "on (non-reentrant)" if activation_checkpointing_on(model) else "off"
    return f"{trainable:,} trainable of {total:,} parameters; gradient checkpointing {ckpt}"
