"""Preference tuning through the same path as every run: `launcher run --task dpo` with no data argument trains
on the embedded preference set and leaves a complete run dir; ORPO, KTO, SimPO, a reward model, and DPO with
QLoRA, DoRA, IA3, prefix tuning and freeze train on a CPU rank and their outputs load in transformers/peft; full DPO's reference job caches the reference log-probs and
training with them has the losses of the in-memory reference. CPU, fp32, a few steps each."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def tree(out: Path, task: str, method: str, steps: int = 2, precision: str = "fp32", **extra) -> dict:
    t = {"task": task, "method": method, "precision": precision, "zero": {"stage": 2},
         "data": {"seq_len": 64}, "optim": {"max_steps": steps, "lr": 1e-3, "micro_batch": 2 if task == "kto" else 1},
         "output": {"dir": str(out / f"{task}-{method}-{extra.get('ref', 'auto')}{'-eval' if extra.get('evaluate') else ''}")}}
    if "ref" in extra:
        t["pref"] = {"reference": extra["ref"]}
    if extra.get("evaluate"):  # a held-out split, evaluated at the last step
        t["data"]["eval_fraction"] = 0.2
        t["output"]["eval_every"] = steps
    return t


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("kind", "step") == "step"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, env, train_cases):
    out = tmp_path_factory.mktemp("pref")
    # QLoRA first: a case that does not quantize keeps bitsandbytes out of the process (model/load.py
    # keep_bitsandbytes_out), and once out it stays out for the cases after it
    cases = [("dpo_qlora", tree(out, "dpo", "qlora", precision="bf16")),
             ("orpo", tree(out, "orpo", "lora", evaluate=True)), ("kto", tree(out, "kto", "lora")),
             ("simpo", tree(out, "simpo", "full")), ("rm", tree(out, "rm", "full")),
             ("rm_eval", tree(out, "rm", "full", evaluate=True)),
             ("dpo_mem", tree(out, "dpo", "full", 3, ref="in_memory")), ("dpo_lora", tree(out, "dpo", "lora")),
             ("dpo_dora", tree(out, "dpo", "dora")), ("dpo_ia3", tree(out, "dpo", "ia3")),
             ("dpo_prefix", tree(out, "dpo", "prefix")),
             ("dpo_freeze", {**tree(out, "dpo", "full"), "method": {"name": "freeze", "freeze": {"top_layers": 1}}})]
    sections, proc = train_cases(cases, env)
    return {name: (Path(t["output"]["dir"]), sections.get(name, "")) for name, t in cases}, proc


@pytest.mark.parametrize("name", ["orpo", "kto", "simpo", "rm", "dpo_mem", "dpo_lora", "dpo_qlora", "dpo_dora",
                                  "dpo_ia3", "dpo_prefix", "dpo_freeze"])
def test_each_preference_task_trains_on_a_cpu_rank(one_rank, name):
    runs, proc = one_rank
    run_dir, text = runs[name]
    assert f"@@ ok {name}" in text, f"{name} did not train\n{text[-4000:]}\n{proc.stderr[-3000:]}"
    assert len(losses(run_dir)) >= 2 and (run_dir / "final").is_dir()


@pytest.mark.parametrize("name", ["orpo", "rm_eval"])
def test_evaluation_during_training_reports_reward_accuracy_not_perplexity(one_rank, name):
    """A preference run's loss is TRL's preference loss: exp of it is no perplexity. Its evaluation line and
    record carry how often the chosen answer outranks the rejected one and by how much (TRL's
    rewards/accuracies and rewards/margins, as ORPO logs them; a reward model's accuracy and margin) instead.
    (The dpo_lora and rm runs keep no held-out split: `launcher eval`'s tests read their training rows.)"""
    runs, _ = one_rank
    run_dir, text = runs[name]
    rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals, rows
    last = evals[-1]
    assert last["perplexity"] is None and 0.0 <= last["reward_accuracy"] <= 1.0 and math.isfinite(last["reward_margin"])
    line = next(x for x in text.splitlines() if x.startswith("eval step"))
    assert "perplexity" not in line and f"reward_accuracy {last['reward_accuracy']:.4f}" in line, line
    # the manifest's last metrics by the same rule (the task's), with the same numbers
    from launcher.rundir.manifest import attempt_entries, read_manifest

    final = attempt_entries(read_manifest(run_dir))[-1]["metrics"]
    assert "perplexity" not in final and final["reward_accuracy"] == last["reward_accuracy"], final


def test_outputs_load_in_transformers_and_peft(one_rank):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    runs, _ = one_rank
    rm = AutoModelForSequenceClassification.from_pretrained(runs["rm"][0] / "final")
    assert rm.config.num_labels == 1
    with torch.no_grad():
        assert rm(input_ids=torch.tensor([[1, 50, 60, 2]])).logits.shape == (1, 1)
    assert isinstance(AutoModelForCausalLM.from_pretrained(runs["simpo"][0] / "final"), torch.nn.Module)
    for name in ("orpo", "kto", "dpo_qlora", "dpo_dora"):
        model = AutoPeftModelForCausalLM.from_pretrained(runs[name][0] / "final")
        assert model.peft_config["default"].r == 16
        assert model.peft_config["default"].use_dora == (name == "dpo_dora")
    for name, kind in (("dpo_ia3", "IA3"), ("dpo_prefix", "PREFIX_TUNING")):
        assert AutoPeftModelForCausalLM.from_pretrained(runs[name][0] / "final").peft_config["default"].peft_type == kind
    assert isinstance(AutoModelForCausalLM.from_pretrained(runs["dpo_freeze"][0] / "final"), torch.nn.Module)
    # QLoRA's base really was 4-bit on the rank: bitsandbytes packs two weights into each uint8 element, so the
    # rank counts the same trainable adapter among fewer elements than LoRA's full-precision base
    counts = {}
    for name in ("dpo_lora", "dpo_qlora"):
        m = re.search(r"tiny \((q?lora)\): ([\d,]+) trainable of ([\d,]+) parameters", runs[name][1])
        assert m, runs[name][1][-3000:]
        counts[name] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    assert counts["dpo_qlora"][0] == counts["dpo_lora"][0] and counts["dpo_qlora"][1] < 0.6 * counts["dpo_lora"][1]


def test_full_dpo_with_no_data_argument_runs_the_ref_job_then_trains_with_its_log_probs(tmp_path, env, launcher,
                                                                                       one_rank):
    """`launcher run --task dpo --method full`: the reference job (kind ref) caches the log-probs, the training
    job reads them, and its losses equal the in-memory reference's (same seed, base and data) within 1e-5."""
    out = tmp_path / "dpo"
    proc = launcher(["run", "--task", "dpo", "--method", "full", "--max-steps", "3", "--seq-len", "64",
                     "--precision", "fp32", "--zero", "2", "--nproc", "1", "--set", "optim.lr=1e-3", "--out", out],
                    env, expect=0)
    assert "log-probs computed here, before the first step, into" in proc.stdout  # the ref job
    assert "log-probs read from" in proc.stdout and "step 3/3" in proc.stdout  # the training job
    kinds = [json.loads(x)["kind"] for x in (out / "jobs.jsonl").read_text().splitlines()]
    assert kinds == ["ref", "ref", "local", "local"], kinds
    for name in ("spec.yaml", "ds_config.json", "plan.txt", "manifest.json", "logs/metrics.jsonl",
                 "final/model.safetensors"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["exit_reason"] for a in manifest["attempts"]] == ["completed"]  # the ref job is no attempt
    mem = losses(one_rank[0]["dpo_mem"][0])
    assert max(abs(a - b) for a, b in zip(losses(out), mem)) <= 1e-5, (losses(out), mem)
    status = launcher(["status", out], env)
    assert "ref-" in status.stdout and "COMPLETED" in status.stdout, status.stdout


def test_dpo_lora_with_no_data_argument_trains_against_the_adapter_disabled_base(one_rank):
    runs, _ = one_rank
    run_dir, text = runs["dpo_lora"]
    assert "reference: adapter" in text and (run_dir / "final" / "adapter_model.safetensors").is_file()


def test_eval_reports_preference_accuracy_and_margin_for_tuned_and_base(one_rank, env, launcher, tmp_path):
    run_dir = one_rank[0]["dpo_lora"][0]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Question: Write 'apple' in capital letters.\nAnswer:", "chosen": " APPLE", "rejected": " apple"},
        {"prompt": "Question: What is 2 + 3?\nAnswer:", "chosen": " 5", "rejected": " 6"}]))
    proc = launcher(["eval", run_dir, "--data", pairs, "--json", "--max-rows", "8"], env, expect=0)
    res = json.loads(proc.stdout)
    sets = {s["name"]: s for s in res["sets"]}
    assert set(sets) == {"training data", "pairs.jsonl"}  # the run has no held-out split: its rows, marked seen
    for s in sets.values():
        for who in ("tuned", "base"):
            assert 0.0 <= s[who]["logp_accuracy"] <= 1.0 and isinstance(s[who]["logp_margin"], float)
        assert s["tuned"]["logp_margin"] != s["base"]["logp_margin"]  # the adapter changed the log-probs
        assert s["base"]["pref_accuracy"] == 0.0 and s["base"]["reward_margin"] == 0.0  # the base against itself
        assert 0.0 <= s["tuned"]["pref_accuracy"] <= 1.0
        # the mean log-ratio margin is the difference of the two models' own mean margins
        assert s["tuned"]["reward_margin"] == pytest.approx(
            s["beta"] * (s["tuned"]["logp_margin"] - s["base"]["logp_margin"]), rel=1e-9, abs=1e-12)
    assert sets["pairs.jsonl"]["rows"] == 2 and sets["training data"]["rows"] == 8


def test_eval_of_a_reward_model_scores_pairs_with_its_reward_head(one_rank, env, launcher, tmp_path):
    """`launcher eval` of an rm run: each pair scored by the reward head (checked against the rewards computed
    here with AutoModelForSequenceClassification on prompt + response + EOS); no base column, no corpus loss."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = one_rank[0]["rm"][0]
    rows = [{"prompt": "Question: Write 'apple' in capital letters.\nAnswer:", "chosen": " APPLE", "rejected": " apple"},
            {"prompt": "Question: What is 2 + 3?\nAnswer:", "chosen": " 5", "rejected": " 6"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = json.loads(launcher(["eval", run_dir, "--data", pairs, "--json", "--max-rows", "8"], env, expect=0).stdout)
    sets = {s["name"]: s for s in res["sets"]}
    assert set(sets) == {"training data", "pairs.jsonl"}  # no reference-corpus loss: a reward model has no LM head
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final", num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final")

    def reward(prompt, response):
        with torch.no_grad():
            return float(model(**tok(prompt + response + tok.eos_token, return_tensors="pt")).logits[0, 0])

    margins = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in rows]
    got = sets["pairs.jsonl"]
    assert got["task"] == "rm" and got["base"] is None and got["rows"] == 2
    assert got["tuned"]["pref_accuracy"] == sum(m > 0 for m in margins) / 2
    assert got["tuned"]["reward_margin"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    text = launcher(["eval", run_dir, "--data", pairs, "--max-rows", "8"], env, expect=0).stdout
    assert "reward model on pairs.jsonl (2 pairs): pref_accuracy" in text


def test_dpo_stopped_by_a_signal_resumes_exactly(tmp_path, env, launcher):
    """DPO with LoRA (fp32, ZeRO-2, 1 rank): stopped by the rank's own SIGUSR1 at step 3 (signal, agree, save,
    exit 3) and resumed with the command launcher printed, it logs the uninterrupted run's loss, lr and grad norm
    at every step (full precision) and ends with its weights, bitwise."""
    import re

    from launcher.testing.faults import FAULT_ENV, TEST_DUMP_ENV
    from test_resume import assert_same_weights, load, logged_steps

    base = ["run", "--task", "dpo", "--method", "lora", "--max-steps", "6", "--seq-len", "64", "--precision", "fp32",
            "--zero", "2", "--nproc", "1", "--set", "optim.lr=3e-3", "--set", "output.log_every=1"]
    launcher([*base, "--out", tmp_path / "ref"], env, expect=0, **{TEST_DUMP_ENV: str(tmp_path / "ref.pt")})
    stopped = launcher([*base, "--out", tmp_path / "run"], env, expect=3, **{FAULT_ENV: "signal:rank=0:step=3"})
    hint = re.search(r"Resume with: launcher (run \S+ --out \S+ --force)", stopped.stderr)
    assert hint and "ranks agreed to stop at step 3/" in stopped.stdout, stopped.stderr[-3000:]
    resumed = launcher(hint.group(1).split(), env, expect=0, **{TEST_DUMP_ENV: str(tmp_path / "run.pt")})
    assert "resuming from" in resumed.stdout and "step 4/6" in resumed.stdout
    assert logged_steps(tmp_path / "run") == logged_steps(tmp_path / "ref")
    assert_same_weights(load(tmp_path / "ref.pt"), load(tmp_path / "run.pt"))  # bitwise
