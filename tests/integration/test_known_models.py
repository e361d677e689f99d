"""The shipped table of known models (launcher/plan/known_models.json): for every entry, the parameter count
launcher computes from its hyper-parameters alone (plan/modelinfo.py, no torch) equals the count of the
tensors transformers builds from the same config on the meta device, an independent count; and that
count is within 1% of the model card's published figure where the card gives three significant digits."""

from __future__ import annotations

import pytest

from launcher.plan import modelinfo
from launcher.plan.params import param_names

TABLE = modelinfo.known_models()
# one id per distinct config (the -Instruct twins share it)
DISTINCT = sorted({__import__("json").dumps(v["config"], sort_keys=True): k for k, v in TABLE.items()}.values())


def meta_count(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # each tensor once: a tied LM head shares the embedding's tensor
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def published(text: str) -> float:
    return float(text.rstrip("B")) * 1e9


def test_table_covers_the_models_the_issue_names():
    names = set(TABLE)
    for needed in ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Meta-Llama-3-8B",
                   "meta-llama/Llama-3.1-70B", "mistralai/Mistral-7B-v0.1", "google/gemma-2-2b", "google/gemma-2-9b",
                   *(f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")),
                   *(f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B"))]:
        assert needed in names, needed
    for entry in TABLE.values():
        assert entry["source"].startswith("https://huggingface.co/") and entry["published_params"]


@pytest.mark.parametrize("name", DISTINCT)
def test_analytic_count_equals_the_meta_device_model_and_the_published_count(name):
    m = modelinfo.known_model(name)
    assert m is not None and m.counted and m.origin == modelinfo.KNOWN_TABLE
    independent = meta_count(TABLE[name]["config"])
    assert m.total_params() == independent, (m.total_params(), independent)
    # the per-tensor table (method freeze selects from it) adds up to the same, a tied head counted once
    tensors = {t: size for _, size, t in param_names(m)}
    assert sum(tensors.values()) == independent
    text = TABLE[name]["published_params"]
    digits = len(text.rstrip("B").replace(".", "").lstrip("0"))
    if digits >= 3:  # "8.03B", "0.49B" is two digits: rounded too coarsely for 1%
        assert abs(independent / published(text) - 1) < 0.01, (independent, text)
    else:
        assert abs(independent / published(text) - 1) < 0.05, (independent, text)
