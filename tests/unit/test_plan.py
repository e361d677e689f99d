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


# --------------------------------------------------------------------------- what `auto` becomes

from launcher.plan import hardware, memory  # noqa: E402
from launcher.plan import plan as plan_mod  # noqa: E402
from launcher.plan.estimate import estimate  # noqa: E402
from launcher.render.deepspeed import render  # noqa: E402


@pytest.fixture
def cpu_flag(monkeypatch):
    """Pin the CPU's bf16 flag: the choices must not depend on the machine the tests run on."""
    def pin(flag):
        monkeypatch.setattr(hardware, "cpu_bf16_flag", lambda *a: flag)
    pin("avx512_bf16")
    return pin


def choice(p, what):
    return next(line for line in p.choices if line.startswith(what))


@pytest.mark.parametrize("flag,want", [("amx_bf16", "bf16"), ("avx512_bf16", "bf16"), (None, "fp32")])
def test_precision_auto_on_cpu_follows_the_cpus_bf16_flags(cpu_flag, flag, want):
    cpu_flag(flag)
    p = plan_for()
    assert p.precision == want and (flag or "no amx_bf16") in choice(p, "precision")
    assert render(resolve(), p)["bf16"]["enabled"] is (want == "bf16")


def test_cpu_bf16_flag_reads_the_kernels_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert hardware.cpu_bf16_flag(str(info)) == "amx_bf16"
    info.write_text("processor : 0\nflags\t\t: fpu sse avx2\n")
    assert hardware.cpu_bf16_flag(str(info)) is None
    assert hardware.cpu_bf16_flag(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("gpu,want", [(None, "bf16"), ("h100", "bf16"), ("a100-40gb", "bf16"), ("v100", "fp16"),
                                      ("t4", "fp16")])
def test_precision_auto_on_gpus(cpu_flag, gpu, want):
    cpu_flag(None)  # the submitting host's CPU plays no part for GPU ranks
    p = plan_for("cluster.gpus_per_node=8", *([f"cluster.gpu_type={gpu}"] if gpu else []))
    assert p.precision == want


def test_an_explicit_choice_is_never_overridden_by_auto(cpu_flag, llama8b_dir):
    p = plan_for("precision=fp32", "zero.stage=3", "optim.loss=standard", "cluster.nproc_per_node=2")
    assert (p.precision, p.zero_stage, p.loss) == ("fp32", 3, "standard")
    assert all("set in the spec" in choice(p, w) for w in ("precision", "ZeRO stage", "loss"))


def test_stage_auto_is_0_on_one_device_and_the_lowest_that_fits_with_more(cpu_flag, llama8b_dir):
    assert plan_for().zero_stage == 0
    assert plan_for("cluster.nproc_per_node=2").zero_stage == 0  # the tiny model fits anywhere
    # Llama-3-8B, full, bf16 on 8 x H100-80GB: stage 0 holds 16 B/param (128 GB), stage 1 shards the fp32 part
    gpu = ["cluster.gpus_per_node=8", "cluster.gpu_type=h100", "data.seq_len=2048", "model.grad_ckpt=true"]
    p = plan_for(*gpu, model=str(llama8b_dir))
    mem = hardware.DEVICES["H100-80GB"].memory_bytes
    e = {k: estimate(resolve(flags={"model": str(llama8b_dir)}, sets=[*gpu, f"zero.stage={k}"]),
                     plan_for(*gpu, f"zero.stage={k}", model=str(llama8b_dir))).peak_bytes_per_gpu for k in range(4)}
    fitting = [k for k in range(4) if e[k] <= plan_mod.FIT_MARGIN * mem]
    assert fitting and p.zero_stage == fitting[0] > 0, (e, p.choices)
    assert "lowest stage" in choice(p, "ZeRO stage") and "H100-80GB" in choice(p, "ZeRO stage")
    # on 2 x A10G (24 GB) nothing fits: the stage that needs the least, and the fit check says the rest
    small = plan_for("cluster.gpus_per_node=2", "cluster.gpu_type=a10g", "data.seq_len=2048", model=str(llama8b_dir))
    assert small.zero_stage == 3 and "no stage fits" in choice(small, "ZeRO stage")


def test_stage_auto_respects_what_the_spec_rules_out(cpu_flag, llama8b_dir):
    gpu = ["cluster.gpus_per_node=2", "cluster.gpu_type=a10g", "data.seq_len=2048"]
    assert plan_for(*gpu, "zero.offload_param=cpu", model=str(llama8b_dir)).zero_stage == 3
    assert plan_for(*gpu, "method.name=prompt", model=str(llama8b_dir)).zero_stage <= 2  # prompt + ZeRO-3 hangs
    assert plan_for(*gpu, "model.compile=true", model=str(llama8b_dir)).zero_stage <= 2
    assert plan_for("zero.offload_optimizer=cpu").zero_stage == 1  # offload needs a stage >= 1


def test_loss_auto_chunks_only_where_the_logits_weigh(cpu_flag, llama8b_dir, monkeypatch):
    assert plan_for().loss == "standard"  # 512 tokens: one chunk
    p = plan_for("optim.micro_batch=8", "data.seq_len=1024")
    assert p.loss == "chunked" and "% of the activation memory" in choice(p, "loss")
    q = plan_for("optim.micro_batch=8", "data.seq_len=1024", "optim.loss_chunk_tokens=256")
    assert memory.logits_bytes(q.model, resolve(sets=["optim.loss_chunk_tokens=256"]), q.precision, "chunked",
                               8192) == 256 * 4096 * 10
    # a big model's logits are a small share when its layers are many and its vocabulary small
    gpu = ["cluster.gpus_per_node=1", "data.seq_len=4096", "optim.micro_batch=2"]
    assert plan_for(*gpu, model=str(llama8b_dir)).loss in ("chunked", "standard")
    monkeypatch.setattr(plan_mod, "liger_importable", lambda: True)
    assert plan_for(*gpu, model=str(llama8b_dir)).loss == "liger"
    assert plan_for("optim.micro_batch=8", "data.seq_len=1024").loss == "chunked"  # liger never on CPU ranks


def test_the_estimate_counts_one_chunk_of_logits_under_the_chunked_loss(cpu_flag):
    sets = ["optim.micro_batch=8", "data.seq_len=1024", "precision=fp32"]
    full = estimate(resolve(sets=[*sets, "optim.loss=standard"]), plan_for(*sets, "optim.loss=standard"))
    chunked = estimate(resolve(sets=[*sets, "optim.loss=chunked"]), plan_for(*sets, "optim.loss=chunked"))
    assert full.logits_bytes_per_gpu == 8 * 1024 * 4096 * 12  # fp32 logits + log-softmax + its gradient
    assert chunked.logits_bytes_per_gpu == 1024 * 4096 * 12
    assert full.peak_bytes_per_gpu - chunked.peak_bytes_per_gpu == 7 * 1024 * 4096 * 12
    assert (chunked.loss, chunked.zero_stage, chunked.precision) == ("chunked", 0, "fp32")


def test_the_optimizer_is_the_fastest_exact_one_for_the_device(cpu_flag):
    cpu = plan_for()
    assert cpu.optimizer == "torch fused AdamW"  # as fast as DeepSpeed's CPU kernel, and exact on resume
    assert render(resolve(), cpu)["optimizer"]["params"] | {"torch_adam": True, "fused": True} == \
        render(resolve(), cpu)["optimizer"]["params"]
    gpu_spec = resolve(sets=["cluster.gpus_per_node=8"])
    gpu = make_plan(gpu_spec)
    assert gpu.optimizer == "torch fused AdamW"
    assert render(gpu_spec, gpu)["optimizer"]["params"] | {"torch_adam": True, "fused": True} == \
        render(gpu_spec, gpu)["optimizer"]["params"]
    off_spec = resolve(sets=["zero.offload_optimizer=cpu", "cluster.gpus_per_node=8"])
    assert make_plan(off_spec).optimizer == "DeepSpeed CPUAdam"
    assert "torch_adam" not in render(off_spec, make_plan(off_spec))["optimizer"]["params"]


def test_plan_text_names_every_choice_and_a_rank_follows_the_run_dirs_config(cpu_flag):
    p = plan_for("cluster.nproc_per_node=2")
    text = "\n".join(p.summary())
    for what in ("precision    bf16", "ZeRO stage   0", "loss         standard", "optimizer    torch fused AdamW"):
        assert what in text
    cfg = render(resolve(sets=["cluster.nproc_per_node=2"]), p)
    cpu_flag(None)  # another node's CPU, without bf16: the rank still runs what the run dir says
    again = plan_for("cluster.nproc_per_node=2").following(cfg)
    assert (again.precision, again.zero_stage) == ("bf16", 0)
    assert plan_mod.settled(resolve(sets=["cluster.nproc_per_node=2"]), again).precision.dtype == "bf16"


def test_loss_auto_keeps_the_standard_loss_for_capped_logits(cpu_flag, tmp_path):
    import json

    from launcher import assets

    cfg = json.loads((assets.tiny_dir() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    p = plan_for("optim.micro_batch=8", "data.seq_len=1024", model=str(tmp_path))
    assert p.loss == "standard" and "final_logit_softcapping" in choice(p, "loss")
