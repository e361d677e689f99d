"""data.doc_mask: documents packed into one pretraining block train as if each were alone (fp32, within 1e-5),
on sdpa and eager: the block's position ids restart at each document start and the collator sends no
attention mask (use_cache=False), as SFT packing does. The control without doc_mask shows the test sees
documents attending to each other."""

from __future__ import annotations

import pytest

from launcher.data.collate import make_collator
from launcher.data.mixture import open_mixture
from launcher.data.shardprep import prepare_sources
from launcher.model.load import load_tokenizer
from mixdata import mixture_spec
from test_packing import _model  # the tiny Llama in fp32, use_cache off, seeded

pytestmark = pytest.mark.integration
SEQ = 96


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("docmask")
    spec = mixture_spec(root / "d", root / "cache", seq_len=SEQ, doc_mask=True)
    assert prepare_sources(spec).complete
    ds, _ = open_mixture(spec, 4, 2)
    tok = load_tokenizer(spec)
    rows = [ds[n] for n in range(4)]
    return spec, tok, rows, make_collator(spec, tok)(rows)


def _token_losses(logits, ids):
    import torch

    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")


def _compare(model, batch, **extra):
    """(max |packed - alone| over every document's token losses, documents compared)."""
    import torch

    assert "attention_mask" not in batch
    worst, docs = 0.0, 0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra).logits
        for r in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][r]
            starts = pos.eq(0).nonzero().flatten().tolist() + [SEQ]
            for s, e in zip(starts[:-1], starts[1:]):
                if e - s < 2:
                    continue
                seg = batch["input_ids"][r, s:e]
                alone = model(input_ids=seg[None], use_cache=False).logits[0]
                packed = _token_losses(logits[r, s:e], seg)
                worst = max(worst, float((packed - _token_losses(alone, seg)).abs().max()))
                docs += 1
                # the label of a document's first token is ignored: it would be predicted from the one before
                if s > 0:
                    assert int(batch["labels"][r, s]) == -100
    return worst, docs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_documents_in_a_block_score_as_if_alone(blocks, attn):
    _, _, _, batch = blocks
    worst, docs = _compare(_model(attn), batch)
    assert docs >= 8
    assert worst <= 1e-5, worst


def test_control_without_restarted_positions_documents_attend_to_each_other(blocks):
    import torch

    _, _, _, batch = blocks
    plain = dict(batch, position_ids=torch.arange(SEQ).expand(batch["input_ids"].shape[0], SEQ))
    model = _model("sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=plain["position_ids"], use_cache=False).logits
    pos = batch["position_ids"][0]
    s = int(pos.eq(0).nonzero().flatten().tolist()[1])
    seg = batch["input_ids"][0, s:]
    with torch.no_grad():
        alone = model(input_ids=seg[None], use_cache=False).logits[0]
    assert float((_token_losses(logits[0, s:], seg) - _token_losses(alone, seg)).abs().max()) > 1e-3
