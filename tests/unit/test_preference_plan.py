"""The plan and the estimator count what a preference task holds: both sequences of a pair in tokens and
activations, a reference copy only when it is kept in memory, none for the adapter-disabled base or
precomputed log-probs."""

from __future__ import annotations

from launcher.config.spec import reference_mode, validate
from launcher.plan import memory
from launcher.plan.estimate import estimate
from launcher.plan.params import count_params
from launcher.plan.plan import make_plan


def plan_of(**tree):
    s = validate({"precision": "bf16", "zero": {"stage": 2}, "cluster": {"gpus_per_node": 1, "gpu_type": "h100"},
                  **tree})
    return s, make_plan(s)


def test_a_pair_counts_both_sequences_in_tokens_per_step():
    _, sft = plan_of(task="sft")
    _, dpo = plan_of(task="dpo")
    assert dpo.tokens_per_step == 2 * sft.tokens_per_step == 2 * dpo.global_batch * dpo.seq_len
    assert any("2 sequences" in line for line in dpo.summary())


def test_reference_modes_follow_method_and_setting():
    assert reference_mode(validate({"task": "dpo", "method": "lora"})) == "adapter"
    assert reference_mode(validate({"task": "dpo"})) == "precomputed"
    assert reference_mode(validate({"task": "dpo", "pref": {"reference": "in_memory"}})) == "in_memory"
    assert reference_mode(validate({"task": "orpo"})) == reference_mode(validate({"task": "rm"})) == "none"


def test_only_an_in_memory_reference_adds_a_frozen_copy_of_the_weights():
    peaks = {}
    for ref in ("precomputed", "in_memory"):
        s, p = plan_of(task="dpo", pref={"reference": ref})
        peaks[ref] = memory.peak(p.model, s, p.setup(), count_params(p.model, s), p.micro_batch, p.seq_len)
    assert peaks["precomputed"].states["reference"] == 0
    total = count_params(p.model, s).total  # independent of the memory model: parameters x 2 bytes (bf16)
    assert peaks["in_memory"].states["reference"] == total * 2
    assert peaks["in_memory"].model_states - peaks["precomputed"].model_states == total * 2
    s, p = plan_of(task="dpo", pref={"reference": "in_memory"})
    assert any("reference copy" in n for n in estimate(s, p).notes)


def test_pair_activations_are_those_of_twice_the_micro_batch():
    s_sft, p = plan_of(task="sft")
    s_dpo, _ = plan_of(task="dpo")
    params = count_params(p.model, s_sft)
    dpo = memory.peak(p.model, s_dpo, p.setup(), params, 1, p.seq_len)
    sft2 = memory.peak(p.model, s_sft, p.setup(), params, 2, p.seq_len)
    assert dpo.saved == sft2.saved and dpo.logits == sft2.logits


def test_preference_scores_are_dpo_reward_accuracy_and_margin_against_the_base():
    """By hand: pair 1's chosen log-ratio (-1 - -3 = 2) beats its rejected one (-2 - -2 = 0); pair 2's does not
    (-5 - -4 = -1 against -1 - -3 = 2). Margins 2 and -3, times beta 0.5: mean -0.25. The base against itself:
    0 and 0."""
    from launcher.evaluate import preference_scores

    tuned, base = [(-1.0, -2.0), (-5.0, -1.0)], [(-3.0, -2.0), (-4.0, -3.0)]
    t, b = preference_scores(tuned, base, beta=0.5)
    assert t == {"pref_accuracy": 0.5, "reward_margin": -0.25} and b == {"pref_accuracy": 0.0, "reward_margin": 0.0}
    assert preference_scores(tuned, None, beta=0.5) == ({"pref_accuracy": None, "reward_margin": None}, {})
