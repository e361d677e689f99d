"""Dollars per 1M trained tokens: from dollars paid over tokens trained, or from a price per
device-hour over a throughput, and the price of a device-hour a cluster section names. Estimate, bench
and cost all price tokens here."""

from __future__ import annotations

from launcher.config.spec import ClusterSpec
from launcher.plan.plan import ranks_per_node


def usd_per_device_hour(cluster: ClusterSpec) -> float | None:
    """The price of one device-hour the cluster section carries (from its profile): a GPU-hour on GPU
    nodes; on CPU nodes a node-hour shared by the node's ranks. None when it names no price."""
    if cluster.gpus_per_node:
        return cluster.usd_per_gpu_hour
    if cluster.usd_per_node_hour is None:
        return None
    return cluster.usd_per_node_hour / ranks_per_node(cluster)


def usd_per_mtok(usd: float | None, tokens: float | None) -> float | None:
    """$ per 1M tokens = usd / tokens x 1e6; None without a price or without tokens."""
    if usd is None or not tokens:
        return None
    return usd / tokens * 1e6


def usd_per_mtok_at(usd_per_device_hour: float | None, devices: int, tokens_per_s: float | None) -> float | None:
    """$ per 1M tokens of `devices` devices at a price per device-hour, training `tokens_per_s` tokens
    a second together: price x devices / 3600 (dollars a second) over tokens_per_s, x 1e6."""
    if usd_per_device_hour is None:
        return None
    return usd_per_mtok(usd_per_device_hour * devices / 3600, tokens_per_s)
