"""Packed SFT batches train exactly like the same examples unpacked (clarifications: packing in transformers 5.23).

Isolation comes from position_ids restarting per example, no attention_mask and use_cache=False.
An all-ones attention mask lets examples attend to each other; the control test shows this test sees it.
"""

from __future__ import annotations

import pytest

from launcher import assets
from launcher.config.spec import validate
from launcher.data import build
from launcher.data.collate import make_collator
from launcher.model.load import load_tokenizer_from

pytestmark = pytest.mark.integration
SEQ = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: OpenMP threads only wait on each other, badly so on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tok = load_tokenizer_from(assets.tiny_dir())
    cache = str(tmp_path_factory.mktemp("cache"))
    plain = validate({"task": "sft", "data": {"seq_len": SEQ, "cache_dir": cache}})
    packed = validate({"task": "sft", "data": {"seq_len": SEQ, "cache_dir": cache, "packing": True}})
    build.prepare(plain, tok)
    build.prepare(packed, tok)
    rows = build.load_prepared(packed, tok)
    batch = make_collator(packed, tok)([rows[0], rows[1], rows[2]])
    return tok, build.load_prepared(plain, tok), [rows[i] for i in range(3)], batch


def _model(attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(assets.tiny_dir())
    cfg.use_cache = False
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def _loss(logits, labels):
    import torch

    ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
    return ce / labels[1:].ne(-100).sum()


def _per_example(model, plain, rows, batch, **extra):
    """(unpacked loss, packed loss) for every example in the packed batch, in order."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **extra).logits
        out, k = [], 0
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            pos = batch["position_ids"][r, :n]
            starts = pos.eq(0).nonzero().flatten().tolist() + [n]
            for s, e in zip(starts[:-1], starts[1:]):
                ex = plain[k]
                k += 1
                assert batch["input_ids"][r, s:e].tolist() == ex["input_ids"]  # packed in order, nothing lost
                alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
                out.append((_loss(alone, torch.tensor(ex["labels"])), _loss(logits[r, s:e], batch["labels"][r, s:e])))
    return out


def test_packed_batch_has_no_attention_mask_and_restarting_positions(prepared):
    _, plain, rows, batch = prepared
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape[1] <= SEQ and all(len(r["input_ids"]) <= SEQ for r in rows)
    assert sum(r["position_ids"].count(0) for r in rows) >= 6  # several examples per row
    widths = {len(r["input_ids"]) for r in rows}
    assert len(widths) > 1  # one row is padded: the pad segment is covered too


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_per_example(prepared, attn):
    _, plain, rows, batch = prepared
    pairs = _per_example(_model(attn), plain, rows, batch)
    assert len(pairs) >= 6
    worst = max(abs(a - b).item() for a, b in pairs)
    assert worst < 1e-5, f"{attn}: packed and unpacked per-example losses differ by {worst}"


def test_control_an_all_ones_mask_leaks_across_examples(prepared):
    import torch

    _, plain, rows, batch = prepared
    pairs = _per_example(_model("sdpa"), plain, rows, batch,
                         attention_mask=torch.ones_like(batch["input_ids"]))
    assert max(abs(a - b).item() for a, b in pairs) > 1e-3
