"""`launcher estimate`: memory per GPU, step time and cost of a setup, from config.json alone."""

from __future__ import annotations

import json
import re

import click

from launcher.commands.common import spec_options
from launcher.config.resolve import with_overrides
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan import estimate as est
from launcher.plan import price
from launcher.plan.plan import make_plan

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory {text!r}: write a size such as 80GiB, 80GB or 85899345920")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.2f} GiB"


@click.command()
@spec_options()
@click.option("--gpu", "gpu", help="Device from the table (H100-80GB, H200, A100-80GB, ...); "
              "default H100-80GB for GPU specs.")
@click.option("--device-memory", help="Memory per device (e.g. 80GiB); overrides the table.")
@click.option("--usd-per-device-hour", type=float, help="Price of one device-hour, for $ per 1M tokens.")
@click.option("--train-tokens", type=float, help="Tokens to train, for total time and cost.")
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
    plan = make_plan(spec)
    notes = []
    if gpu is None and spec.cluster.gpus_per_node > 0:
        gpu = "H100-80GB"
        notes.append("device assumed H100-80GB; pass --gpu")
    if usd_per_device_hour is None:  # the cluster profile's price, if the spec came with one
        usd_per_device_hour = price.usd_per_device_hour(spec.cluster)
    kw = dict(device=gpu, device_memory=parse_bytes(device_memory) if device_memory else None,
              usd_per_device_hour=usd_per_device_hour, train_tokens=int(train_tokens) if train_tokens else None,
              mfu=mfu or est.DEFAULT_MFU)
    if fit:
        probe = est.estimate(spec, plan, **kw)
        if probe.device_memory_bytes is None:
            raise UserError("--fit needs a device memory: pass --gpu NAME or --device-memory SIZE")
        best = est.fit_micro_batch(spec, plan, probe.device_memory_bytes, **kw)
        if best is None:
            raise UserError(f"no micro batch fits {_gib(probe.device_memory_bytes)}: even 1 needs "
                            f"{_gib(est.estimate(spec, plan, micro_batch=1, **kw).peak_bytes_per_gpu)}; "
                            f"raise --zero, add --offload-optimizer cpu, --grad-ckpt or more GPUs")
        spec = with_overrides(spec, {"optim": {"micro_batch": best}})
        plan = make_plan(spec)
        notes.append(f"--fit: micro batch {best}")
    e = est.estimate(spec, plan, **kw)
    e.notes[:0] = notes
    if as_json:
        click.echo(json.dumps({"micro_batch": plan.micro_batch, **e.to_dict()}, indent=2))
        return
    rows = [
        ("parameters", f"{e.params:,} ({e.trainable_params:,} trainable)"),
        ("ranks", f"{plan.world_size}, micro batch {plan.micro_batch} x seq {plan.seq_len}"),
        ("weights", _gib(e.weights_bytes_per_gpu)),
        ("gradients", _gib(e.gradients_bytes_per_gpu)),
        ("optimizer states", _gib(e.optimizer_bytes_per_gpu)),
        ("gathered (ZeRO-3)", _gib(e.gathered_params_bytes_per_gpu)),
        ("= model states", _gib(e.model_states_bytes_per_gpu)),
        ("activations", f"{_gib(e.activation_bytes_per_gpu)} (logits peak {_gib(e.logits_bytes_per_gpu)})"),
        ("DeepSpeed buffers", _gib(e.buffer_bytes_per_gpu)),
        ("peak per GPU", _gib(e.peak_bytes_per_gpu)),
        ("offloaded per node", _gib(e.cpu_offload_bytes_per_node)),
        ("device", f"{e.device or '-'} {_gib(e.device_memory_bytes)}; fits: "
                   f"{'-' if e.fits is None else ('yes' if e.fits else 'NO')}"),
        ("FLOPs per token", f"model {e.model_flops_per_token:.3e}, hardware {e.hardware_flops_per_token:.3e}"),
        ("step time", "-" if e.step_time_s is None else f"{e.step_time_s:.3f} s at MFU {e.assumed_mfu:.0%}"),
        ("tokens/s", "-" if e.tokens_per_s is None else f"{e.tokens_per_s:,.0f}"),
        ("$ per 1M tokens", "-" if e.usd_per_mtok is None else f"{e.usd_per_mtok:.4f}"),
    ]
    if e.train_tokens:
        rows.append(("training", f"{e.train_tokens:,} tokens: {e.train_time_h or 0:.1f} h"
                                 + (f", ${e.train_usd:,.0f}" if e.train_usd is not None else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    for note in e.notes:
        click.echo(f"note: {note}")
