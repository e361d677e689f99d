"""Dollars per 1M trained tokens: from dollars paid over tokens trained, or from a price per
device-hour over a throughput. Estimate, bench and cost all price tokens here."""

from __future__ import annotations


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
