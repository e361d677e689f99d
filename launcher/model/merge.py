"""Fold a run's adapter (lora, qlora, dora, ia3) into its base model and save a plain model with its
tokenizer. torch, transformers and peft are imported by `merge_adapter` alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher import outpaths
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.model import load as model_mod
from launcher.model.load import ADAPTER_CONFIG, read_adapter_config
from launcher.plan.plan import settled
from launcher.rundir.layout import RunDir, open_run_dir

# peft types that add virtual tokens (a learned key/value prefix, or input embeddings) instead of changing weights
_VIRTUAL_TOKENS = {"PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning", "P_TUNING": "p-tuning",
                   "MULTITASK_PROMPT_TUNING": "multitask prompt tuning"}


def merge_run(run_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Merge RUN_DIR's trained adapter into its base and save model + tokenizer into `out`; return it.

    Refused (UserError) before anything loads: a run dir without an adapter, an adapter of virtual
    tokens (nothing to fold into the weights), a non-empty `out` without `force`."""
    rd = open_run_dir(run_dir)
    adapter = rd.final
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter} holds no adapter (no {ADAPTER_CONFIG}); merge is for runs with "
                        f"--method lora, qlora, dora or ia3 that finished training")
    refusal = unmergeable(read_adapter_config(adapter))
    if refusal:
        raise UserError(f"{adapter}: {refusal}")
    dest = outpaths.resolve(out, "--out")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise UserError(f"{dest} exists and is not empty; choose a new --out or pass --force")
    return merge_adapter(rd.path, rd.load_spec(), dest)


def unmergeable(adapter_cfg: dict[str, Any]) -> str | None:
    """Why an adapter cannot be merged into its base model's weights; None when it can."""
    kind = str(adapter_cfg.get("peft_type", ""))
    if kind in _VIRTUAL_TOKENS:
        n = adapter_cfg.get("num_virtual_tokens")
        return (f"a {_VIRTUAL_TOKENS[kind]} adapter cannot be merged: it puts {n or 'its'} learned virtual tokens "
                f"in front of every input instead of changing any weight, so there is no weight to fold it into. "
                f"Use it as it is: peft.AutoPeftModelForCausalLM.from_pretrained(FINAL_DIR) loads the base with it")
    return None


def merge_adapter(run_dir: Path, spec: RunSpec, dest: Path) -> Path:
    """The adapter in RUN_DIR/final added into its base weights, saved with the tokenizer into `dest`.
    QLoRA: the 4-bit base is dequantized to the compute dtype first (the weights the adapter was trained
    against), then the adapter is added."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = settled(spec)  # the precision `auto` chose
    adapter = RunDir(Path(run_dir)).final
    cfg: dict[str, Any] = read_adapter_config(adapter)
    base = _base_of(run_dir, spec, cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    dtype = model_mod.torch_dtype(spec.precision.dtype)
    if spec.method.name == "qlora":
        kwargs["quantization_config"] = model_mod.quantization_config(spec)
        kwargs["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
        dtype = kwargs["quantization_config"].bnb_4bit_compute_dtype
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
    if spec.method.name == "qlora":
        model = model.dequantize(dtype=dtype)  # 4-bit -> plain Linear in the compute dtype
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    merged = merged.to("cpu")
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(dest))
    model_mod.load_tokenizer_from(adapter).save_pretrained(str(dest))
    return dest


def _base_of(run_dir: Path, spec: RunSpec, adapter_cfg: dict[str, Any]) -> str:
    if spec.model.name == model_mod.TINY:
        return str(RunDir(Path(run_dir)).base)  # the run dir's own base, even if moved
    named = adapter_cfg.get("base_model_name_or_path")
    if named and (Path(named).is_dir() or not os.path.isabs(named)):
        return str(named)
    return model_mod.model_source(spec)
