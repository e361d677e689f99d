"""Every shipped example spec resolves, plans and renders (a spec users copy must not be broken)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config.resolve import resolve
from launcher.plan.plan import make_plan
from launcher.render.deepspeed import render

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "pretrain", "sft_lora", "qlora_8b", "multinode"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_resolves_plans_and_renders(path):
    spec = resolve(path)
    plan = make_plan(spec)
    cfg = render(spec, plan)
    assert cfg["train_batch_size"] == plan.micro_batch * plan.grad_accum * plan.world_size
