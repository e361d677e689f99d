"""Options shared by the commands that take a run spec, and the one function that resolves them."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from launcher.config.spec import FLAG_FIELDS, RunSpec

def _opt(decls: list[str], *extra: str, **kw: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return (*decls, *extra), kw


SPEC_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    _opt(["--model"], help="'tiny', a local model directory, or a hub id."),
    _opt(["--task"], type=click.Choice(["pretrain", "sft"]), help="Continued pretraining or fine-tuning."),
    _opt(["--method"], type=click.Choice(["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "freeze"]), help="Which weights train."),
    _opt(["--data"], help="Data file, folder or datasets hub name (default: embedded corpus)."),
    _opt(["--seq-len"], type=int, help="Tokens per sequence."),
    _opt(["--packing/--no-packing"], default=None, help="SFT: pack examples into seq-len."),
    _opt(["--zero"], type=click.IntRange(0, 3), help="ZeRO stage."),
    _opt(["--offload-optimizer"], type=click.Choice(["none", "cpu", "nvme"]), help="Optimizer offload."),
    _opt(["--offload-param"], type=click.Choice(["none", "cpu", "nvme"]), help="Parameter offload (ZeRO-3)."),
    _opt(["--nvme-path"], help="NVMe folder for nvme offload."),
    _opt(["--precision"], type=click.Choice(["bf16", "fp16", "fp32"]), help="Training precision."),
    _opt(["--attn"], type=click.Choice(["auto", "flash2", "sdpa", "eager"]), help="Attention kernel."),
    _opt(["--grad-ckpt/--no-grad-ckpt"], default=None, help="Gradient checkpointing."),
    _opt(["--micro-batch"], type=int, help="Sequences per rank per step."),
    _opt(["--global-batch"], type=int, help="Sequences per optimizer step (all ranks)."),
    _opt(["--global-batch-tokens"], type=int, help="Tokens per optimizer step (all ranks)."),
    _opt(["--nodes"], type=int, help="Number of nodes."),
    _opt(["--gpus-per-node"], type=int, help="GPUs each node has (0: CPU ranks over gloo)."),
    _opt(["--nproc-per-node", "--nproc"], "nproc_per_node", type=int, help="Ranks per node."),
    _opt(["--lr"], type=float, help="Peak learning rate."),
    _opt(["--max-steps"], type=int, help="Optimizer steps."),
    _opt(["--save-every"], type=int, help="Checkpoint every N steps."),
    _opt(["--name"], help="Run name (also the Slurm job name)."),
    _opt(["--cluster"], help="Cluster profile NAME (lowest layer: profile < SPEC < flags < --set)."),
    _opt(["--clusters"], type=click.Path(dir_okay=False),
         help="Cluster profiles file (default $LAUNCHER_CLUSTERS or ~/.config/launcher/clusters.yaml)."),
    _opt(["--set", "sets"], multiple=True, metavar="KEY=VALUE",
                 help="Set any spec field, e.g. --set optim.warmup_steps=10 (repeatable; wins over flags)."),
]
# Cluster settings a user changes per submission: flags of the commands that render jobs.
CLUSTER_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    _opt(["--partition"], help="Slurm partition."),
    _opt(["--account"], help="Slurm account."),
    _opt(["--qos"], help="Slurm QoS."),
    _opt(["--time"], help="Time limit, [D-]HH:MM:SS."),
    _opt(["--net-ifname"], help="Network interface for NCCL/gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)."),
    _opt(["--launcher"], type=click.Choice(["torchrun", "srun"]), help="torchrun per node, or one srun task per rank."),
]
_FLAG_NAMES = {click.Option(list(d), **kw).name for d, kw in SPEC_FLAGS + CLUSTER_FLAGS}
_NOT_FIELDS = {"sets", "cluster", "clusters"}
assert _FLAG_NAMES - _NOT_FIELDS <= set(FLAG_FIELDS), _FLAG_NAMES - set(FLAG_FIELDS)


def spec_options(*, spec_required: bool = False, cluster_flags: bool = False,
                 allow_from: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add SPEC and the shared flags (and, with cluster_flags, the Slurm settings) to a command;
    the command receives `spec: RunSpec` instead."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        names = _FLAG_NAMES | {"spec_path", "from_run"}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            picked = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            kwargs["spec"] = resolve_from_cli(picked)
            return fn(**kwargs)

        for decls, kw in reversed(SPEC_FLAGS + (CLUSTER_FLAGS if cluster_flags else [])):
            wrapper = click.option(*decls, **kw)(wrapper)
        if allow_from:
            wrapper = click.option("--from", "from_run", type=click.Path(file_okay=False), metavar="RUN_DIR",
                                   help="Start from RUN_DIR's resolved spec (an identical run in a new run dir; "
                                        "flags still apply on top).")(wrapper)
        wrapper = click.argument("spec_path", required=spec_required, type=click.Path(dir_okay=False),
                                 metavar="SPEC" if spec_required else "[SPEC]")(wrapper)
        return wrapper

    return decorate


def resolve_from_cli(picked: dict[str, Any]) -> RunSpec:
    from launcher.config import profiles

    spec_path = picked.pop("spec_path", None)
    from_run = picked.pop("from_run", None)
    if from_run:
        from launcher.errors import UserError
        from launcher.rundir.layout import open_run_dir

        if spec_path:
            raise UserError("give a SPEC or --from RUN_DIR, not both")
        spec_path = open_run_dir(from_run).spec_path
    sets = picked.pop("sets", ()) or ()
    cluster, clusters = picked.pop("cluster", None), picked.pop("clusters", None)
    return profiles.resolve(spec_path, flags=picked, sets=list(sets), cluster=cluster, clusters_file=clusters)
