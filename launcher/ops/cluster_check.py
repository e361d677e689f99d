"""A cluster profile against the live cluster: `scontrol show partition` / `scontrol show node`
(the same data sinfo summarises) and, where the profile names them, sacctmgr's accounts and QoS.

Compared, for every partition of the profile: that it exists (and is up), GPUs per node and their
type (each node's Gres), CPUs and memory per node (when the profile states them), the time limit
(MaxTime; a profile without max_time means "no limit") and the node limit (MaxNodes, or the
partition's node count when unlimited). Every difference is listed, with the value on each side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.config.profiles import Partition, Profile, mem_mib
from launcher.ops import slurmtools as st


@dataclass(frozen=True)
class Difference:
    where: str
    what: str
    profile: str
    cluster: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: profile says {self.profile}, cluster has {self.cluster}"

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "what": self.what, "profile": self.profile, "cluster": self.cluster}


def _limit(text: str | None) -> int | None:
    t = (text or "").strip().upper()
    return None if t in ("", "UNLIMITED", "INFINITE", "N/A") else st.parse_int(t)


def _fmt_time(seconds: int | None) -> str:
    return "no limit" if seconds is None else st.format_duration(seconds)


def _node_gpus(node: dict[str, str]) -> tuple[int, list[str]]:
    gres = [g for g in st.parse_gres(node.get("Gres")) if g[0] == "gpu"]
    return sum(n for _, _, n in gres), sorted({t.lower() for _, t, _ in gres if t})


def compare_partition(pname: str, part: Partition, rec: dict[str, str],
                      nodes: dict[str, dict[str, str]]) -> tuple[list[Difference], list[str]]:
    """Differences between one profile partition and its `scontrol show partition` record."""
    diffs: list[Difference] = []
    notes: list[str] = []
    where = f"partition {pname}"
    state = rec.get("State", "")
    if state and state != "UP":
        notes.append(f"{where} is {state}")
    # time limit
    cluster_time = st.parse_duration(rec.get("MaxTime"))
    profile_time = st.parse_duration(part.max_time) if part.max_time else None
    if profile_time != cluster_time:
        diffs.append(Difference(where, "max time", _fmt_time(profile_time) if part.max_time else "no limit (max_time unset)",
                                _fmt_time(cluster_time) + f" (MaxTime={rec.get('MaxTime')})"))
    # node limit
    hosts = st.expand_hostlist(rec.get("Nodes"))
    total = st.parse_int(rec.get("TotalNodes")) or len(hosts)
    max_nodes = _limit(rec.get("MaxNodes"))
    effective = min(max_nodes, total) if max_nodes is not None else total
    if part.max_nodes is not None and part.max_nodes != effective:
        diffs.append(Difference(where, "max nodes", str(part.max_nodes),
                                f"{effective} (MaxNodes={rec.get('MaxNodes')}, {total} node(s))"))
    elif part.max_nodes is None and max_nodes is not None and max_nodes < total:
        diffs.append(Difference(where, "max nodes", "no limit (max_nodes unset)", f"MaxNodes={max_nodes}"))
    # the nodes
    max_mem = _limit(rec.get("MaxMemPerNode"))
    max_cpus = _limit(rec.get("MaxCPUsPerNode"))
    want_type = (part.gpu_type or "").lower() or None
    for h in hosts:
        node = nodes.get(h)
        nw = f"{where}, node {h}"
        if node is None:
            diffs.append(Difference(nw, "node", "listed", "no such node in `scontrol show node`"))
            continue
        count, types = _node_gpus(node)
        if count != part.gpus_per_node:
            diffs.append(Difference(nw, "GPUs per node", str(part.gpus_per_node), f"{count} (Gres={node.get('Gres')})"))
        if count and (want_type or types) and [want_type] != types:
            diffs.append(Difference(nw, "GPU type", want_type or "(gpu_type unset)",
                                    f"{', '.join(types) or 'untyped'} (Gres={node.get('Gres')})"))
        elif not count and want_type:
            diffs.append(Difference(nw, "GPU type", want_type, "no GPUs"))
        if part.cpus_per_node is not None:
            cpus = st.parse_int(node.get("CPUTot"))
            usable = min(cpus, max_cpus) if max_cpus is not None else cpus
            if usable != part.cpus_per_node:
                diffs.append(Difference(nw, "CPUs per node", str(part.cpus_per_node),
                                        f"{usable} (CPUTot={cpus}" + (f", MaxCPUsPerNode={max_cpus})" if max_cpus else ")")))
        if part.mem_per_node is not None:
            mem = st.parse_int(node.get("RealMemory"))
            usable = min(mem, max_mem) if max_mem is not None else mem
            want = mem_mib(part.mem_per_node)
            if abs(want - usable) > 0.01 * max(usable, 1):
                diffs.append(Difference(nw, "memory per node", f"{part.mem_per_node} ({want} MiB)",
                                        f"{usable} MiB (RealMemory={mem}" + (f", MaxMemPerNode={max_mem})" if max_mem else ")")))
    return diffs, notes


def compare(profile: Profile, partitions: list[dict[str, str]], nodes: list[dict[str, str]],
            accounts: set[str] | None = None, qos: set[str] | None = None) -> tuple[list[Difference], list[str]]:
    """Every difference between the profile and the cluster's records (pure). accounts/qos: the
    names sacctmgr knows (None: not checked)."""
    parts = {p.get("PartitionName", ""): p for p in partitions}
    by_node = {n.get("NodeName", ""): n for n in nodes}
    diffs: list[Difference] = []
    notes: list[str] = []
    if not profile.partitions:
        diffs.append(Difference(f"profile {profile.name}", "partitions", "none", ", ".join(sorted(parts)) or "none"))
    for pname, part in profile.partitions.items():
        rec = parts.get(pname)
        if rec is None:
            diffs.append(Difference(f"partition {pname}", "exists", "yes",
                                    f"no such partition (it has: {', '.join(sorted(parts)) or 'none'})"))
            continue
        d, n = compare_partition(pname, part, rec, by_node)
        diffs += d
        notes += n
        if profile.account and rec.get("AllowAccounts", "ALL") not in ("ALL", ""):
            allowed = rec["AllowAccounts"].split(",")
            if profile.account not in allowed:
                diffs.append(Difference(f"partition {pname}", "account", profile.account,
                                        f"AllowAccounts={rec['AllowAccounts']}"))
    if profile.default_partition and profile.default_partition not in profile.partitions:
        diffs.append(Difference(f"profile {profile.name}", "default_partition", profile.default_partition,
                                "not one of the profile's partitions"))
    if accounts is not None and profile.account and profile.account not in accounts:
        diffs.append(Difference("accounting", "account", profile.account, "no such account (sacctmgr)"))
    if qos is not None and profile.qos and profile.qos not in qos:
        diffs.append(Difference("accounting", "QoS", profile.qos, "no such QoS (sacctmgr)"))
    return diffs, notes


def _sacctmgr_names(kind: str, name: str) -> set[str] | None:
    import shutil

    if shutil.which("sacctmgr") is None:
        return None
    try:
        cp = st.run("sacctmgr", "-n", "-P", "show", kind, name, "format=" + ("account" if kind == "account" else "name"),
                    check=False)
    except st.SlurmToolError:
        return None
    if cp.returncode != 0:
        return None
    return {line.strip() for line in cp.stdout.splitlines() if line.strip()}


def check(profile: Profile) -> dict[str, Any]:
    """Compare the profile with the live cluster; JSON-ready result with the differences."""
    partitions = st.scontrol_show("partition")
    nodes = st.scontrol_show("node")
    accounts = _sacctmgr_names("account", profile.account) if profile.account else None
    qos = _sacctmgr_names("qos", profile.qos) if profile.qos else None
    diffs, notes = compare(profile, partitions, nodes, accounts, qos)
    return {"profile": profile.name, "partitions": sorted(profile.partitions),
            "cluster_partitions": sorted(p.get("PartitionName", "") for p in partitions),
            "differences": [d.to_dict() for d in diffs], "lines": [str(d) for d in diffs], "notes": notes}
