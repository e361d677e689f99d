"""The rendered DeepSpeed JSON, pinned by golden files, and the shipped presets."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from launcher.config.resolve import resolve
from launcher.plan.plan import make_plan
from launcher.render import presets
from launcher.render.deepspeed import render

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "deepspeed"
RECORD = os.environ.get("LAUNCHER_RECORD_GOLDEN") == "1"
MODEL_8B = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
            "max_position_embeddings": 8192}

CASES = {
    "tiny_zero2_bf16_2x8": ["zero.stage=2", "cluster.nodes=2", "cluster.gpus_per_node=8", "optim.global_batch=64"],
    "llama8b_zero3_offload_cpu": ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu",
                                  "cluster.gpus_per_node=8", "optim.micro_batch=2", "optim.global_batch=128",
                                  "optim.warmup_steps=10", "model.grad_ckpt=true"],
    "llama8b_zero3_nvme_linear": ["zero.stage=3", "zero.offload_optimizer=nvme", "zero.offload_param=nvme",
                                  "zero.nvme_path=/local_nvme", "cluster.gpus_per_node=4", "optim.scheduler=linear"],
    "zero1_fp16_comm_fp32": ["zero.stage=1", "precision=fp16", "zero.comm_dtype=fp32", "cluster.gpus_per_node=2",
                             "optim.scheduler=constant", "optim.grad_clip=0.5"],
    "cpu_zero0_fp32_2ranks": ["zero.stage=0", "precision=fp32", "cluster.nproc_per_node=2", "optim.global_batch=8"],
}


def _render(name: str, tmp_path: Path) -> str:
    model = "tiny"
    if name.startswith("llama8b"):
        (tmp_path / "config.json").write_text(json.dumps(MODEL_8B))
        model = str(tmp_path)
    spec = resolve(flags={"model": model}, sets=CASES[name])
    return presets.dumps(render(spec, make_plan(spec)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_matches_golden_file(name, tmp_path):
    text = _render(name, tmp_path)
    path = GOLDEN / f"{name}.json"
    if RECORD:
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; record it with LAUNCHER_RECORD_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), (
        f"{path.name} differs from the rendered config. If the change is intended, re-record with:\n"
        f"  LAUNCHER_RECORD_GOLDEN=1 python -m pytest {Path(__file__).relative_to(ROOT)}")


def test_rendering_is_deterministic(tmp_path):
    assert _render("llama8b_zero3_offload_cpu", tmp_path) == _render("llama8b_zero3_offload_cpu", tmp_path)


def test_no_auto_values_anywhere(tmp_path):
    for name in CASES:
        assert '"auto"' not in _render(name, tmp_path)


def test_batch_numbers_multiply_out():
    spec = resolve(sets=["cluster.nodes=2", "cluster.gpus_per_node=4", "optim.micro_batch=2", "optim.global_batch=64"])
    cfg = render(spec, make_plan(spec))
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8


def test_buckets_scale_with_hidden_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MODEL_8B))
    spec = resolve(flags={"model": str(tmp_path)}, sets=["zero.stage=3"])
    z = render(spec, make_plan(spec))["zero_optimization"]
    assert z["reduce_bucket_size"] == 4096 * 4096
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert z["stage3_param_persistence_threshold"] == 10 * 4096


def test_bucket_sizes_are_copied_from_the_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MODEL_8B))
    for stage in (2, 3):
        spec = resolve(flags={"model": str(tmp_path)}, sets=[f"zero.stage={stage}", "zero.allgather_bucket_size=12345"])
        plan = make_plan(spec)
        b = dataclasses.replace(plan.zero_buckets, reduce=11, allgather=22, prefetch=33, persistence=44)
        z = render(spec, dataclasses.replace(plan, zero_buckets=b))["zero_optimization"]
        picked = {k: z[k] for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                                    "stage3_param_persistence_threshold") if k in z}
        assert picked == ({"reduce_bucket_size": 11, "allgather_bucket_size": 22} if stage == 2 else
                          {"reduce_bucket_size": 11, "stage3_prefetch_bucket_size": 33,
                           "stage3_param_persistence_threshold": 44})


def test_zero_extra_is_merged_last():
    spec = resolve(sets=["zero.stage=2",
                         "zero.extra={zero_optimization: {round_robin_gradients: true}, flops_profiler: {enabled: false}}"])
    cfg = render(spec, make_plan(spec))
    assert cfg["zero_optimization"]["round_robin_gradients"] is True and cfg["zero_optimization"]["stage"] == 2
    assert cfg["flops_profiler"] == {"enabled": False}


def test_the_schedule_is_left_to_the_training_arguments():
    """No DeepSpeed "scheduler": the lr schedule is transformers' own (tests/unit/test_train_args.py pins its
    lr at every step); zero.extra can still add a DeepSpeed scheduler, which the Trainer then uses."""
    for sched in ("cosine", "linear", "constant"):
        spec = resolve(sets=[f"optim.scheduler={sched}", "optim.warmup_steps=3"])
        assert "scheduler" not in render(spec, make_plan(spec))
    spec = resolve(sets=["zero.extra={scheduler: {type: WarmupLR, params: {warmup_num_steps: 5}}}"])
    assert render(spec, make_plan(spec))["scheduler"] == {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}


def test_presets_are_what_launcher_config_generates(tmp_path):
    """ds_configs/ is generated by `launcher config --write-presets ds_configs`; regenerate and compare."""
    written = presets.write_all(tmp_path)
    shipped = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert shipped == sorted(p.name for p in written)
    for p in written:
        assert p.read_text() == (ROOT / "ds_configs" / p.name).read_text(), (
            f"ds_configs/{p.name} is stale; regenerate with: python -m launcher config --write-presets ds_configs")


def test_presets_leave_train_batch_size_to_deepspeed():
    for name in presets.PRESETS:
        cfg = presets.render_preset(name)
        assert "train_batch_size" not in cfg
        assert cfg["train_micro_batch_size_per_gpu"] >= 1 and cfg["gradient_accumulation_steps"] >= 1
