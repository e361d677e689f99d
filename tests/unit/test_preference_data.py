"""Preference tasks (dpo, orpo, kto, simpo, rm): the spec's task values and field names, their combination
checks, and the per-row data checks that refuse a bad pair before anything starts, naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import assets
from launcher.config.spec import PREFERENCE_TASKS, validate
from launcher.data.check import check_data
from launcher.errors import SpecError, UserError


def spec(path, task="dpo", method="full", **data):
    return validate({"task": task, "method": method, "optim": {"micro_batch": 2},
                     "data": {"path": None if path is None else str(path), **data}})


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def refusal(s, **kw) -> UserError:
    with pytest.raises(UserError) as exc:
        check_data(s, **kw)
    return exc.value


GOOD = {"prompt": "Question: 1 + 1?\nAnswer:", "chosen": " 2", "rejected": " 3"}


@pytest.mark.parametrize("task", PREFERENCE_TASKS)
def test_embedded_preference_set_passes_every_task(task):
    s = spec(None, task)
    check_data(s, tokenizer_has_chat_template=True)
    rows = [json.loads(x) for x in (assets.tiny_dir() / "pref.jsonl").read_text().splitlines()]
    assert len(rows) >= 200 and all(r["chosen"] != r["rejected"] for r in rows)


def test_embedded_set_is_what_build_py_makes():
    from launcher.tiny import build

    assert build.build_pref() == (assets.tiny_dir() / "pref.jsonl").read_text()


def test_bad_row_is_found_past_the_first_hundred_and_named_by_line(tmp_path):
    rows = [GOOD] * 150 + [{**GOOD, "rejected": GOOD["chosen"]}]
    err = refusal(spec(jsonl(tmp_path / "p.jsonl", rows)))
    assert "p.jsonl line 151" in str(err) and "equals" in str(err) and err.field == "data.chosen_field"


@pytest.mark.parametrize("row, words, field", [
    ({"prompt": "q", "chosen": "a"}, ["no field 'rejected'", "data.rejected_field"], "data.rejected_field"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, ["'chosen'", "empty"], "data.chosen_field"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, ["'chosen'", "int"], "data.chosen_field"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     ["strings and some chat"], "data.prompt_field"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, ["no non-empty 'assistant'"], "data.chosen_field"),
])
def test_each_bad_pair_names_file_line_and_field(tmp_path, row, words, field):
    err = refusal(spec(jsonl(tmp_path / "p.jsonl", [GOOD, row])), tokenizer_has_chat_template=True)
    assert "p.jsonl line 2" in str(err) and all(w in str(err) for w in words), str(err)
    assert err.field == field


def test_chat_pairs_need_a_chat_template(tmp_path):
    chat = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    path = jsonl(tmp_path / "c.jsonl", [chat])
    check_data(spec(path), tokenizer_has_chat_template=True)
    err = refusal(spec(path), tokenizer_has_chat_template=False)
    assert "chat template" in str(err) and "c.jsonl line 1" in str(err)


def test_field_names_are_overridable(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"q": "x", "good": "a", "bad": "b"}])
    check_data(spec(path, prompt_field="q", chosen_field="good", rejected_field="bad"))
    assert "no field 'prompt'" in str(refusal(spec(path)))


def test_kto_takes_unpaired_rows_and_checks_label_and_completion(tmp_path):
    ok = {"prompt": "q", "completion": "a", "label": True}
    check_data(spec(jsonl(tmp_path / "k.jsonl", [ok, {**ok, "label": False}]), "kto"))
    err = refusal(spec(jsonl(tmp_path / "k2.jsonl", [ok, {**ok, "completion": ""}]), "kto"))
    assert "k2.jsonl line 2" in str(err) and "'completion'" in str(err) and "empty" in str(err)
    err = refusal(spec(jsonl(tmp_path / "k3.jsonl", [{**ok, "label": "yes"}]), "kto"))
    assert "data.label_field" in str(err) and "true" in str(err)
    check_data(spec(jsonl(tmp_path / "k4.jsonl", [GOOD]), "kto"))  # pairs: split into two examples


def test_preference_combinations_are_refused_with_the_fix():
    with pytest.raises(SpecError) as exc:
        validate({"task": "orpo", "method": "ia3", "data": {"packing": True}})
    text = str(exc.value)
    assert "drop --packing" in text and "--method lora" in text
    for method in ("ia3", "prefix", "prompt"):  # dpo takes every method
        validate({"task": "dpo", "method": method})
    with pytest.raises(SpecError, match="drop --loss"):
        validate({"task": "orpo", "optim": {"loss": "chunked"}})
    with pytest.raises(SpecError, match="--micro-batch 2"):
        validate({"task": "kto"})
    validate({"task": "kto", "optim": {"micro_batch": 2}})


def test_bad_pair_exits_2_from_the_cli_with_no_traceback(tmp_path, cli):
    path = jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "chosen": GOOD["rejected"]}])
    proc = cli("prepare", "--task", "dpo", "--data", str(path), "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "p.jsonl line 2" in proc.stderr and not (tmp_path / "cache").exists()
