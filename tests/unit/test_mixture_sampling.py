"""The mixture's sample sequence (launcher/data/mixture.py) read through the real memory-mapped shards:
realized token shares follow the weights, a stage switches at its step, the order is a function of
(seed, sample index) alone, blocks are not repeated within a source's epoch, and doc_mask rows restart
position ids at document starts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from launcher.config.spec import validate
from launcher.data.mixture import CYCLE, MixtureDataset, Schedule, open_mixture, permuted
from launcher.data.positions import IGNORE_INDEX
from launcher.data.shardprep import prepare_sources
from mixdata import mixture_spec  # tests/mixdata.py (tests/ is on sys.path through its conftest)

G = 8  # sequences per optimizer step


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    spec = mixture_spec(root / "d", root / "cache", seq_len=16)
    assert prepare_sources(spec).complete
    return spec


def _with(spec, **data):
    tree = spec.to_dict()
    tree["data"].update(data)
    return validate(tree)


def test_realized_shares_within_2pp_over_200_steps(prepared):
    ds, _ = open_mixture(prepared, G, 200)
    seen = Counter(ds.locate(n)[0] for n in range(len(ds)))
    shares = [seen[k] / len(ds) for k in range(3)]
    assert shares == pytest.approx([0.6, 0.3, 0.1], abs=0.02)
    # and at every step on the way, the tokens logged per source are the samples drawn so far
    sched = ds.schedule
    drawn = [0, 0, 0]
    for step in range(200):
        assert list(sched.tokens_by_source(step, 16).values()) == [c * 16 for c in drawn]
        for n in range(step * G, (step + 1) * G):
            drawn[ds.locate(n)[0]] += 1
        if step >= 20:  # close to the weights from early on, not only on average
            assert abs(drawn[0] / sum(drawn) - 0.6) < 0.02


def test_stage_switch_takes_effect_at_its_step(prepared):
    spec = _with(prepared, stages=[{"until_step": 50, "weights": {"web": 1.0}},
                                   {"until_step": 120, "weights": {"web": 0.2, "code": 0.2, "replay": 0.6}}])
    ds, _ = open_mixture(spec, G, 200)
    src = [ds.locate(n)[0] for n in range(len(ds))]
    assert set(src[: 50 * G]) == {0}
    after = Counter(src[50 * G: 120 * G])
    assert after[2] / sum(after.values()) == pytest.approx(0.6, abs=0.02)
    assert src[50 * G: 51 * G].count(0) < G  # the very first step of the stage already mixes
    last = Counter(src[120 * G:])  # past the last stage, its weights stay
    assert last[2] / sum(last.values()) == pytest.approx(0.6, abs=0.03)


def test_order_is_a_function_of_seed_and_index_only(prepared):
    a, _ = open_mixture(prepared, G, 50)
    b, _ = open_mixture(prepared, G, 50)
    order = [a.locate(n) for n in range(len(a))]
    assert order == [b.locate(n) for n in reversed(range(len(b)))][::-1]  # any access order, same answer
    # another world size reads the same indices (the global batch is fixed): same sequence; another seed differs
    reseeded = validate({**prepared.to_dict(), "optim": {**prepared.to_dict()["optim"], "seed": 7}})
    other, _ = open_mixture(reseeded, G, 50)
    assert [other.locate(n) for n in range(len(other))] != order
    assert np.array_equal(a[17]["input_ids"], b[17]["input_ids"])


def test_a_source_repeats_no_block_within_an_epoch(prepared):
    ds, _ = open_mixture(prepared, G, 400)
    per = {k: [] for k in range(3)}
    for n in range(len(ds)):
        k, j = ds.locate(n)
        per[k].append(j)
    for k, blocks in per.items():
        b = ds.train_blocks[k]
        for e in range(len(blocks) // b):
            epoch = blocks[e * b: (e + 1) * b]
            assert sorted(epoch) == list(range(b))  # a permutation of the training blocks
    for k in range(3):
        assert all(j < ds.train_blocks[k] for j in per[k])  # never a held-out block


def test_permutation_is_a_bijection_for_awkward_sizes():
    for blocks in (1, 2, 6, 97, 1000, 1024):
        assert sorted(permuted(c, blocks, 3, 1) for c in range(blocks)) == list(range(blocks))


def test_cycle_counts_match_the_weights_exactly():
    spec = validate({"data": {"sources": [{"name": "a", "path": "x", "weight": 2}, {"name": "b", "path": "y", "weight": 1}]}})
    s = Schedule(spec, 1)
    assert sum(s.counts_before(3 * CYCLE)) == 3 * CYCLE
    assert abs(s.counts_before(3 * CYCLE)[0] - 2 * CYCLE) <= 3
    assert all(abs(s.counts_before(n)[0] - 2 * n / 3) <= 1 for n in range(0, 3000, 7))


def test_doc_mask_rows_restart_positions_and_ignore_the_cross_document_label(prepared):
    spec = _with(prepared, doc_mask=True)
    ds, _ = open_mixture(spec, G, 20)
    found = 0
    for n in range(len(ds)):
        row = ds[n]
        k, j = ds.locate(n)
        _, starts = ds.sets[k].block(j)
        pos, labels = row["position_ids"], row["labels"]
        for s in starts[starts > 0]:
            found += 1
            assert pos[s] == 0 and pos[s - 1] > 0 or s == 1
            assert labels[s] == IGNORE_INDEX
        assert pos[0] == 0 and (np.diff(pos) == 1).sum() == len(pos) - 1 - (starts > 0).sum()
    assert found > 10
    plain = MixtureDataset(prepared, ds.sets, G, 20)[0]
    assert set(plain) == {"input_ids"}


def test_a_resume_with_another_global_batch_is_refused_with_the_one_to_use():
    from launcher.data.mixture import resume_batch_problem

    done = [{"end_step": 4, "tokens_per_step": 8 * 16}, {"end_step": None, "tokens_per_step": 4 * 16}]
    assert resume_batch_problem(done, 8, 16) is None  # same G, any number of ranks
    assert resume_batch_problem([], 4, 16) is None and resume_batch_problem(done[1:], 4, 16) is None
    problem = resume_batch_problem(done, 4, 16)
    assert "global batch of 8" in problem and "optim.global_batch=8" in problem
