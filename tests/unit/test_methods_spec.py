"""The PEFT family in the spec: each method's options, their validation, the combinations refused
with the reason (exit 2), and the estimator's trainable counts from config.json (no torch).

That the counts equal what peft / the instantiated model really train is checked in
tests/integration/test_peft_methods.py, against tensor sizes."""

from __future__ import annotations

import sys

import pytest

from launcher.config.resolve import resolve
from launcher.config.spec import MethodSpec
from launcher.errors import SpecError, UserError
from launcher.plan import params
from launcher.plan import modelinfo

METHODS = ["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "freeze"]


def method(name, *sets, **flags):
    return resolve(flags={"method": name, **flags}, sets=list(sets))


def test_every_method_resolves_and_shows_its_options():
    for name in METHODS:
        sets = ["method.freeze.top_layers=1"] if name == "freeze" else []
        spec = method(name, *sets, precision="bf16")
        tree = spec.to_dict()["method"]
        assert tree["name"] == name
        assert set(tree) == {"name", "lora", "quant", "prefix", "prompt", "ia3", "freeze"}
    assert set(MethodSpec.model_fields["name"].annotation.__args__) == set(METHODS)


def test_method_defaults_are_explicit():
    m = resolve().method
    assert (m.prefix.num_virtual_tokens, m.prefix.projection, m.prefix.projection_hidden) == (20, False, None)
    assert (m.prompt.num_virtual_tokens, m.prompt.init, m.prompt.init_text) == (20, "vocab", None)
    assert m.ia3.target_modules == ["k_proj", "v_proj", "down_proj"] and m.ia3.feedforward_modules == ["down_proj"]
    assert m.freeze.train_modules == [] and m.freeze.top_layers == 0


def test_prompt_init_text_implies_text_init():
    spec = method("prompt", "method.prompt.init_text='Answer briefly:'")
    assert spec.method.prompt.init == "text" and spec.method.prompt.init_text == "Answer briefly:"


@pytest.mark.parametrize("sets,fragment", [
    (["method.prompt.init=text"], "needs method.prompt.init_text"),
    (["method.prompt.init=random", "method.prompt.init_text=hi"], "drop init_text or set init: text"),
    (["method.prompt.num_virtual_tokens=0"], "method.prompt.num_virtual_tokens"),
    (["method.prefix.num_virtual_tokens=-1"], "method.prefix.num_virtual_tokens"),
    (["method.prefix.projection_hidden=0"], "method.prefix.projection_hidden"),
    (["method.ia3.feedforward_modules=[up_proj]"], "not in target_modules"),
    (["method.ia3.target_modules=[]"], "method.ia3.target_modules"),
    (["method.freeze.top_layers=-1"], "method.freeze.top_layers"),
    (["method.freeze.train_modules=['a b']"], "not a dotted module name"),
    (["method.prefix.num_virtual_token=4"], "Did you mean 'method.prefix.num_virtual_tokens'"),
    (["method.name=adapter"], "'dora', 'ia3', 'prefix', 'prompt' or 'freeze'"),
])
def test_bad_method_options_are_refused_with_the_field(sets, fragment):
    with pytest.raises(SpecError) as exc:
        resolve(sets=sets)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("name,sets,flags,fragment", [
    ("prefix", [], {"grad_ckpt": True}, "cannot run with gradient checkpointing"),
    ("prefix", [], {"task": "sft", "packing": True}, "the prefix is a key/value cache"),
    ("prompt", [], {"task": "sft", "packing": True}, "peft drops position_ids"),
    ("freeze", [], {}, "method freeze trains nothing"),
    ("prefix", [], {"zero": 3}, "waits for the other ranks forever"),
    ("prompt", [], {"zero": 3}, "cannot use ZeRO stage 3"),
])
def test_refused_combinations_say_why(name, sets, flags, fragment):
    with pytest.raises(SpecError) as exc:
        method(name, *sets, **flags)
    assert fragment in str(exc.value)


def test_allowed_neighbours_of_the_refusals():
    method("prompt", grad_ckpt=True)  # prompt tuning checkpoints fine (the tokens are inputs)
    method("prefix", task="sft", packing=False)
    method("dora", grad_ckpt=True, task="sft", packing=True)
    method("freeze", "method.freeze.train_modules=[lm_head]")
    for name in ("dora", "ia3", "freeze"):  # ZeRO-3 trains and saves them (tests/integration/test_peft_methods.py)
        method(name, "method.freeze.top_layers=1", zero=3)
    for stage in (0, 1, 2):
        method("prefix", zero=stage)
        method("prompt", zero=stage)


def test_cli_refusal_exits_2_with_the_reason(cli):
    proc = cli("spec", "--method", "prefix", "--grad-ckpt")
    assert proc.returncode == 2
    assert "prefix" in proc.stderr and "gradient checkpointing" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("config", "--method", "freeze")
    assert proc.returncode == 2 and "method.freeze.top_layers" in proc.stderr


@pytest.mark.parametrize("name", ["dora", "ia3", "prefix", "prompt", "freeze"])
def test_cli_takes_the_new_methods(cli, name):
    extra = ["--set", "method.freeze.top_layers=2"] if name == "freeze" else []
    proc = cli("spec", "--method", name, *extra)
    assert proc.returncode == 0, proc.stderr
    assert f"name: {name}" in proc.stdout


# --------------------------------------------------------------------------- estimator counts (no torch)

def tiny():
    return modelinfo.load("tiny")  # hidden 256, 4 layers, 4 heads (2 kv) of 64, MLP 688, vocab 4096, tied


def trainable(name, *sets):
    return params.count_params(tiny(), method(name, *sets, precision="bf16"))


def test_counts_by_formula_for_the_tiny_model():
    L, h, kv, i, V = 4, 256, 128, 688, 4096
    assert trainable("prefix", "method.prefix.num_virtual_tokens=8").trainable == 8 * L * 2 * kv
    w, hid = kv, 32
    assert trainable("prefix", "method.prefix.num_virtual_tokens=8", "method.prefix.projection=true",
                     "method.prefix.projection_hidden=32").trainable == \
        8 * w + (w * hid + hid) + (hid * L * 2 * w + L * 2 * w)
    assert trainable("prompt", "method.prompt.num_virtual_tokens=10").trainable == 10 * h
    assert trainable("ia3").trainable == L * (kv + kv + i)  # k, v scale outputs; down_proj scales its input
    lora = L * 8 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    assert trainable("lora", "method.lora.r=8").trainable == lora
    assert trainable("dora", "method.lora.r=8").trainable == lora + L * (h + kv + kv + h + i + i + h)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert trainable("freeze", "method.freeze.top_layers=2").trainable == 2 * layer
    # tied embeddings: lm_head is the embedding matrix, counted once
    both = trainable("freeze", "method.freeze.train_modules=[lm_head, embed_tokens, norm]")
    assert both.trainable == V * h + h
    assert both.matmul_trainable == V * h  # the LM head's matmul trains


def test_totals_add_the_adapter_only_for_peft_methods():
    base = tiny().total_params()
    assert trainable("freeze", "method.freeze.top_layers=1").total == base
    p = trainable("prompt")
    assert p.total == base + p.trainable and p.frozen_dense == base and p.matmul_trainable == 0


def test_freeze_names_match_whole_parts():
    names = [n for n, _, _ in params.param_names(tiny())]
    sel = params.freeze_selection(names, method("freeze", "method.freeze.train_modules=[norm]").method.freeze, 4)
    assert sel == {"model.norm.weight"}  # not input_layernorm / post_attention_layernorm
    sel = params.freeze_selection(names, method("freeze", "method.freeze.train_modules=['layers.*.mlp']")
                                    .method.freeze, 4)
    assert len(sel) == 4 * 3 and all(".mlp." in n for n in sel)
    sel = params.freeze_selection(names, method("freeze", "method.freeze.top_layers=1",
                                                  "method.freeze.train_modules=[layers.0.self_attn.q_proj]")
                                    .method.freeze, 4)
    assert {n for n in sel if ".layers.0." in n} == {"model.layers.0.self_attn.q_proj.weight"}
    assert sum(".layers.3." in n for n in sel) == 9


@pytest.mark.parametrize("sets,fragment", [
    (["method.freeze.train_modules=[vision_tower]"], "'vision_tower' matches no parameter"),
    (["method.freeze.top_layers=9"], "the model has 4 layers"),
])
def test_freeze_that_matches_nothing_is_refused(sets, fragment):
    with pytest.raises(UserError) as exc:
        trainable("freeze", *sets)
    assert fragment in str(exc.value) and exc.value.exit_code == 2


def test_ia3_unknown_target_is_refused():
    with pytest.raises(UserError, match="method.ia3.target_modules"):
        trainable("ia3", "method.ia3.target_modules=[c_attn]", "method.ia3.feedforward_modules=[]")


def test_param_names_add_up_for_other_family_members():
    for cfg in ({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                 "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 300, "tie_word_embeddings": False},
                {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 32, "num_hidden_layers": 3, "intermediate_size": 96, "vocab_size": 300}):
        m = modelinfo.from_config(cfg)
        table = params.param_names(m)
        assert sum({t: s for _, s, t in table}.values()) == m.total_params()


def test_estimate_command_prints_each_method(cli):
    for name in ("dora", "ia3", "prefix", "prompt"):
        proc = cli("estimate", "--method", name, "--gpu", "H100-80GB")
        assert proc.returncode == 0, proc.stderr
        n = trainable(name).trainable
        assert f"({n:,} trainable)" in proc.stdout


def test_estimate_cli_for_freeze_stays_light(cli):
    code = ("import sys, runpy; sys.argv=['launcher','estimate','--method','freeze','--set',"
            "'method.freeze.top_layers=1']\n"
            "from launcher.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]\n"
            "assert not bad, bad\n")
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
