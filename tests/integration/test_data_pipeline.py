"""prepare/load_prepared: pretraining blocks, SFT masking, collators, and the cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launcher import assets
from launcher.config.spec import validate
from launcher.data import build
from launcher.data.cache import cache_dir, cache_key, read_meta
from launcher.data.collate import make_collator
from launcher.errors import UserError
from launcher.model.load import load_tokenizer_from

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer_from(assets.tiny_dir())


def spec(tmp_path: Path, task="pretrain", path=None, optim=None, **data):
    tree = {"task": task, "data": {"path": None if path is None else str(path), "cache_dir": str(tmp_path / "cache"),
                                   **data}}
    if optim:
        tree["optim"] = optim
    return validate(tree)


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pretrain_blocks_are_seq_len_with_eos_between_documents(tmp_path, tok):
    docs = ["The first document talks about rivers.", "A second one, about stones and bridges.",
            "Third: gardens, windows and yellow lanterns in the evening."] * 4
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(docs) + "\n")
    s = spec(tmp_path, path=f, seq_len=16)
    build.prepare(s, tok)
    ds = build.load_prepared(s, tok)
    rows = ds["input_ids"]
    assert rows and all(len(r) == 16 for r in rows)
    expected = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    n = len(expected) // 16
    assert [t for r in rows for t in r] == expected[: n * 16]  # every token in order, no padding, tail dropped
    assert tok.pad_token_id not in {t for r in rows for t in r}
    batch = make_collator(s, tok)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 16)
    assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_pretrain_reads_jsonl_text_field_and_the_embedded_corpus(tmp_path, tok):
    f = jsonl(tmp_path / "d.jsonl", [{"body": f"Document number {i} says something long enough."} for i in range(20)])
    s = spec(tmp_path, path=f, seq_len=32, text_field="body")
    build.prepare(s, tok)
    ds = build.load_prepared(s, tok)
    assert all(len(r) == 32 for r in ds["input_ids"])
    assert sum(r.count(tok.eos_token_id) for r in ds["input_ids"]) >= 15
    meta = read_meta(build.prepare(spec(tmp_path, seq_len=256), tok))
    assert meta["documents"] > 1000 and meta["splits"]["train"]["rows"] > 300


def _learned(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


def test_sft_prompt_response_masks_the_prompt(tmp_path, tok):
    f = jsonl(tmp_path / "pr.jsonl", [{"prompt": "Question: what is 2 + 3?\nAnswer:", "response": " 5."},
                                      {"prompt": "Spell apple backwards.", "response": " elppa"}])
    s = spec(tmp_path, "sft", path=f, seq_len=64)
    build.prepare(s, tok)
    ds = build.load_prepared(s, tok)
    ex = ds[0]
    n_prompt = len(tok("Question: what is 2 + 3?\nAnswer:", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert _learned(tok, ex["input_ids"], ex["labels"]) == " 5.<|end_of_text|>"
    batch = make_collator(s, tok)([ds[0], ds[1]])
    width = max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    short = 1 if len(ds[1]["input_ids"]) < width else 0
    n = len(ds[short]["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    assert batch["labels"][short, n:].eq(-100).all() and batch["attention_mask"][short, n:].eq(0).all()
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all() and batch["attention_mask"][short, :n].eq(1).all()


def test_sft_chat_learns_only_assistant_turns(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Violet."}, {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Silver."}]
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    s = spec(tmp_path, "sft", path=f, seq_len=128)
    build.prepare(s, tok)
    ex = build.load_prepared(s, tok)[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _learned(tok, ex["input_ids"], ex["labels"]) == "Violet.<|im_end|>\nSilver.<|im_end|>\n"


def test_sft_alpaca_layout_and_truncation(tmp_path, tok):
    f = jsonl(tmp_path / "a.jsonl", [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                     {"instruction": "word " * 80, "input": "", "output": "never seen"}])
    s = spec(tmp_path, "sft", path=f, seq_len=40)
    meta = read_meta(build.prepare(s, tok))
    assert meta["dropped_no_response"] == 1 and meta["truncated"] == 1 and meta["splits"]["train"]["rows"] == 1
    ex = build.load_prepared(s, tok)[0]
    assert tok.decode(ex["input_ids"]).startswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3")
    assert _learned(tok, ex["input_ids"], ex["labels"]) == "5<|end_of_text|>"


def test_cache_is_reused_and_keyed_on_what_shapes_tokens(tmp_path, tok, monkeypatch):
    s = spec(tmp_path, "sft", seq_len=64)
    first = build.prepare(s, tok)
    assert first.name == cache_key(s, assets.tiny_dir()) and (first / "meta.json").is_file()

    def no_rebuild(*a, **k):
        raise AssertionError("prepared data was rebuilt although it is in the cache")

    monkeypatch.setattr(build, "_build", no_rebuild)
    assert build.prepare(s, tok) == first
    # lr, steps, cluster and output do not shape tokens: same entry.
    other = validate({**s.to_dict(), "optim": {"lr": 3e-4, "max_steps": 7}, "cluster": {"nodes": 4},
                      "output": {"dir": str(tmp_path / "elsewhere")}})
    assert cache_key(other, assets.tiny_dir()) == first.name and build.prepare(other, tok) == first
    assert len(build.load_prepared(other, tok)) == len(build.load_prepared(s, tok))
    # seq_len, packing, field names, the data files and the tokenizer do.
    keys = {cache_key(validate({**s.to_dict(), "data": {**s.to_dict()["data"], **change}}), assets.tiny_dir())
            for change in ({"seq_len": 128}, {"packing": True}, {"prompt_field": "q"}, {"eval_fraction": 0.1})}
    assert first.name not in keys and len(keys) == 4
    monkeypatch.undo()
    longer = build.prepare(validate({**s.to_dict(), "data": {**s.to_dict()["data"], "seq_len": 128}}), tok)
    assert longer != first and longer.name.startswith("sft-128-")
    # Nothing half-written is left behind.
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


def test_cache_key_follows_data_files_and_tokenizer_files(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    s = spec(tmp_path, path=f, seq_len=8)
    tdir = tmp_path / "tok"
    shutil.copytree(assets.tiny_dir(), tdir, ignore=shutil.ignore_patterns("corpus.txt", "sft.jsonl", "*.py"))
    key = cache_key(s, tdir)
    assert cache_key(s, tdir) == key
    f.write_text(json.dumps({"text": "hello there, changed"}) + "\n")
    key2 = cache_key(s, tdir)
    assert key2 != key
    cfg = json.loads((tdir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    key3 = cache_key(s, tdir)
    assert key3 != key2
    (tdir / "config.json").write_text("{}")  # the model's config does not shape tokens
    assert cache_key(s, tdir) == key3


def test_load_prepared_without_prepare_says_how_to_fix(tmp_path, tok):
    with pytest.raises(UserError, match="run `launcher prepare SPEC`"):
        build.load_prepared(spec(tmp_path, seq_len=64), tok)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "lc"))
    assert cache_dir(validate({})) == tmp_path / "lc" / "data"
    monkeypatch.delenv("LAUNCHER_CACHE")
    assert cache_dir(validate({})) == Path.home() / ".cache" / "launcher" / "data"
    assert cache_dir(validate({"data": {"cache_dir": str(tmp_path / "x")}})) == tmp_path / "x"


def test_eval_split_is_deterministic_by_seed(tmp_path, tok):
    a = spec(tmp_path, "sft", seq_len=64, eval_fraction=0.1)
    b = spec(tmp_path, "sft", seq_len=64, eval_fraction=0.1, optim={"seed": 7})
    pa_, pb = build.prepare(a, tok), build.prepare(b, tok)
    assert pa_ != pb
    ev_a, ev_b = build.load_prepared(a, tok, "eval"), build.load_prepared(b, tok, "eval")
    assert len(ev_a) == 40 and len(build.load_prepared(a, tok)) == 360
    assert ev_a["input_ids"] != ev_b["input_ids"]
    shutil.rmtree(pa_)
    build.prepare(a, tok)  # rebuilt from scratch: the same split
    assert build.load_prepared(a, tok, "eval")["input_ids"] == ev_a["input_ids"]
    no_eval = spec(tmp_path, "sft", seq_len=64)
    build.prepare(no_eval, tok)
    with pytest.raises(UserError, match="eval_fraction"):
        build.load_prepared(no_eval, tok, "eval")


def test_bad_record_past_the_sample_fails_prepare_cleanly(tmp_path, tok):
    recs = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(150)] + [{"prompt": "q", "response": None}]
    f = jsonl(tmp_path / "d.jsonl", recs)
    s = spec(tmp_path, "sft", path=f, seq_len=32)
    with pytest.raises(UserError, match="data row 151"):
        build.prepare(s, tok)
    assert not any((tmp_path / "cache").iterdir())


def test_the_pad_token_the_shared_loader_adds_changes_no_cached_token(tmp_path):
    """Data preparation and training load the tokenizer through model/load.py, which gives a tokenizer
    without a pad token its EOS as pad. The tokens prepared with it equal those of the tokenizer as
    saved, so cache entries made before that loader was shared stay valid."""
    from transformers import AutoTokenizer

    nopad = tmp_path / "nopad"
    shutil.copytree(assets.tiny_dir(), nopad)
    config = json.loads((nopad / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (nopad / "tokenizer_config.json").write_text(json.dumps(config))
    as_saved = AutoTokenizer.from_pretrained(str(nopad))
    shared = load_tokenizer_from(nopad)
    assert as_saved.pad_token is None and shared.pad_token == shared.eos_token
    docs = jsonl(tmp_path / "d.jsonl", [{"text": f"Document {i} is about the number {i * 7}."} for i in range(30)])
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Double {i}."},
                                                         {"role": "assistant", "content": str(2 * i)}]}
                                           for i in range(20)])
    for task, path, extra in (("pretrain", docs, {}), ("sft", chat, {}), ("sft", chat, {"packing": True})):
        rows = []
        for tok in (as_saved, shared):
            s = spec(tmp_path / tok.__class__.__name__ / str(id(tok)), task, path=path, seq_len=32, **extra)
            build.prepare(s, tok)
            ds = build.load_prepared(s, tok)
            rows.append({k: ds[k] for k in ds.column_names})
        assert rows[0] == rows[1] and rows[0]["input_ids"], (task, extra)
    batch = make_collator(spec(tmp_path, "sft", path=chat, seq_len=32), shared)
    padded = batch([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert padded["input_ids"][1].tolist() == [8, shared.eos_token_id, shared.eos_token_id]
