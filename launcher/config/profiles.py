"""Cluster profiles: named clusters with their partitions, limits, account, containers, network
settings and prices, kept apart from run specs. `--cluster NAME` selects one; it is the lowest
layer of the spec (profile < spec file < flags < --set).

File: `--clusters FILE`, else $LAUNCHER_CLUSTERS, else ~/.config/launcher/clusters.yaml:

    lab:
      account: ml
      default_partition: gpu
      partitions:
        gpu: {gpu_type: h100, gpus_per_node: 8, cpus_per_node: 96, mem_per_node: 1000G,
              max_time: "2-00:00:00", max_nodes: 16, usd_per_gpu_hour: 2.5, exclusive: false}
        cpu: {cpus_per_node: 64, mem_per_node: 256G, max_time: "12:00:00", usd_per_node_hour: 1.2}
      net_ifname: ib0
      nccl: {ib_hca: mlx5}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher import yamlio
from launcher.config.resolve import deep_merge, user_tree
from launcher.errors import SpecError
from launcher.config.spec import (ClusterSpec, ContainerSpec, Float, Int, NcclSpec, RunSpec, check_tracking_uri,
                                  explain_errors_of, register_model, validate)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)


def mem_mib(text: str) -> int:
    """Slurm memory syntax (default unit MiB) -> MiB."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a memory size (e.g. 4000M, 256G)")
    return int(float(m.group(1)) * {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[m.group(2).upper()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Partition(_Strict):
    gpu_type: str | None = None
    gpus_per_node: Int = Field(0, ge=0)
    cpus_per_node: Int | None = Field(None, ge=1)
    mem_per_node: str | None = None
    max_time: str | None = Field(None, description="partition time limit, Slurm syntax")
    max_nodes: Int | None = Field(None, ge=1)
    exclusive: bool = Field(False, description="nodes are given whole: GPU jobs ask --exclusive and --mem=0")
    usd_per_gpu_hour: Float | None = Field(None, ge=0)
    usd_per_node_hour: Float | None = Field(None, ge=0)
    usd_per_cpu_hour: Float | None = Field(None, ge=0)

    @field_validator("mem_per_node")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None:
            mem_mib(v)
        return v

    @field_validator("max_time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        return None if v is None else ClusterSpec._time(v)  # same syntax as cluster.time


@register_model
class Profile(_Strict):
    name: str = ""
    account: str | None = None
    qos: str | None = None
    default_partition: str | None = None
    partitions: dict[str, Partition] = Field(default_factory=dict)
    container: ContainerSpec | None = None
    container_runtime: Literal["pyxis", "apptainer", "none"] = "none"
    setup: list[str] = Field(default_factory=list)
    net_ifname: str | None = None
    nccl: NcclSpec | None = None
    env: dict[str, str] = Field(default_factory=dict)
    hf_home: str | None = Field(None, description="shared hub cache the jobs read offline")
    mlflow_tracking_uri: str | None = Field(None, description="the cluster's MLflow tracking server "
                                            "(output.mlflow.tracking_uri of its runs)")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_tracking_uri(v)

    def partition(self, name: str | None) -> tuple[str | None, Partition | None]:
        name = name or self.default_partition or (next(iter(self.partitions)) if len(self.partitions) == 1 else None)
        return name, self.partitions.get(name) if name else None

    def layer(self, partition: str | None) -> dict[str, Any]:
        """The profile as the lowest spec layer, for the partition the run will use."""
        name, part = self.partition(partition)
        c: dict[str, Any] = {"profile": self.name}
        for key in ("account", "qos", "net_ifname", "hf_home"):
            if getattr(self, key) is not None:
                c[key] = getattr(self, key)
        if name:
            c["partition"] = name
        if part is not None:
            c["gpus_per_node"] = part.gpus_per_node
            if part.gpu_type:
                c["gpu_type"] = part.gpu_type
            if part.max_time:
                c["time"] = part.max_time
            # what a node has: the plan gives GPU jobs its CPUs (per rank) and memory, not Slurm's default
            if part.cpus_per_node is not None:
                c["cpus_per_node"] = part.cpus_per_node
            if part.mem_per_node is not None:
                c["mem_per_node"] = part.mem_per_node
            if part.exclusive:
                c["exclusive"] = True
            for key in ("usd_per_gpu_hour", "usd_per_node_hour"):
                if getattr(part, key) is not None:
                    c[key] = getattr(part, key)
        if self.setup:
            c["setup"] = list(self.setup)
        if self.container is not None:
            c["container"] = self.container.model_dump()
        if self.nccl is not None:
            c["nccl"] = self.nccl.model_dump()
        if self.env:
            c["env"] = dict(self.env)
        layer: dict[str, Any] = {"cluster": c}
        if self.mlflow_tracking_uri:
            layer["output"] = {"mlflow": {"tracking_uri": self.mlflow_tracking_uri}}
        return layer


def profiles_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("LAUNCHER_CLUSTERS"):
        return Path(os.environ["LAUNCHER_CLUSTERS"]).expanduser()
    return Path("~/.config/launcher/clusters.yaml").expanduser()


def check_file(path: str | None) -> None:
    """--clusters FILE names a file that is there (also where no --cluster picks a profile from it)."""
    if path and not profiles_path(path).is_file():
        raise SpecError(f"--clusters {path}: no such file; give the cluster profiles file (see `launcher cluster "
                        f"--help`) or leave --clusters out")


def load(name: str, path: str | None = None) -> Profile:
    file = profiles_path(path)
    if not file.is_file():
        raise SpecError(f"--cluster {name}: no cluster profiles file at {file}; write one (see `launcher cluster "
                        f"--help`) or point --clusters/LAUNCHER_CLUSTERS at it")
    data = yamlio.load_file(file) or {}
    if not isinstance(data, dict):
        raise SpecError(f"{file}: a cluster profiles file is a YAML mapping of cluster names to profiles, not a "
                        f"{type(data).__name__}")
    if name not in data:
        known = ", ".join(sorted(map(str, data))) or "none"
        raise SpecError(f"--cluster {name}: {file} has no cluster named {name!r} (it has: {yamlio.quote(known, 200)})")
    entry = data[name] or {}
    if not isinstance(entry, dict):
        raise SpecError(f"{file}: {name}: a profile is a mapping (account, partitions, ...), not a "
                        f"{type(entry).__name__}")
    try:
        return Profile.model_validate({**entry, "name": name})
    except ValidationError as exc:
        raise SpecError(explain_errors_of(exc, f"{file}: {name}")) from None


def check_limits(spec: RunSpec, profile: Profile) -> list[str]:
    """What the run asks for beyond its partition's limits, each with the limit named."""
    c = spec.cluster
    name, part = profile.partition(c.partition)
    if name is None:
        return [f"cluster {profile.name!r} has several partitions and no default_partition; "
                f"choose one with --partition ({', '.join(profile.partitions)})"]
    if part is None:
        return [f"cluster.partition={name!r} is not a partition of cluster {profile.name!r}; "
                f"choose one of: {', '.join(profile.partitions)}"]
    where = f"partition {name!r} of cluster {profile.name!r}"
    out = []
    if part.max_nodes is not None and c.nodes > part.max_nodes:
        out.append(f"cluster.nodes={c.nodes} exceeds {where}: max_nodes {part.max_nodes}")
    if c.gpus_per_node > part.gpus_per_node:
        out.append(f"cluster.gpus_per_node={c.gpus_per_node} exceeds {where}: {part.gpus_per_node} GPUs per node")
    if part.max_time is not None:
        limit = spec.cluster.model_copy(update={"time": part.max_time}).time_seconds()
        if c.time_seconds() > limit:
            out.append(f"cluster.time={c.time} exceeds {where}: time limit {part.max_time}")
    if part.mem_per_node and c.mem and c.mem != "0" and mem_mib(c.mem) > mem_mib(part.mem_per_node):
        out.append(f"cluster.mem={c.mem} exceeds {where}: {part.mem_per_node} per node")
    if part.cpus_per_node and c.cpus_per_task:
        tasks = c.nproc_per_node or 1 if c.launcher == "srun" else 1
        if c.cpus_per_task * tasks > part.cpus_per_node:
            out.append(f"cluster.cpus_per_task={c.cpus_per_task} x {tasks} task(s) exceeds {where}: "
                       f"{part.cpus_per_node} CPUs per node")
    return out


def resolve(spec_path: str | Path | None = None, flags: dict[str, Any] | None = None,
            sets: list[str] | tuple[str, ...] = (), cluster: str | None = None,
            clusters_file: str | None = None) -> RunSpec:
    """The run spec with a cluster profile as its lowest layer, refused if it exceeds the partition."""
    tree = user_tree(spec_path, flags, sets)
    if not cluster:
        check_file(clusters_file)  # with --cluster, load() says it
        return validate(tree)
    profile = load(cluster, clusters_file)
    partition = (tree.get("cluster") or {}).get("partition") if isinstance(tree.get("cluster"), dict) else None
    spec = validate(deep_merge(profile.layer(partition if isinstance(partition, str) else None), tree))
    problems = check_limits(spec, profile)
    if problems:
        raise SpecError(problems)
    return spec
