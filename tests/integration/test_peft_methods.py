"""The PEFT family trains: dora, ia3, prefix, prompt and freeze on the tiny model, CPU, fp32.

- Each method's trainable-parameter count from the estimator (config.json only) equals peft's own
  count (`get_nb_trainable_parameters`) and, independently, the sizes of the tensors that require
  grad in the model our builder made (`apply_method`); for two shapes of model (the tiny Llama with
  tied embeddings, and an untied Qwen2-shaped one with attention biases and one KV head).
- Each method trains a few steps on 1 rank through the per-rank entry point (`loop.train`, every
  run in one process to pay the imports once) at a ZeRO stage it supports: the loss is finite and
  moves, and the training log reports the estimator's trainable count.
- The run's plan.txt and its training log give the same trainable count; the log names the adapter.
- ia3 and dora merge (`launcher merge`): the merged plain model's logits equal the adapter model's
  (fp32, 1e-4 absolute; measured ~1e-6) while the adapter moves them by far more. Prefix and prompt
  tuning are refused with exit 2 and the reason (virtual tokens, no weight to fold them into).
- One method trains on 2 ranks under ZeRO-3 through `launcher run`, as a user runs it.
- Refused combinations exit 2 with the reason before any run dir or rank exists.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest

pytestmark = pytest.mark.integration

COMMON = ["model.name=tiny", "precision.dtype=fp32", "data.seq_len=64", "optim.micro_batch=4", "optim.lr=1e-2",
          "optim.max_steps=6", "output.log_every=1", "output.tensorboard=false", "cluster.nproc_per_node=1",
          "method.prefix.num_virtual_tokens=8", "method.prompt.num_virtual_tokens=8", "method.lora.r=8"]

# (case, ZeRO stage, extra --set items): every method at least once, ZeRO stages spread over them.
RUNS = [
    ("dora", 3, ["task=sft", "data.packing=true", "model.grad_ckpt=true"]),
    ("ia3", 3, []),
    ("prefix", 1, ["method.prefix.projection=true"]),
    ("prompt", 2, ["task=sft", "method.prompt.init_text='Answer the question:'", "model.grad_ckpt=true"]),
    ("freeze", 0, ["method.freeze.top_layers=1", "method.freeze.train_modules=[norm]", "model.grad_ckpt=true"]),
]


def spec_for(name, stage, extra, out):
    from launcher.config.resolve import resolve

    return resolve(sets=[*COMMON, f"method.name={name}", f"zero.stage={stage}", *extra, f"output.dir={out}"])


# --------------------------------------------------------------------------- counts vs peft and tensors

QWEN2ISH = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 96,
            "vocab_size": 320, "tie_word_embeddings": False, "max_position_embeddings": 256}

COUNT_CASES = [
    ("dora", []), ("dora", ["method.lora.target_modules=[q_proj, v_proj]"]),
    ("ia3", []), ("ia3", ["method.ia3.target_modules=[q_proj, up_proj, down_proj]",
                          "method.ia3.feedforward_modules=[up_proj, down_proj]"]),
    ("prefix", []), ("prefix", ["method.prefix.projection=true", "method.prefix.projection_hidden=40"]),
    ("prompt", []), ("prompt", ["method.prompt.init=random"]),
    ("freeze", ["method.freeze.top_layers=1"]),
    ("freeze", ["method.freeze.train_modules=[lm_head, 'layers.0.mlp', norm]"]),
]


@pytest.mark.parametrize("model", ["tiny", "qwen2ish"])
@pytest.mark.parametrize("name,sets", COUNT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COUNT_CASES)])
def test_estimated_trainable_count_matches_peft_and_tensors(tmp_path, model, name, sets):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher import assets
    from launcher.config.resolve import resolve
    from launcher.model.load import apply_method
    from launcher.plan import params
    from launcher.plan import modelinfo

    if model == "tiny":
        src = assets.tiny_dir()
    else:
        src = tmp_path / "qwen2ish"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(QWEN2ISH))
    spec = resolve(sets=[f"model.name={src if model != 'tiny' else 'tiny'}", f"method.name={name}",
                         "precision.dtype=fp32", f"output.dir={tmp_path / 'run'}", *sets])
    est = params.count_params(modelinfo.load(spec.model.name), spec)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    n_base = sum(p.numel() for p in base.parameters())
    built = apply_method(spec, base)
    # independent count: sizes of the distinct tensors that require grad (a tied head counted once)
    grad = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert est.trainable == grad > 0
    if name == "freeze":
        assert est.total == n_base == sum(p.numel() for p in built.parameters())
        assert not hasattr(built, "peft_config")
    else:
        trainable, total = built.get_nb_trainable_parameters()
        assert (est.trainable, est.total) == (trainable, total)
        assert est.total == n_base + est.trainable


def test_freeze_trains_exactly_the_named_parameters(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher import assets
    from launcher.config.resolve import resolve
    from launcher.model.load import apply_method

    spec = resolve(sets=["method.name=freeze", "method.freeze.top_layers=1", "method.freeze.train_modules=[norm]",
                         f"output.dir={tmp_path}"])
    model = apply_method(spec, AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets.tiny_dir()),
                                                                dtype=torch.float32))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"model.norm.weight"} | {n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")}


# --------------------------------------------------------------------------- training, 1 rank

@pytest.fixture(scope="module")
def trained(tmp_path_factory, env, train_cases):
    """Every method of RUNS trained in one process through the per-rank entry point."""
    root = tmp_path_factory.mktemp("methods")
    cases = [(name, spec_for(name, stage, extra, root / name).to_dict()) for name, stage, extra in RUNS]
    t0 = time.monotonic()
    out, proc = train_cases(cases, env)
    return root, out, proc, time.monotonic() - t0


@pytest.mark.parametrize("name,stage,extra", RUNS, ids=[r[0] for r in RUNS])
def test_method_trains_one_rank(trained, name, stage, extra):
    from launcher.plan import params
    from launcher.plan import modelinfo
    from launcher.rundir.metrics import parse_step_lines

    root, out, proc, _ = trained
    text = out.get(name, "")
    assert f"@@ ok {name}" in text, f"{text[-5000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    spec = spec_for(name, stage, extra, root / name)
    n = params.count_params(modelinfo.load("tiny"), spec).trainable
    assert re.search(rf"model\s+tiny \({name}\): {n:,} trainable of", text), text[:3000]
    assert f"trainable    {n:,} parameters ({name})" in (root / name / "plan.txt").read_text()
    assert f"ZeRO-{stage}" in text
    losses = [s["loss"] for s in parse_step_lines(text)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert max(losses) - min(losses) > 1e-3, f"loss did not move: {losses}"
    final = root / name / "final"
    if name == "freeze":
        assert (final / "model.safetensors").is_file()
    else:
        cfg = json.loads((final / "adapter_config.json").read_text())
        kind = {"dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[name]
        assert cfg["peft_type"] == kind and cfg.get("use_dora", False) == (name == "dora")
        adapter = {"dora": "DoRA", "ia3": "IA3", "prefix": "prefix-tuning", "prompt": "prompt-tuning"}[name]
        assert re.search(rf"^output\s+{adapter} adapter \+ tokenizer in {re.escape(str(final))}", text, re.M), text[-2000:]
        assert ("launcher merge" in text) is (name in ("dora", "ia3"))


def test_trained_adapters_reload_and_generate(trained):
    """Each saved method loads back (peft's AutoPeftModel / transformers) and generates."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out, _, _ = trained
    for name, _, _ in RUNS:
        if f"@@ ok {name}" not in out.get(name, ""):
            continue  # reported by test_method_trains_one_rank
        final = root / name / "final"
        cls = AutoModelForCausalLM if name == "freeze" else AutoPeftModelForCausalLM
        model = cls.from_pretrained(final).eval()
        tok = AutoTokenizer.from_pretrained(final)
        ids = tok("The function returns", return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] >= ids["input_ids"].shape[1] + 1, name


def test_eval_reads_every_method(trained, env, monkeypatch, by_kind):
    """`launcher eval`'s library path loads each kind of result beside its base and measures both."""
    from launcher import evaluate

    root, out, _, _ = trained
    monkeypatch.setenv("LAUNCHER_CACHE", env["LAUNCHER_CACHE"])  # the runs' tokenized data
    for name, _, _ in RUNS:
        if f"@@ ok {name}" not in out.get(name, ""):
            continue
        res = evaluate.evaluate(root / name, max_rows=8, samples=2, max_new_tokens=8)
        assert res["adapter"] is (name != "freeze") and res["method"] == name
        for e in res["sets"]:
            assert math.isfinite(e["tuned"]["loss"]) and math.isfinite(e["base"]["loss"]), (name, e)
            assert e["tuned"]["loss"] != e["base"]["loss"], (name, e)  # the trained part is loaded
        if name in ("dora", "prompt"):  # SFT runs: greedy completions through peft's generate
            assert by_kind(res, "in-distribution")["exact_match"]["samples"] == 2


# --------------------------------------------------------------------------- merge

@pytest.mark.parametrize("name", ["ia3", "dora"])
def test_merged_model_gives_the_adapter_models_logits(trained, env, launcher, merge_errors, tmp_path, name):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    root, out, _, _ = trained
    assert f"@@ ok {name}" in out.get(name, ""), "the run failed: see test_method_trains_one_rank"
    merged_dir = tmp_path / "merged"
    proc = launcher(["merge", root / name, "--out", merged_dir], env, expect=0)
    assert str(merged_dir) in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    assert not (merged_dir / "adapter_config.json").exists() and merged.dtype == torch.float32
    adapted = AutoPeftModelForCausalLM.from_pretrained(root / name / "final").eval()
    err, effect = merge_errors(adapted, merged)
    assert err.max() < 1e-4, float(err.max())
    assert effect.max() > 1e-2, float(effect.max())  # the adapter was trained: the comparison means something


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_merge_refuses_virtual_token_adapters_with_the_reason(trained, env, launcher, tmp_path, name):
    root, out, _, _ = trained
    assert f"@@ ok {name}" in out.get(name, ""), "the run failed: see test_method_trains_one_rank"
    proc = launcher(["merge", root / name, "--out", tmp_path / "merged"], env, timeout=120, expect=2)
    assert "cannot be merged" in proc.stderr and "virtual tokens" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------- 2 ranks, launcher run

def test_dora_zero3_two_ranks_through_launcher_run(tmp_path, env, launcher):
    from launcher.rundir.metrics import parse_step_lines

    out = tmp_path / "run"
    proc = launcher(["run", "--method", "dora", "--zero", 3, "--nproc", 2, "--precision", "fp32", "--seq-len", 64,
                     "--micro-batch", 2, "--max-steps", 5, "--lr", 1e-2, "--set", "method.lora.r=8",
                     "--set", "output.log_every=1", "--set", "output.tensorboard=false", "--out", out], env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and "ZeRO-3" in proc.stdout
    n = 4 * (8 * (2 * (256 + 256) + 2 * (256 + 128) + 3 * (256 + 688)) + (256 + 128 + 128 + 256 + 688 + 688 + 256))
    assert f"(dora): {n:,} trainable of" in proc.stdout  # 4 layers x (r x (in + out) + out) per linear
    losses = [s["loss"] for s in parse_step_lines(proc.stdout)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and max(losses) - min(losses) > 1e-3
    assert json.loads((out / "final" / "adapter_config.json").read_text())["use_dora"] is True


# --------------------------------------------------------------------------- refused

@pytest.mark.parametrize("args,fragment", [
    (["--method", "prefix", "--grad-ckpt"], "prefix tuning) cannot run with gradient checkpointing"),
    (["--method", "prompt", "--task", "sft", "--packing"], "peft drops position_ids"),
    (["--method", "prefix", "--task", "sft", "--packing"], "the prefix is a key/value cache"),
    (["--method", "freeze"], "method freeze trains nothing"),
    (["--method", "prefix", "--zero", "3"], "method prefix cannot use ZeRO stage 3"),
    (["--method", "prompt", "--zero", "3"], "method prompt cannot use ZeRO stage 3"),
])
def test_refused_combinations_exit_2_before_anything_runs(tmp_path, env, launcher, args, fragment):
    out = tmp_path / "run"
    proc = launcher(["run", *args, "--precision", "fp32", "--out", out], env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
