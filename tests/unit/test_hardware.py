"""The hardware table: every name a user or torch gives a GPU model (table key, cluster profile
`gpu_type`, torch device name, any case) resolves to one Device, and the estimator, cost's pricing,
pre-flight's fit check and the bench's peak all resolve it the same way."""

from __future__ import annotations

import pytest
import yaml

from launcher.bench import report
from launcher.submit import preflight
from launcher.config.spec import validate
from launcher.errors import UserError
from launcher.ops import cost
from launcher.plan import hardware
from launcher.plan.estimate import estimate
from launcher.plan.plan import make_plan
from launcher.plan.price import usd_per_mtok, usd_per_mtok_at
from launcher.rundir.layout import RunDir
from launcher.submit.rundir import create

# (name, key): every key, alias and torch name in the table, as written and in other cases
NAMES = sorted({(n, d.key) for d in hardware.DEVICES.values() for name in (d.key, *d.aliases, *d.torch_names)
                for n in (name, name.upper(), name.lower())})

# Every profile gpu_type that pre-flight or cost accepted before the table: each still resolves,
# and the two names they disagreed on resolve the same way for both.
PROFILE_TYPES = {"h100": "H100-80GB", "h100-80gb": "H100-80GB", "h200": "H200", "a100": "A100-80GB",
                 "a100-80gb": "A100-80GB", "a100-40gb": "A100-40GB", "l40s": "L40S", "a10g": "A10G", "l4": "L4"}

# Names torch reports for boards the table lists by another name: found by the model's name in them
OTHER_BOARDS = {"NVIDIA H100 80GB HBM3e": "H100-80GB", "NVIDIA H100 PCIe 80GB": "H100-PCIe",
                "NVIDIA H100 NVL 94GB": "H100-NVL", "NVIDIA A100-SXM4-80GB": "A100-80GB",
                "NVIDIA A100-PCIE-40GB": "A100-40GB", "NVIDIA GH200 96GB HBM3": "GH200", "NVIDIA H200 NVL": "H200",
                "NVIDIA L4": "L4", "nvidia l40s": "L40S", "NVIDIA A10G": "A10G"}
NOT_IN_TABLE = ["cpu (2 cores)", "NVIDIA GH200 144G HBM3e", "NVIDIA L40", "NVIDIA A10", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB",
                "mi300x"]


def _gpu_spec(**cluster):
    return validate({"model": {"name": "tiny"}, "data": {"seq_len": 64}, "optim": {"max_steps": 4, "micro_batch": 2},
                     "cluster": {"gpus_per_node": 2, **cluster}})


def test_the_table_is_keyed_by_each_device_key_and_names_do_not_clash():
    assert all(k == d.key for k, d in hardware.DEVICES.items())
    owners: dict[str, str] = {}
    for d in hardware.DEVICES.values():
        for name in (d.key, *d.aliases, *d.torch_names):
            assert owners.setdefault(name.casefold(), d.key) == d.key, name
        assert d.bf16_tflops > d.tf32_tflops > d.fp32_tflops > 0 and d.memory_bytes > 16 * 2**30


@pytest.mark.parametrize("name,key", NAMES)
def test_every_name_resolves_to_its_device(name, key):
    assert hardware.find(name) is hardware.DEVICES[key]
    assert hardware.find(f"  {name} ") is hardware.DEVICES[key]


@pytest.mark.parametrize("gpu_type,key", sorted(PROFILE_TYPES.items()))
def test_every_profile_gpu_type_accepted_before_still_resolves(gpu_type, key):
    assert hardware.find(gpu_type).key == key


@pytest.mark.parametrize("name,key", sorted(OTHER_BOARDS.items()))
def test_torch_names_of_other_boards_resolve_by_the_model_name(name, key):
    assert hardware.find(name).key == key


@pytest.mark.parametrize("name", [*NOT_IN_TABLE, "", None])
def test_names_outside_the_table_resolve_to_nothing(name):
    assert hardware.find(name) is None


def test_peak_follows_the_training_dtype():
    h100 = hardware.DEVICES["H100-80GB"]
    assert hardware.peak_tflops(h100, "bf16") == hardware.peak_tflops(h100, "fp16") == 989.4
    # torch runs fp32 matmuls on the CUDA cores unless TF32 is switched on (off by default; launcher leaves it)
    assert hardware.peak_tflops(h100, "fp32") == 66.9
    assert hardware.peak_tflops(h100, "fp32", tf32=True) == 494.7


def test_each_h100_board_and_the_gh200_have_their_own_row():
    """The PCIe and NVL boards peak ~25% and ~16% below the SXM one; a GH200 has 96 GB, not the H200's 141."""
    pcie, nvl, sxm = (hardware.find(n) for n in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3"))
    assert (pcie.key, nvl.key, sxm.key) == ("H100-PCIe", "H100-NVL", "H100-80GB")
    assert pcie.bf16_tflops / sxm.bf16_tflops == pytest.approx(0.765, abs=0.01)
    assert nvl.bf16_tflops / sxm.bf16_tflops == pytest.approx(0.844, abs=0.01)
    gh200 = hardware.find("NVIDIA GH200 480GB")
    assert gh200.key == "GH200" and 95 < gh200.memory_bytes / 2**30 < 96
    assert hardware.find("NVIDIA H200").memory_bytes / 2**30 > 139


@pytest.mark.parametrize("name,key", NAMES)
def test_the_estimator_resolves_every_name_to_the_same_device(name, key):
    spec = _gpu_spec()
    plan = make_plan(spec)
    dev = hardware.DEVICES[key]
    e = estimate(spec, plan, device=name, usd_per_device_hour=2.0)
    assert e.device == key and e.device_memory_bytes == dev.memory_bytes
    assert e.tokens_per_s == pytest.approx(plan.world_size * dev.bf16_tflops * 1e12 * e.assumed_mfu
                                           / e.model_flops_per_token)
    assert e.usd_per_mtok == usd_per_mtok_at(2.0, plan.world_size, e.tokens_per_s)


def test_the_estimator_refuses_a_device_outside_the_table_and_lists_the_keys():
    spec = _gpu_spec()
    with pytest.raises(UserError, match="not in the table") as err:
        estimate(spec, make_plan(spec), device="NVIDIA L40")
    assert all(k in str(err.value) for k in hardware.DEVICES)


@pytest.fixture(scope="module")
def gpu_run_dir(tmp_path_factory):
    rd, _, _ = create(tmp_path_factory.mktemp("cost") / "run", _gpu_spec(partition="gpu"))
    return rd.path


def _cost_estimate(run_dir, gpu_type):
    prices = cost.Prices(partitions={"gpu": cost.Rate(2.0, None, None)}, gpu_types={"gpu": gpu_type})
    return cost.estimate_for(run_dir, prices)


@pytest.mark.parametrize("name,key", NAMES)
def test_cost_prices_every_name_as_the_same_device(gpu_run_dir, name, key):
    got = _cost_estimate(gpu_run_dir, name)
    spec = RunDir(gpu_run_dir).load_spec()
    plan = make_plan(spec)
    e = estimate(spec, plan, device=key, usd_per_device_hour=2.0)
    assert got["device"] == key and got["note"] is None
    assert got["usd_per_mtok"] == e.usd_per_mtok == usd_per_mtok_at(2.0, plan.world_size, e.tokens_per_s)


def test_cost_assumes_an_h100_for_a_gpu_type_outside_the_table(gpu_run_dir):
    got = _cost_estimate(gpu_run_dir, "mi300x")
    assert got["device"] == "H100-80GB" and got["note"] == "device assumed H100-80GB"


@pytest.mark.parametrize("name,key", [*NAMES, ("mi300x", None)])
def test_preflight_reads_every_profile_gpu_type_as_the_same_device(tmp_path, monkeypatch, name, key):
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text(yaml.safe_dump({"lab": {"default_partition": "gpu", "partitions": {
        "gpu": {"gpu_type": name, "gpus_per_node": 8}}}}))
    monkeypatch.setenv("LAUNCHER_CLUSTERS", str(clusters))
    assert preflight.profile_device(_gpu_spec(profile="lab", partition="gpu")) == key


@pytest.mark.parametrize("name,key", [*NAMES, *sorted(OTHER_BOARDS.items()), ("cpu (2 cores)", None)])
def test_the_bench_reads_every_torch_name_and_peak_from_the_same_device(name, key):
    assert report.device_key(name) == key
    for dtype in ("bf16", "fp32"):
        want = hardware.peak_tflops(hardware.DEVICES[key], dtype) if key else None
        assert report.peak_tflops(dtype, name, None) == want
        assert report.peak_tflops(dtype, name, 123.0) == 123.0  # --device-tflops wins


def test_dollars_per_million_tokens_from_a_price_per_device_hour_or_from_dollars_paid():
    assert usd_per_mtok_at(2.5, 8, 10_000) == 2.5 * 8 / 3600 / 10_000 * 1e6
    assert usd_per_mtok_at(None, 8, 10_000) is None and usd_per_mtok_at(2.5, 8, None) is None
    assert usd_per_mtok_at(2.5, 8, 0) is None
    assert usd_per_mtok(3.0, 1_500_000) == 3.0 / 1_500_000 * 1e6
    assert usd_per_mtok(None, 10) is None and usd_per_mtok(3.0, None) is None and usd_per_mtok(3.0, 0) is None


def test_a_device_hour_is_priced_once_for_estimate_and_bench():
    from launcher.config.spec import ClusterSpec
    from launcher.plan.price import usd_per_device_hour

    assert usd_per_device_hour(ClusterSpec(gpus_per_node=8, usd_per_gpu_hour=2.5, usd_per_node_hour=30)) == 2.5
    # CPU ranks share the node-hour: 4 ranks on a $2 node-hour pay $0.50 each
    assert usd_per_device_hour(ClusterSpec(nproc_per_node=4, usd_per_node_hour=2.0)) == 0.5
    assert usd_per_device_hour(ClusterSpec(gpus_per_node=8)) is None
