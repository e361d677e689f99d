"""`launcher estimate`: memory per GPU, step time and cost of a setup, from config.json alone."""

from __future__ import annotations

import dataclasses
import json
import re

import click

from launcher.commands.common import FiniteFloat, spec_options
from launcher.plan.prep import TOKENS_PER_S_PER_PROCESS, estimate_prep
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan import estimate as est

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory {text[:80]!r}: write a size such as 80GiB, 80GB or 85899345920",
                        field="--device-memory")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 2**20:
        raise UserError(f"--device-memory {text!r}: a device has at least 1 MiB; write a size such as 80GiB",
                        field="--device-memory")
    return n




@click.command()
@spec_options()
@click.option("--gpu", "gpu", help="Device from the table (H100-80GB, H200, A100-80GB, ...); "
              "default H100-80GB for GPU specs.")
@click.option("--device-memory", help="Memory per device (e.g. 80GiB); overrides the table.")
@click.option("--usd-per-device-hour", type=FiniteFloat(0), help="Price of one device-hour, for $ per 1M tokens.")
@click.option("--train-tokens", type=FiniteFloat(1, max=1e18), help="Tokens to train, for total time and cost.")
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=None, help="Assumed MFU for step time (default 0.40).")
@click.option("--fit", is_flag=True, help="Pick the largest micro batch that fits the device.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def estimate(spec: RunSpec, gpu: str | None, device_memory: str | None, usd_per_device_hour: float | None,
             train_tokens: float | None, mfu: float | None, fit: bool, as_json: bool) -> None:
    """Estimate parameters, memory per GPU, step time, tokens/s and $ per 1M tokens for SPEC.

    Needs only the model's config.json (no weights, no GPU, no torch). Model states agree with
    DeepSpeed's ZeRO estimators where those apply; activations, logits, LoRA/QLoRA and DeepSpeed's
    buffers are counted from tensor shapes.
    """
    plan, e = est.estimate_run(spec, gpu=gpu, device_memory=None if device_memory is None else parse_bytes(device_memory),
                               usd_per_device_hour=usd_per_device_hour,
                               train_tokens=int(train_tokens) if train_tokens else None, mfu=mfu, fit=fit)
    prep = estimate_prep(spec)  # a mixture's token shards: tokens and time to prepare them
    if as_json:
        m = plan.model
        click.echo(json.dumps({"micro_batch": plan.micro_batch, **e.to_dict(),
                               "preparation": None if prep is None else dataclasses.asdict(prep),
                               "model_config": {"origin": m.origin, "source": m.source} if m else None}, indent=2))
        return
    rows = [
        ("model config", plan.model.describe_origin() if plan.model else "-"),
        ("parameters", f"{e.params:,} ({e.trainable_params:,} trainable)"),
        ("ranks", f"{plan.world_size}, micro batch {plan.micro_batch} x seq {plan.seq_len}"),
        ("setup", f"ZeRO-{plan.zero_stage}, {plan.precision}, {plan.loss} loss, {plan.optimizer}"),
        ("weights", est.gib(e.weights_bytes_per_gpu)),
        ("gradients", est.gib(e.gradients_bytes_per_gpu)),
        ("optimizer states", est.gib(e.optimizer_bytes_per_gpu)),
        ("gathered (ZeRO-3)", est.gib(e.gathered_params_bytes_per_gpu)),
        ("= model states", est.gib(e.model_states_bytes_per_gpu)),
        ("activations", f"{est.gib(e.activation_bytes_per_gpu)} (logits peak {est.gib(e.logits_bytes_per_gpu)})"),
        ("DeepSpeed buffers", est.gib(e.buffer_bytes_per_gpu)),
        ("peak per GPU", est.gib(e.peak_bytes_per_gpu)),
        ("offloaded per node", est.gib(e.cpu_offload_bytes_per_node)),
        ("device", f"{e.device or '-'} {est.gib(e.device_memory_bytes)}; fits: "
                   f"{'-' if e.fits is None else ('yes' if e.fits else 'NO')}"),
        ("FLOPs per token", f"model {e.model_flops_per_token:.3e}, hardware {e.hardware_flops_per_token:.3e}"),
        ("step time", "-" if e.step_time_s is None else f"{e.step_time_s:.3f} s at MFU {e.assumed_mfu:.0%}"),
        ("tokens/s", "-" if e.tokens_per_s is None else f"{e.tokens_per_s:,.0f}"),
        ("$ per 1M tokens", "-" if e.usd_per_mtok is None else f"{e.usd_per_mtok:.4f}"),
    ]
    if prep is not None:
        rows.append(("preparation", f"{prep.tokens:,} tokens ({'counted in the shards' if prep.measured else 'from the input bytes at 4.1 bytes/token'}) "
                                    f"in about {prep.seconds:,.0f} s ({prep.seconds / 3600:.1f} h) with {prep.processes} process(es) at "
                                    f"{TOKENS_PER_S_PER_PROCESS:,} tokens/s each (cluster.prep.tasks x data.num_proc)"))
    if e.train_tokens:
        rows.append(("training", f"{e.train_tokens:,} tokens: {e.train_time_h or 0:.1f} h"
                                 + (f", ${e.train_usd:,.0f}" if e.train_usd is not None else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    for note in e.notes:
        click.echo(f"note: {note}")
    for line in plan.choices:
        click.echo(f"chosen: {line}")
