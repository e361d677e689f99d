"""Cluster profiles: the lowest spec layer, and partition limits refused before anything is queued."""

from __future__ import annotations

import textwrap

import pytest

from launcher.config.profiles import resolve
from launcher.errors import SpecError

PROFILES = textwrap.dedent("""
    lab:
      account: ml
      qos: normal
      default_partition: gpu
      partitions:
        gpu: {gpu_type: h100, gpus_per_node: 8, cpus_per_node: 96, mem_per_node: 1000G,
              max_time: "2-00:00:00", max_nodes: 4, usd_per_gpu_hour: 2.5}
        small: {gpu_type: a10g, gpus_per_node: 1, max_time: "4:00:00", max_nodes: 1, usd_per_gpu_hour: 0.8}
        cpu: {cpus_per_node: 64, mem_per_node: 256G, max_time: "12:00:00", usd_per_node_hour: 1.2}
      net_ifname: ib0
      nccl: {ib_hca: mlx5}
      setup: ["module load cuda/12.4"]
""")


@pytest.fixture
def clusters(tmp_path, monkeypatch):
    p = tmp_path / "clusters.yaml"
    p.write_text(PROFILES)
    monkeypatch.setenv("LAUNCHER_CLUSTERS", str(p))
    return p


def test_profile_fills_what_no_layer_set(clusters):
    spec = resolve(cluster="lab")
    c = spec.cluster
    assert (c.profile, c.account, c.partition, c.gpus_per_node, c.net_ifname) == ("lab", "ml", "gpu", 8, "ib0")
    assert c.time == "2-00:00:00" and c.usd_per_gpu_hour == 2.5 and c.nccl.ib_hca == "mlx5"


def test_spec_flags_and_set_win_over_the_profile(clusters, tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("cluster: {account: other, time: '10:00:00'}\n")
    spec = resolve(spec_file, flags={"nodes": 2, "qos": None}, sets=["cluster.qos=high"], cluster="lab")
    c = spec.cluster
    assert (c.account, c.time, c.nodes, c.qos) == ("other", "10:00:00", 2, "high")


def test_the_chosen_partition_sets_gpus_and_price(clusters):
    c = resolve(flags={"partition": "small"}, cluster="lab").cluster
    assert (c.gpus_per_node, c.usd_per_gpu_hour, c.time) == (1, 0.8, "4:00:00")


@pytest.mark.parametrize("flags,sets,needle", [
    ({"nodes": 8}, [], "max_nodes 4"),
    ({"gpus_per_node": 16}, [], "8 GPUs per node"),
    ({"time": "3-00:00:00"}, [], "time limit 2-00:00:00"),
    ({}, ["cluster.mem=2T"], "1000G per node"),
    ({"partition": "gpu2"}, [], "not a partition"),
])
def test_oversize_requests_are_refused_with_the_limit(clusters, flags, sets, needle):
    with pytest.raises(SpecError, match=needle):
        resolve(flags=flags, sets=sets, cluster="lab")


def test_unknown_cluster_and_missing_file(clusters, tmp_path):
    with pytest.raises(SpecError, match="has no cluster named 'big'.*lab"):
        resolve(cluster="big")
    with pytest.raises(SpecError, match="no cluster profiles file"):
        resolve(cluster="lab", clusters_file=str(tmp_path / "none.yaml"))


def test_a_typo_in_a_profile_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lab:\n  acount: ml\n")
    with pytest.raises(SpecError, match="Did you mean 'account'"):
        resolve(cluster="lab", clusters_file=str(p))


def test_cli_spec_shows_the_profile_layer_and_refuses_oversize(cli, clusters):
    out = cli("spec", "--cluster", "lab", "--clusters", str(clusters), check=True).stdout
    assert "profile: lab" in out and "account: ml" in out and "partition: gpu" in out
    proc = cli("config", "--cluster", "lab", "--clusters", str(clusters), "--nodes", "9")
    assert proc.returncode == 2 and "max_nodes 4" in proc.stderr


def test_estimate_uses_the_profile_price(cli, clusters):
    import json

    out = json.loads(cli("estimate", "--cluster", "lab", "--clusters", str(clusters), "--json", check=True).stdout)
    assert out["usd_per_device_hour"] == 2.5 and out["usd_per_mtok"] > 0
