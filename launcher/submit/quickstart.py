"""`launcher quickstart`: the embedded tiny model trained on the embedded corpus on this machine (one rank,
CPU or GPU), then a sample from it. torch and transformers are imported inside the functions."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from launcher.config.resolve import resolve
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.model.load import keep_bitsandbytes_out, load_tokenizer_from
from launcher.rundir.layout import RunDir
from launcher.submit import local

PROMPT = "The function returns"


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def quickstart_spec(out: Path, gpu: bool) -> RunSpec:
    """The embedded default: continued pretraining of the tiny model on the embedded corpus, one rank."""
    sets = [
        "name=quickstart",
        "task=pretrain",
        "model.name=tiny",
        "method.name=full",
        "data.seq_len=128",
        "optim.micro_batch=8",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
        "optim.scheduler=cosine",
        "optim.weight_decay=0.0",
        f"optim.max_steps={300 if gpu else 120}",
        "output.log_every=5",
        "output.save_every=0",
        "zero.stage=2",
        f"precision.dtype={'bf16' if gpu else 'fp32'}",
        f"cluster.gpus_per_node={1 if gpu else 0}",
        "cluster.nproc_per_node=1",
        f"output.dir={out}",
    ]
    return resolve(sets=sets)


def generate_sample(model_dir: Path, prompt: str, max_new_tokens: int = 40, seed: int = 0) -> str:
    import torch

    keep_bitsandbytes_out("full")  # the sample loads the full model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the quickstart's output
    tok = load_tokenizer_from(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.7,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def quickstart(out: str | Path, *, force: bool = False, say: Callable[[str], None] = print) -> RunDir:
    """Train the quickstart spec into `out` (refused when not empty, unless `force`) and sample from the
    result. `say` gets the lines around the run (what trains, the sample, where the output is); the run
    prints its plan and the loss itself."""
    t0 = time.monotonic()
    root = Path(out).expanduser().resolve()
    if root.is_dir() and any(root.iterdir()) and not force:
        raise UserError(f"{root} is not empty; choose a new --out or pass --force")
    gpu = has_gpu()
    spec = quickstart_spec(root, gpu)
    say(f"quickstart: tiny Llama ({'GPU, bf16' if gpu else 'no GPU found: CPU, precision fp32'}), "
        f"embedded corpus, {spec.optim.max_steps} steps")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rd = local.run(spec, root, force=True, quiet=True)
    say(f"sample       {generate_sample(rd.final, PROMPT)!r}")
    say(f"done         {time.monotonic() - t0:.0f} s in all; model in {rd.final}, log in {rd.launch_log}")
    return rd
