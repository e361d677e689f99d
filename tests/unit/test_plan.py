"""Batch arithmetic and the model counts the planner derives without torch."""

from __future__ import annotations

import pytest

from launcher.config.resolve import resolve
from launcher.errors import SpecError
from launcher.plan.plan import make_plan


def plan_for(*sets: str, model: str | None = None):
    return make_plan(resolve(flags={"model": model}, sets=list(sets)))


def test_world_size_is_nodes_times_ranks(llama8b_dir):
    p = plan_for("cluster.nodes=4", "cluster.gpus_per_node=8", "optim.global_batch=256", "optim.micro_batch=2",
                 model=str(llama8b_dir))
    assert (p.world_size, p.grad_accum, p.device) == (32, 4, "cuda")
    assert p.micro_batch * p.grad_accum * p.world_size == p.global_batch == 256


def test_cpu_ranks_come_from_nproc_per_node(llama8b_dir):
    p = plan_for("cluster.nodes=2", "cluster.nproc_per_node=3", model=str(llama8b_dir))
    assert (p.world_size, p.device, p.grad_accum) == (6, "cpu", 1)


def test_global_batch_tokens(llama8b_dir):
    p = plan_for("data.seq_len=2048", "optim.global_batch_tokens=1048576", "cluster.gpus_per_node=8",
                 model=str(llama8b_dir))
    assert p.global_batch == 512 and p.grad_accum == 64 and p.tokens_per_step == 1048576


def test_indivisible_batch_shows_arithmetic_and_nearest_choices(llama8b_dir):
    with pytest.raises(SpecError) as e:
        plan_for("optim.global_batch=100", "optim.micro_batch=3", "cluster.nodes=2", "cluster.gpus_per_node=2",
                 model=str(llama8b_dir))
    msg = str(e.value)
    assert "3 x 4 = 12" in msg and "96 or 108" in msg and "1, 5, 25" in msg


def test_tokens_not_multiple_of_seq_len(llama8b_dir):
    with pytest.raises(SpecError, match="not a multiple of data.seq_len=2048"):
        plan_for("data.seq_len=2048", "optim.global_batch_tokens=1000000", model=str(llama8b_dir))


def test_seq_len_beyond_model_positions(llama8b_dir):
    with pytest.raises(SpecError, match="max_position_embeddings=8192"):
        plan_for("data.seq_len=16384", model=str(llama8b_dir))


def test_llama8b_count_matches_published_size(llama8b_dir):
    from launcher.plan import modelinfo

    assert modelinfo.load(str(llama8b_dir)).total_params() == 8_030_261_248


@pytest.mark.integration
def test_param_count_matches_instantiated_model(tmp_path):
    """Analytic counts against the tensor sizes of the real model, for several architectures."""
    import json

    import torch
    import transformers

    from launcher.plan import modelinfo

    shapes = {
        "llama": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=96, vocab_size=300, tie_word_embeddings=False),
        "mistral": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                        intermediate_size=80, vocab_size=310, tie_word_embeddings=True),
        "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      intermediate_size=96, vocab_size=320, tie_word_embeddings=True),
    }
    for model_type, kw in shapes.items():
        cfg = transformers.AutoConfig.for_model(model_type, **kw)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        real = sum(p.numel() for p in model.parameters())
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg.to_dict()))
        assert modelinfo.load(str(d)).total_params() == real, model_type


def test_zero_buckets_scale_with_the_hidden_size_and_the_spec_wins(llama8b_dir):
    b = plan_for(model=str(llama8b_dir)).zero_buckets
    assert (b.reduce, b.allgather, b.prefetch, b.persistence) == (4096**2, 4096**2, int(0.9 * 4096**2), 10 * 4096)
    b = plan_for("zero.reduce_bucket_size=1000", "zero.stage3_prefetch_bucket_size=0",
                 "zero.stage3_param_persistence_threshold=7", model=str(llama8b_dir)).zero_buckets
    assert (b.reduce, b.allgather, b.prefetch, b.persistence) == (1000, 1000, 0, 7)
    b = plan_for("zero.allgather_bucket_size=300", model=str(llama8b_dir)).zero_buckets
    assert (b.reduce, b.allgather) == (4096**2, 300)


def test_zero_buckets_without_a_model_are_deepspeeds_defaults():
    from launcher.config.spec import validate
    from launcher.plan.plan import zero_buckets

    b = zero_buckets(validate({}).zero, None)
    assert (b.reduce, b.allgather, b.prefetch, b.persistence) == (500_000_000, 500_000_000, 50_000_000, 100_000)
