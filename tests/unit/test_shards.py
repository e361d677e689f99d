"""Memory-mapped token shards of mixture sources (launcher/data/shards.py, data/shardprep.py): byte-range
parts read every document exactly once, the files agree with their manifest, a rerun writes only missing or
damaged shards, a task of an array writes only its own, and ranks refuse an incomplete set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launcher.config.spec import validate
from launcher.data import shards
from launcher.data.cache import require_prepared, source_dirs, unprepared_paths
from launcher.data.shardprep import prepare_sources
from launcher.errors import UserError
from mixdata import mixture_files, mixture_spec


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
@pytest.mark.parametrize("shard_bytes", [7, 50, 333, 10**9])
def test_byte_range_parts_read_every_document_once(tmp_path, fmt, shard_bytes):
    files = mixture_files(tmp_path)
    path = files["web" if fmt == "jsonl" else "code"]
    whole = [t for _, t in shards.iter_texts(shards.Part(str(path), fmt, 0, -1), "text")]
    parts = shards.plan_parts([path], fmt, shard_bytes)
    assert (len(parts) > 1) == (shard_bytes < path.stat().st_size)
    cut = [t for part in parts for _, t in shards.iter_texts(part, "text")]
    norm = (lambda t: t.strip()) if fmt == "txt" else (lambda t: t)
    assert [norm(t) for t in cut] == [norm(t) for t in whole]
    assert len(whole) == 120


def test_shard_files_agree_with_their_record_and_read_back_memory_mapped(tmp_path):
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]]
    info = shards.write_shard(tmp_path, 0, docs)
    assert info["tokens"] == 12 and info["docs"] == 3
    assert shards.shard_info(tmp_path, 0, deep=True) == info
    assert shards.finalize(tmp_path, [shards.Part("f", "jsonl", 0, -1)], {"k": 1}) is not None
    assert shards.verify(tmp_path, deep=True) == []
    s = shards.ShardSet(tmp_path, seq_len=5)
    assert s.blocks == 2  # 12 tokens: two blocks of 5, the tail of 2 left out
    tokens, starts = s.block(1)
    assert isinstance(s._maps[0][0], np.memmap)
    assert tokens.tolist() == [6, 7, 8, 9, 10] and starts.tolist() == [0]
    tokens, starts = s.block(0)
    assert tokens.tolist() == [1, 2, 3, 4, 5] and starts.tolist() == [0, 3]
    # a flipped byte keeps the size: only the deep check (sha256) sees it
    raw = bytearray((tmp_path / "shard-00000.bin").read_bytes())
    raw[0] ^= 1
    (tmp_path / "shard-00000.bin").write_bytes(bytes(raw))
    assert shards.verify(tmp_path) == [] and len(shards.verify(tmp_path, deep=True)) == 1


def test_prepare_writes_shards_then_a_rerun_only_the_damaged_ones(tmp_path):
    spec = mixture_spec(tmp_path / "d", tmp_path / "cache")
    rep = prepare_sources(spec)
    assert rep.complete and rep.written >= 6  # several parts per source at shard_mb=0.002
    dirs = source_dirs(spec)
    mans = [shards.read_manifest(d) for d in dirs]
    assert [m["docs"] for m in mans] == [120, 120, 120]
    assert all(len(m["shards"]) > 1 for m in mans)
    assert require_prepared(spec) and unprepared_paths(spec) == []
    # the tokens of a shard are its documents, each with the tokenizer's EOS at the end
    from launcher.model.load import load_tokenizer

    tok = load_tokenizer(spec)
    first = json.loads((tmp_path / "d" / "web.jsonl").read_text().splitlines()[0])["text"]
    s = shards.ShardSet(dirs[0], 32)
    flat = np.memmap(dirs[0] / "shard-00000.bin", dtype="uint32", mode="r")
    idx = np.memmap(dirs[0] / "shard-00000.idx", dtype="int64", mode="r")
    doc0 = flat[idx[0]: idx[1]].tolist()
    assert doc0[-1] == tok.eos_token_id and tok.decode(doc0[:-1], skip_special_tokens=True).strip() == first.strip()
    assert s.tokens == mans[0]["tokens"]

    assert prepare_sources(spec).written == 0  # complete: nothing to do
    (dirs[1] / "shard-00001.bin").write_bytes(b"\0" * 8)  # damaged (wrong size)
    (dirs[2] / "shard-00000.json").unlink()  # missing its record
    with pytest.raises(UserError) as exc:
        require_prepared(spec)
    assert str(dirs[1]) in str(exc.value) and "launcher prepare" in str(exc.value)
    rep = prepare_sources(spec)
    assert rep.written == 2 and rep.complete
    assert [shards.read_manifest(d)["shards"] for d in dirs] == [m["shards"] for m in mans]


def test_array_tasks_write_disjoint_shards_and_the_last_one_completes_the_set(tmp_path):
    spec = mixture_spec(tmp_path / "d", tmp_path / "cache")
    reps = [prepare_sources(spec, task=k, tasks=3) for k in range(3)]
    assert [r.complete for r in reps] == [False, False, True]
    total = sum(len(shards.read_manifest(d)["shards"]) for d in source_dirs(spec))
    assert sum(r.written for r in reps) == total
    assert all(abs(r.written - total / 3) <= 1 for r in reps)


def test_mixture_spec_is_refused_with_the_field_named(cli, tmp_path):
    bad = {
        "names": ({"sources": [{"name": "a", "path": "x", "weight": 1}, {"name": "a", "path": "y", "weight": 1}]},
                  "names must be unique"),
        "weight": ({"sources": [{"name": "a", "path": "x", "weight": 0}]}, "data.sources[0].weight"),
        "stages": ({"sources": [{"name": "a", "path": "x", "weight": 1}],
                    "stages": [{"until_step": 10, "weights": {"a": 1}}, {"until_step": 5, "weights": {"a": 1}}]},
                   "data.stages[1].until_step=5"),
        "unknown": ({"sources": [{"name": "a", "path": "x", "weight": 1}],
                     "stages": [{"until_step": 10, "weights": {"b": 1}}]}, "names b, not in data.sources"),
        "both": ({"path": "x.txt", "sources": [{"name": "a", "path": "x", "weight": 1}]}, "data.path and data.sources"),
    }
    for name, (data, words) in bad.items():
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(json.dumps({"data": data}))
        proc = cli("spec", str(spec))
        assert proc.returncode == 2, (name, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)
    spec = tmp_path / "sft.yaml"
    spec.write_text(json.dumps({"task": "sft", "data": {"sources": [{"name": "a", "path": "x", "weight": 1}]}}))
    proc = cli("spec", str(spec))
    assert proc.returncode == 2 and "data.sources is for --task pretrain" in proc.stderr


def test_estimate_knows_preparation_time_from_bytes_then_from_the_shards(tmp_path):
    from launcher.plan.prep import BYTES_PER_TOKEN, TASK_START_S, TOKENS_PER_S_PER_PROCESS, estimate_prep

    spec = mixture_spec(tmp_path / "d", tmp_path / "cache")
    before = estimate_prep(spec)
    size = sum(f.stat().st_size for f in (tmp_path / "d").iterdir())
    assert not before.measured and abs(before.tokens - size / BYTES_PER_TOKEN) <= 3
    prepare_sources(spec)
    after = estimate_prep(spec)
    assert after.measured and after.tokens == sum(shards.read_manifest(d)["tokens"] for d in source_dirs(spec))
    four = estimate_prep(validate({**spec.to_dict(), "cluster": {"prep": {"tasks": 4}}}))
    assert four.processes == 4
    assert four.seconds - TASK_START_S == pytest.approx(after.tokens / (4 * TOKENS_PER_S_PER_PROCESS))
    assert estimate_prep(validate({})) is None


def test_a_missing_or_bad_source_file_is_named_before_anything_is_written(tmp_path, cli):
    from launcher.data.check import check_data

    spec = mixture_spec(tmp_path / "d", tmp_path / "cache")
    (tmp_path / "d" / "code.txt").unlink()
    with pytest.raises(UserError) as exc:
        check_data(spec)
    assert "code.txt" in str(exc.value)
    (tmp_path / "d" / "code.txt").write_text("some text\n")
    (tmp_path / "d" / "replay.jsonl").write_text('{"text": "no body field"}\n')
    tree = spec.to_dict()
    (tmp_path / "mix.yaml").write_text(json.dumps(tree))
    proc = cli("slurm", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "run"), "--dry-run")
    assert proc.returncode == 2 and "replay.jsonl" in proc.stderr and "body" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_processes_write_the_same_shards_as_one(tmp_path):
    one = mixture_spec(tmp_path / "d", tmp_path / "c1")
    two = validate({**one.to_dict(), "data": {**one.to_dict()["data"], "cache_dir": str(tmp_path / "c2")}})
    assert prepare_sources(one).complete and prepare_sources(two, procs=2).complete
    strip = lambda man: [{k: v for k, v in s.items() if k != "part"} for s in man["shards"]]  # noqa: E731
    for a, b in zip(source_dirs(one), source_dirs(two)):
        assert strip(shards.read_manifest(a)) == strip(shards.read_manifest(b))


def test_a_staged_hub_dataset_is_a_mixture_source(tmp_path, monkeypatch):
    """A source whose path is a hub dataset is read offline from the snapshot `launcher stage` left in the hub
    cache (its train split's files); not staged, it is exit 2 naming the source and the fix. Stage and
    pre-flight see it as a hub item of its own."""
    from launcher.plan.prep import estimate_prep
    from launcher.submit.stage import hub_items
    from test_stage import fake_dataset

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tree = mixture_spec(tmp_path / "d", tmp_path / "cache").to_dict()
    tree["data"]["sources"][1] = {"name": "hub", "path": "acme/corpus", "weight": 0.3}
    spec = validate(tree)
    assert [i.field for i in hub_items(spec)] == ["data.sources[1].path"]
    with pytest.raises(UserError) as exc:
        prepare_sources(spec)
    assert "data.sources[1] (hub)" in str(exc.value) and "launcher stage SPEC" in str(exc.value)
    assert estimate_prep(spec) is None  # its size is unknown until it is staged
    assert not any(d.exists() for d in source_dirs(spec)[1:2])
    fake_dataset(home)  # 40 records in data/train.jsonl of a snapshot
    assert estimate_prep(spec).tokens > 0
    rep = prepare_sources(spec)
    assert rep.complete
    assert shards.read_manifest(source_dirs(spec)[1])["docs"] == 40
