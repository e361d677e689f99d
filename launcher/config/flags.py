"""The spec flags that every command taking a run spec shares: one table of flag -> spec field. Each
option's type and choices are read from the field's annotation in launcher/config/spec.py, so a new
choice in the schema is a new choice on the command line."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import click
from pydantic import BaseModel

from launcher.config.spec import RunSpec


@dataclass(frozen=True)
class Flag:
    name: str  # the key in the flags mapping (`resolve(flags=...)`) and the click parameter name
    field: str | None  # dotted spec field it sets; None for the layer options (--cluster, --clusters, --set)
    decls: tuple[str, ...] = ()  # option names; () = no command-line option (library callers only)
    help: str = ""
    click: dict[str, Any] = field(default_factory=dict)  # click settings a field's annotation does not give


SPEC: tuple[Flag, ...] = (
    Flag("model", "model.name", ("--model",), "'tiny', a local model directory, or a hub id."),
    Flag("task", "task", ("--task",), "Continued pretraining, fine-tuning (sft), or preference tuning (dpo, orpo, kto, simpo, rm: reward model)."),
    Flag("method", "method.name", ("--method",), "Which weights train."),
    Flag("data", "data.path", ("--data",), "Data file, folder or datasets hub name (default: embedded corpus)."),
    Flag("seq_len", "data.seq_len", ("--seq-len",), "Tokens per sequence."),
    Flag("packing", "data.packing", ("--packing",), "SFT: pack examples into seq-len."),
    Flag("zero", "zero.stage", ("--zero",), "ZeRO stage (auto: the lowest that fits the device)."),
    Flag("offload_optimizer", "zero.offload_optimizer", ("--offload-optimizer",), "Optimizer offload."),
    Flag("offload_param", "zero.offload_param", ("--offload-param",), "Parameter offload (ZeRO-3)."),
    Flag("nvme_path", "zero.nvme_path", ("--nvme-path",), "NVMe folder for nvme offload."),
    Flag("precision", "precision.dtype", ("--precision",), "Training precision (auto: bf16 where the device runs it fast)."),
    Flag("attn", "model.attn", ("--attn",), "Attention kernel."),
    Flag("grad_ckpt", "model.grad_ckpt", ("--grad-ckpt",), "Gradient checkpointing."),
    Flag("loss", "optim.loss", ("--loss",), "LM loss: chunked never holds the whole logits; liger needs CUDA."),
    Flag("compile", "model.compile", ("--compile",), "torch.compile the decoder blocks."),
    Flag("micro_batch", "optim.micro_batch", ("--micro-batch",), "Sequences per rank per step."),
    Flag("global_batch", "optim.global_batch", ("--global-batch",), "Sequences per optimizer step (all ranks)."),
    Flag("global_batch_tokens", "optim.global_batch_tokens", ("--global-batch-tokens",),
         "Tokens per optimizer step (all ranks)."),
    Flag("nodes", "cluster.nodes", ("--nodes",), "Number of nodes."),
    Flag("gpus_per_node", "cluster.gpus_per_node", ("--gpus-per-node",), "GPUs each node has (0: CPU ranks over gloo)."),
    Flag("nproc_per_node", "cluster.nproc_per_node", ("--nproc-per-node", "--nproc"), "Ranks per node."),
    Flag("lr", "optim.lr", ("--lr",), "Peak learning rate."),
    Flag("max_steps", "optim.max_steps", ("--max-steps",), "Optimizer steps."),
    Flag("save_every", "output.save_every", ("--save-every",), "Checkpoint every N steps."),
    Flag("name", "name", ("--name",), "Run name (also the Slurm job name)."),
    Flag("cluster", None, ("--cluster",), "Cluster profile NAME (lowest layer: profile < SPEC < flags < --set)."),
    Flag("clusters", None, ("--clusters",),
         "Cluster profiles file (default $LAUNCHER_CLUSTERS or ~/.config/launcher/clusters.yaml).",
         {"type": click.Path(dir_okay=False)}),
    Flag("sets", None, ("--set",), "Set any spec field, e.g. --set optim.warmup_steps=10 (repeatable; wins over flags).",
         {"multiple": True, "metavar": "KEY=VALUE"}),
)
# Cluster settings a user changes per submission: flags of the commands that render jobs.
CLUSTER: tuple[Flag, ...] = (
    Flag("partition", "cluster.partition", ("--partition",), "Slurm partition."),
    Flag("account", "cluster.account", ("--account",), "Slurm account."),
    Flag("qos", "cluster.qos", ("--qos",), "Slurm QoS."),
    Flag("time", "cluster.time", ("--time",), "Time limit, [D-]HH:MM:SS."),
    Flag("net_ifname", "cluster.net_ifname", ("--net-ifname",),
         "Network interface for NCCL/gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)."),
    Flag("launcher", "cluster.launcher", ("--launcher",), "torchrun per node, or one srun task per rank."),
)
# Keys library callers may pass in `flags` that have no command-line option.
LIBRARY: tuple[Flag, ...] = (
    Flag("output_dir", "output.dir"),
    Flag("resume", "output.resume"),
)

FLAG_FIELDS: dict[str, str] = {f.name: f.field for f in (*SPEC, *CLUSTER, *LIBRARY) if f.field is not None}


def annotation(dotted: str) -> Any:
    """The type annotation of a spec field, `None` stripped from an optional one."""
    model: Any = RunSpec
    ann: Any = None
    for key in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            raise KeyError(f"{dotted}: not a field of the run spec")
        ann = model = model.model_fields[key].annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            ann = args[0]
    if typing.get_origin(ann) is typing.Annotated:  # Int, Float: the strict number types of the spec
        ann = typing.get_args(ann)[0]
    return ann


class _Mixed(click.Choice):
    """Choices of words and whole numbers (`--zero auto|0|1|2|3`): a number is passed on as an int."""

    def __init__(self, values: tuple[Any, ...]) -> None:
        super().__init__([str(v) for v in values])

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        word = super().convert(str(value), param, ctx)
        return int(word) if word.isdigit() else word


def _typed(flag: Flag) -> tuple[tuple[str, ...], dict[str, Any]]:
    """click's option names and settings for one flag: the type from the field's annotation.

    Only the field's type and choices are checked by click; value ranges are the spec's, so that every
    bad value is reported at once, naming the field."""
    decls, kw = flag.decls, {"help": flag.help, **flag.click}
    if flag.field is None:
        return (*decls, flag.name), kw
    ann = annotation(flag.field)
    if typing.get_origin(ann) is Literal:
        values = typing.get_args(ann)
        if all(isinstance(v, str) for v in values):
            kw["type"] = click.Choice(list(values))
        elif all(type(v) is int for v in values) and sorted(values) == list(range(min(values), max(values) + 1)):
            kw["type"] = click.IntRange(min(values), max(values))
        elif all(type(v) in (int, str) for v in values):
            kw["type"] = _Mixed(values)
        else:
            raise TypeError(f"{flag.field}: no command-line type for {ann}")
    elif ann is bool:
        decls = tuple(f"{d}/--no-{d[2:]}" for d in decls)
        kw["default"] = None  # not given: the spec's layers decide
    elif ann in (int, float):
        kw["type"] = ann
    elif ann is not str:
        raise TypeError(f"{flag.field}: no command-line type for {ann}")
    return (*decls, flag.name), kw


# (option names, click settings) per flag, in the order --help lists them.
SPEC_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [_typed(f) for f in SPEC]
CLUSTER_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [_typed(f) for f in CLUSTER]
