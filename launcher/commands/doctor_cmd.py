"""`launcher doctor`: the environment on each node of a partition, through one srun task per node
(launcher/ops/doctor.py). No heavy imports here: the nodes import torch, not this process."""

from __future__ import annotations

import json

import click

from launcher.config import profiles
from launcher.ops.doctor import Target, collect, format_report


@click.command()
@click.option("--cluster", default=None, metavar="NAME",
              help="Cluster profile: its default partition, account, QoS, GPUs per node and net_ifname.")
@click.option("--clusters", type=click.Path(dir_okay=False), default=None,
              help="Cluster profiles file (default $LAUNCHER_CLUSTERS or ~/.config/launcher/clusters.yaml).")
@click.option("--partition", default=None, help="Slurm partition (default: the profile's, else Slurm's default).")
@click.option("--nodes", type=click.IntRange(1, 4096), default=2, show_default=True,
              help="Nodes to probe, one task each (2 or more compare nodes and test the shared dir).")
@click.option("--gpus-per-node", type=click.IntRange(0, 64), default=None,
              help="GPUs to request per node, so the probe sees them, and that torch must see there "
                   "(default: the profile partition's, else 0).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Output dir to check: free disk, and whether every node sees the others' files there.")
@click.option("--timeout", "timeout_s", type=click.IntRange(10, 86400), default=300, show_default=True,
              help="Seconds to wait for srun, queueing included.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(cluster: str | None, clusters: str | None, partition: str | None, nodes: int, gpus_per_node: int | None,
           out: str, timeout_s: int, as_json: bool) -> int:
    """Check each node's environment before a real job does: one srun task per node reports hostname,
    Python and package versions (launcher, torch, deepspeed, transformers, peft, bitsandbytes, datasets,
    flash_attn), torch/CUDA/NCCL versions, whether flash_attn imports and bitsandbytes' CUDA library
    loads with this torch ("no CUDA" on CPU nodes), whether DeepSpeed can compile its CPU Adam
    (optimizer offload), the GPUs, free disk under --out, whether --out is shared between the nodes, and
    the network interface that reaches the first node (for --net-ifname).

    With --cluster, the probe runs inside the profile's container, where the ranks run.

    Exits 1 when a check fails: versions that differ between nodes or lie below launcher's floors, a
    CPU-only torch or fewer GPUs than --gpus-per-node, an output dir that is not shared, a node that
    did not answer, srun that failed. Without srun on the PATH it probes this machine once.
    """
    target = Target(nodes=nodes, partition=partition, gpus_per_node=gpus_per_node or 0)
    if cluster:
        profile = profiles.load(cluster, clusters)
        name, part = profile.partition(partition)
        target.partition = name
        target.account, target.qos, target.net_ifname = profile.account, profile.qos, profile.net_ifname
        target.container = profile.container  # versions as the ranks see them: inside their container
        if gpus_per_node is None and part is not None:
            target.gpus_per_node = part.gpus_per_node
    report = collect(target, out, timeout_s=timeout_s)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for line in format_report(report):
            click.echo(line)
    return 0 if report.ok else 1
