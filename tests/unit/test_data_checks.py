"""check_data: each kind of bad data gives one UserError naming the file, line and field, without heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.spec import validate
from launcher.data.check import check_data
from launcher.errors import UserError


def spec(path, task="pretrain", **data):
    return validate({"task": task, "data": {"path": None if path is None else str(path), **data}})


def jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def fails(s, **kw) -> UserError:
    with pytest.raises(UserError) as exc:
        check_data(s, **kw)
    return exc.value


def test_embedded_defaults_pass():
    check_data(spec(None, "pretrain"))
    check_data(spec(None, "sft"), tokenizer_has_chat_template=True)


def test_missing_file_names_it_and_the_fix(tmp_path):
    err = fails(spec(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(err) and "does not exist" in str(err) and "data.path" in str(err)


def test_empty_file_and_blank_jsonl_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in str(fails(spec(tmp_path / "empty.jsonl")))
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    err = fails(spec(tmp_path / "blank.jsonl"))
    assert "blank.jsonl" in str(err) and "empty" in str(err)


def test_malformed_json_line_is_named_by_number(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    err = fails(spec(f))
    assert f"{f} line 3" in str(err) and "malformed JSON" in str(err)


def test_missing_text_field_lists_the_fields_found(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b", "id": 2}])
    err = fails(spec(f))
    msg = str(err)
    assert "line 2" in msg and "'text'" in msg and "'body', 'id'" in msg and "data.text_field" in msg
    assert err.field == "data.text_field"
    check_data(spec(jsonl(tmp_path / "ok.jsonl", [{"body": "x"}]), text_field="body"))


def test_text_that_is_not_a_string_is_refused(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": None}])
    assert "is null, expected a string" in str(fails(spec(f)))


def test_sft_missing_response_names_the_partner_field(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
    err = fails(spec(f, "sft"))
    assert "line 1" in str(err) and "'response'" in str(err) and "'prompt', 'answer'" in str(err)
    assert err.field == "data.response_field"


def test_sft_without_any_known_layout_lists_the_choices(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    msg = str(fails(spec(f, "sft")))
    assert "'messages'" in msg and "'prompt'" in msg and "'instruction'" in msg and "'question', 'answer'" in msg


def test_renamed_sft_fields_and_alpaca_layout_pass(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    check_data(spec(f, "sft", prompt_field="question", response_field="answer"))
    g = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "do", "input": "", "output": "done"}])
    check_data(spec(g, "sft"))


def test_messages_without_a_chat_template_are_refused(tmp_path):
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}])
    check_data(spec(f, "sft"), tokenizer_has_chat_template=True)
    check_data(spec(f, "sft"))  # unknown: not checked
    err = fails(spec(f, "sft"), tokenizer_has_chat_template=False)
    assert "chat template" in str(err) and "chat.jsonl line 1" in str(err)


def test_messages_need_role_content_and_an_assistant_turn(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "no 'assistant' message" in str(fails(spec(f, "sft")))
    g = jsonl(tmp_path / "g.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    assert "messages[0] needs a string 'role' and a string 'content'" in str(fails(spec(g, "sft")))


def test_mixed_sft_layouts_are_refused(tmp_path):
    f = jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "response": "a"},
                                     {"messages": [{"role": "assistant", "content": "x"}]}])
    assert "line 2" in str(fails(spec(f, "sft")))


def test_csv_missing_column_and_header_only(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("title,body\nx,y\n")
    err = fails(spec(f))
    assert "d.csv line 2" in str(err) and "'title', 'body'" in str(err)
    g = tmp_path / "h.csv"
    g.write_text("text\n")
    assert "empty" in str(fails(spec(g)))


def test_json_array_and_columns(tmp_path):
    ok = tmp_path / "a.json"
    ok.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    check_data(spec(ok))
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"text": ["a", "b"]}, indent=1))
    check_data(spec(cols))
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"text": "a"},\n {"text": "b" "c"}\n]')
    assert "bad.json line 3" in str(fails(spec(bad)))
    wrong = tmp_path / "w.json"
    wrong.write_text('[{"body": "a"}]')
    assert "record 1" in str(fails(spec(wrong)))


def test_parquet_missing_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), f)
    err = fails(spec(f))
    assert "d.parquet row 1" in str(err) and "'content'" in str(err)
    g = tmp_path / "g.parquet"
    g.write_bytes(b"not parquet at all")
    assert "not a readable parquet file" in str(fails(spec(g)))


def test_txt_is_refused_for_sft(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Some text.\n")
    check_data(spec(f))
    assert "--task sft needs records" in str(fails(spec(f, "sft")))


def test_folders_empty_and_mixed(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no data files" in str(fails(spec(tmp_path / "empty")))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    jsonl(mixed / "a.jsonl", [{"text": "a"}])
    (mixed / "b.csv").write_text("text\nb\n")
    assert "mixes formats" in str(fails(spec(mixed)))
    good = tmp_path / "good"
    good.mkdir()
    jsonl(good / "a.jsonl", [{"text": "a"}])
    jsonl(good / "b.jsonl", [{"body": "b"}])
    err = fails(spec(good))
    assert "b.jsonl line 1" in str(err)


def test_not_utf8_is_refused(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    assert "not UTF-8" in str(fails(spec(f)))


def test_only_a_sample_is_read(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "a"}] * 150 + ["{broken"])
    check_data(spec(f))  # line 151 is past the sample; `prepare` meets it


def test_hub_names_are_not_checked_locally():
    check_data(spec("someorg/some_dataset"))


def test_check_data_imports_no_heavy_library(tmp_path):
    jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}])
    (tmp_path / "d.csv").write_text("text\nx\n")
    code = f"""
import sys
from launcher.config.spec import validate
from launcher.data.check import check_data
check_data(validate({{"task": "pretrain"}}))
check_data(validate({{"task": "sft"}}), tokenizer_has_chat_template=True)
check_data(validate({{"task": "sft", "data": {{"path": {str(tmp_path / "chat.jsonl")!r}}}}}))
check_data(validate({{"data": {{"path": {str(tmp_path / "d.csv")!r}}}}}))
heavy = [m for m in ("torch", "transformers", "datasets", "deepspeed", "peft") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
