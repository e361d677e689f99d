"""`launcher train` (per-rank entry point), `run` (local launch), `quickstart` and `merge`.

Heavy libraries are imported inside the command functions only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from launcher.commands.common import resolve_from_cli, spec_options
from launcher.errors import UserError
from launcher.config.spec import RunSpec

QUICKSTART_PROMPT = "The function returns"


@click.command()
@spec_options(spec_required=True)
def train(spec: RunSpec) -> None:
    """Train on this rank: the entry point every launcher calls (deepspeed, torchrun, srun).

    SPEC is a run dir's spec.yaml (made by `launcher run --out` or `launcher slurm --out`): the
    run dir holds the DeepSpeed config the ranks use and receives checkpoints, logs and the final model.
    Rank, world size and master address come from the launcher's environment. USR1 or TERM: the
    ranks save a checkpoint at the same optimizer step and exit 3; the next start resumes from it.
    """
    import sys

    from launcher.errors import EXIT_OK, EXIT_REQUEUE
    from launcher.rank.entry import leave_process_group, mark_exit, run_rank
    from launcher.rank.loop import train as train_loop
    from launcher.rank.stop import ignore_stop_signals
    from launcher.rundir import markers

    out_dir = Path(spec.output.dir)
    result = run_rank(out_dir, lambda: train_loop(spec))
    ignore_stop_signals()
    leave_process_group()
    if result.stopped_at is not None:
        mark_exit(out_dir, markers.REQUEUED, EXIT_REQUEUE, f"stopped at step {result.stopped_at} after a signal; "
                  f"checkpoint saved", step=result.stopped_at)
        sys.exit(EXIT_REQUEUE)
    mark_exit(out_dir, markers.COMPLETED, EXIT_OK)


@click.command()
@spec_options(allow_from=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run dir to create (default: the spec's output.dir; required with --from).")
@click.option("--force", is_flag=True, help="Write into a non-empty run dir (generated files are replaced).")
@click.option("--ignore-fit", is_flag=True, help="Start even when the memory estimate exceeds the GPU's memory.")
def run(spec: RunSpec, out: str | None, force: bool, ignore_fit: bool) -> None:
    """Train on this machine through the deepspeed launcher: N GPUs, or N CPU ranks over gloo.

    Pre-flight first (the spec, the model, a data sample, option clashes, the memory estimate: exit 2
    before any rank starts), then the data is tokenized, the run dir written (spec.yaml,
    ds_config.json, plan.txt) and --nproc ranks run `launcher train`. USR1 or TERM to this command:
    the ranks save a checkpoint and stop, exit 3; resume with
    `launcher run RUN_DIR/spec.yaml --out RUN_DIR --force`. `--from RUN_DIR --out NEW_DIR` runs
    RUN_DIR's resolved spec again in a new run dir (flags still apply on top).
    """
    from launcher.submit import local as launch

    from_run = click.get_current_context().params.get("from_run")
    if from_run and out is None:
        raise UserError("--from RUN_DIR makes a new run dir: give it with --out NEW_DIR "
                        "(to resume RUN_DIR itself: launcher run RUN_DIR/spec.yaml --out RUN_DIR --force)")
    rd = launch.run(spec, out or spec.output.dir, force=force, ignore_fit=ignore_fit)
    click.echo(f"done         {rd.path}")


def _has_gpu() -> bool:
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
    return resolve_from_cli({"sets": sets})


def generate_sample(model_dir: Path, prompt: str, max_new_tokens: int = 40, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.7,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False), default="./quickstart-out", show_default=True,
              help="Folder for the run (refused when not empty, unless --force).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def quickstart(out: str, force: bool) -> None:
    """Train the embedded tiny model on the embedded corpus here (CPU or GPU), in about a minute.

    Prints the plan, the loss falling, tokens/s, where the output is, and a sample from the trained model.
    """
    from launcher.submit import local as launch

    t0 = time.monotonic()
    root = Path(out).expanduser().resolve()
    if root.is_dir() and any(root.iterdir()) and not force:
        raise UserError(f"{root} is not empty; choose a new --out or pass --force")
    gpu = _has_gpu()
    spec = quickstart_spec(root, gpu)
    click.echo(f"quickstart: tiny Llama ({'GPU, bf16' if gpu else 'no GPU found: CPU, precision fp32'}), "
               f"embedded corpus, {spec.optim.max_steps} steps")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rd = launch.run(spec, root, force=True, quiet=True)
    click.echo(f"sample       {generate_sample(rd.final, QUICKSTART_PROMPT)!r}")
    click.echo(f"done         {time.monotonic() - t0:.0f} s in all; model in {rd.final}, log in {rd.logs / 'launch.log'}")


def _empty_or_forced(path: Path, force: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise UserError(f"{path} exists and is not empty; choose a new --out or pass --force")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder for the merged model.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def merge(run_dir: str, out: str, force: bool) -> None:
    """Merge RUN_DIR's adapter (lora, qlora, dora, ia3) into its base model; save a plain model + tokenizer to --out.

    For QLoRA the 4-bit base is dequantized to the compute dtype first (the weights the adapter was
    trained against), then the adapter is added. Prefix and prompt tuning are refused: they add virtual
    tokens in front of every input, not a change of weights, so there is nothing to merge.
    """
    from launcher.rundir.layout import open_run_dir

    rd = open_run_dir(run_dir)
    adapter = rd.final
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} holds no adapter (no adapter_config.json); merge is for runs with "
                        f"--method lora, qlora, dora or ia3 that finished training")
    refusal = unmergeable(json.loads((adapter / "adapter_config.json").read_text()))
    if refusal:
        raise UserError(f"{adapter}: {refusal}")
    dest = Path(out).expanduser().resolve()
    _empty_or_forced(dest, force)
    path = merge_adapter(rd.path, rd.load_spec(), dest)
    click.echo(f"merged model + tokenizer in {path}")


# peft types that add virtual tokens (a learned key/value prefix, or input embeddings) instead of changing weights
_VIRTUAL_TOKENS = {"PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning", "P_TUNING": "p-tuning",
                   "MULTITASK_PROMPT_TUNING": "multitask prompt tuning"}


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
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.model import load as model_mod

    adapter = Path(run_dir) / "final"
    cfg: dict[str, Any] = json.loads((adapter / "adapter_config.json").read_text())
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
    from launcher.model import load as model_mod

    if spec.model.name == model_mod.TINY:
        return str(Path(run_dir) / model_mod.BASE_DIRNAME)  # the run dir's own base, even if moved
    named = adapter_cfg.get("base_model_name_or_path")
    if named and (Path(named).is_dir() or not os.path.isabs(named)):
        return str(named)
    return model_mod.model_source(spec)
