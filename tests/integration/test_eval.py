"""`launcher eval`: forgetting shows as a number, and so does improvement.

The base must know something first: the tiny model is trained on the embedded corpus (the default
reference set) until its corpus loss is far below chance (ln 4096 = 8.3). From it:
- an over-trained run: full fine-tuning on one repeated sentence at a high learning rate. `launcher
  eval` must report a higher reference (corpus) loss than its base (forgetting detected) and a lower
  loss on its held-out split of the narrow data;
- a normal run: LoRA SFT on the embedded SFT set with a held-out split. `launcher eval` must report a
  lower in-distribution loss than the base, exact match of greedy completions for both models, and
  less damage to the reference set than the over-trained run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CHANCE = math.log(4096)
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
FAST = ["precision.dtype=fp32", "cluster.nproc_per_node=1", "data.seq_len=64", "optim.micro_batch=8",
        "output.log_every=5", "output.tensorboard=false", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, train_cases):
    """The three trainings, one after another in one process through the per-rank entry point (the
    imports paid once); `launcher run` itself is covered by tests/integration/test_training.py."""
    from launcher.config.resolve import resolve

    root = tmp_path_factory.mktemp("eval")
    base = root / "base" / "final"
    narrow = root / "narrow.txt"
    narrow.write_text(" ".join([SENTENCE] * 400) + "\n")
    trees = [
        # 1. a base that knows the reference set (the embedded corpus)
        ["method.name=full", "task=pretrain", "optim.max_steps=40", "optim.warmup_steps=4",
         f"output.dir={root / 'base'}"],
        # 2. over-training on one sentence
        [f"model.name={base}", f"data.path={narrow}", "method.name=full", "task=pretrain", "optim.max_steps=20",
         "optim.micro_batch=4", "data.eval_fraction=0.1", f"output.dir={root / 'over'}"],
        # 3. a normal run: LoRA SFT with a held-out split, evaluated during training too
        [f"model.name={base}", "method.name=lora", "task=sft", "optim.max_steps=20", "optim.micro_batch=4",
         "data.eval_fraction=0.1",
         "output.eval_every=10", f"output.dir={root / 'normal'}"],
    ]
    cases = [(name, resolve(sets=[*FAST, *t]).to_dict()) for name, t in zip(("base", "over", "normal"), trees)]
    out, proc = train_cases(cases, env, prepare="each")  # runs 2 and 3 start from run 1's model
    for name, _ in cases:
        assert f"@@ ok {name}" in out.get(name, ""), out.get(name, "")[-4000:] + proc.stderr[-4000:]
    assert (root / "over" / "final").is_dir() and (root / "normal" / "final" / "adapter_config.json").is_file()
    return root


@pytest.fixture
def in_process(env, monkeypatch):
    """evaluate.evaluate in this process, reading the runs' tokenized-data cache."""
    from launcher import evaluate

    monkeypatch.setenv("LAUNCHER_CACHE", env["LAUNCHER_CACHE"])
    return evaluate.evaluate


def test_base_knows_the_reference_set(runs, in_process, by_kind):
    res = in_process(runs / "base", max_rows=48)
    ref = by_kind(res, "reference")
    assert ref["base"]["loss"] > CHANCE - 0.3  # the untrained initialisation: chance
    assert ref["tuned"]["loss"] < CHANCE - 1.5, ref  # trained: far below chance
    assert ref["delta_loss"] < -1.5
    ind = by_kind(res, "in-distribution")
    assert ind["held_out"] is False and "seen in training" in ind["note"]


def test_overtrained_run_shows_forgetting(runs, env, launcher, by_kind):
    proc = launcher(["eval", runs / "over", "--max-rows", 48, "--out", runs / "over.json"], env, expect=0)
    res = json.loads((runs / "over" / "eval.json").read_text())
    assert json.loads((runs / "over.json").read_text()) == res
    assert Path(res["base"]) == runs / "base" / "final"  # the base is the model this run started from
    ref, ind = by_kind(res, "reference"), by_kind(res, "in-distribution")
    assert ref["name"] == "embedded corpus" and ind["held_out"] is True
    # forgetting: the corpus got worse than the base, by a clear margin
    assert ref["delta_loss"] > 0.5, ref
    assert res["forgetting_detected"] is True and res["reference_delta"] == ref["delta_loss"]
    # while the narrow held-out data got much better
    assert ind["delta_loss"] < -1.0, ind
    assert math.isclose(ind["tuned"]["perplexity"], math.exp(ind["tuned"]["loss"]), rel_tol=1e-9)
    assert "FORGETTING" in proc.stdout and "held-out split" in proc.stdout and "embedded corpus" in proc.stdout


def test_normal_run_improves_in_distribution_and_reports_exact_match(runs, env, tmp_path, launcher, by_kind):
    png = tmp_path / "loss.png"
    proc = launcher(["eval", runs / "normal", "--max-rows", 48, "--samples", 6, "--plot", png], env, expect=0)
    res = json.loads((runs / "normal" / "eval.json").read_text())
    over = json.loads((runs / "over" / "eval.json").read_text()) if (runs / "over" / "eval.json").exists() else None
    assert res["adapter"] is True and res["method"] == "lora"
    ind, ref = by_kind(res, "in-distribution"), by_kind(res, "reference")
    assert ind["held_out"] is True and ind["task"] == "sft"
    assert ind["delta_loss"] < -0.2, ind  # the held-out SFT examples got better
    # the same number the Trainer's own evaluation found at the last step (it averages per-batch means,
    # eval weights every token equally: close, not equal)
    logged = [json.loads(x) for x in (runs / "normal" / "logs" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if "eval_loss" in r][-1]
    assert last_eval["step"] == 20 and abs(last_eval["eval_loss"] - ind["tuned"]["loss"]) < 0.05
    em = ind["exact_match"]
    assert em["samples"] == 6 and 0.0 <= em["tuned"] <= 1.0 and 0.0 <= em["base"] <= 1.0
    assert "exact match on held-out split (6 greedy completions)" in proc.stdout
    if over is not None:  # a LoRA run on real data hurts the reference set less than over-training
        assert ref["delta_loss"] < by_kind(over, "reference")["delta_loss"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_eval_of_a_model_dir_with_reference_files(runs, in_process):
    """MODEL form: a plain model dir, --base and two reference sets (a text file and SFT records)."""
    from launcher import assets

    res = in_process(runs / "over" / "final", base=str(runs / "base" / "final"), max_rows=16, samples=2, seq_len=64,
                     data=[str(runs / "narrow.txt"), str(assets.tiny_dir() / "sft.jsonl")])
    assert res["run_dir"] is None and [e["kind"] for e in res["sets"]] == ["reference", "reference"]
    txt, sft = res["sets"]
    assert txt["task"] == "pretrain" and sft["task"] == "sft" and sft["exact_match"]["samples"] == 2
    assert txt["delta_loss"] < -1.0  # the over-trained model knows its sentence


def test_eval_refuses_what_it_cannot_read(tmp_path, env, launcher):
    bad = launcher(["eval", tmp_path], env, timeout=120)
    assert bad.returncode == 2 and "neither a run dir" in bad.stderr and "Traceback" not in bad.stderr
