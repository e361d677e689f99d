"""The cheap first look at a run's data: the first records of each file, checked for what training
needs (fields, types, one SFT layout), each problem one UserError naming the file, line and fix.
Stdlib only at import (pyarrow inside, for parquet): the login node and pre-flight run it."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from launcher import yamlio
from launcher.config.spec import PREFERENCE_TASKS
from launcher.data.source import data_files, open_text, source_spec
from launcher.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

SAMPLE_RECORDS = 100  # records check_data reads per file (every record for a preference task: below)


def check_data(spec: RunSpec, tokenizer_has_chat_template: bool | None = None) -> None:
    """Look at the first records of each data file and raise UserError on the first problem found.

    Needs no torch, transformers or datasets (pyarrow only for parquet). Pass whether the model's
    tokenizer has a chat template to check chat-shaped SFT data against it; None skips that check.
    """
    if spec.data.sources:  # a mixture: each source as if it were the run's only data
        for k in range(len(spec.data.sources)):
            check_data(source_spec(spec, k), tokenizer_has_chat_template)
        return
    fmt, files = data_files(spec)
    if fmt == "hub":
        return  # nothing on this machine to look at; the load in `prepare` reports problems
    shape: list[str | None] = [None]  # the SFT shape the first record fixed, shared across files
    # A preference set is checked whole: a pair with chosen == rejected or an empty completion anywhere would
    # otherwise surface on a rank, mid-run, as a loss of nan or a TRL error without a line number.
    limit = None if spec.task in PREFERENCE_TASKS else SAMPLE_RECORDS
    for path in files:
        try:
            if path.stat().st_size == 0:
                raise UserError(f"data file {path} is empty; give it records or point data.path elsewhere",
                                field="data.path")
            n, where = 0, "the first record"
            for where, record in sample_records(path, fmt, spec, limit):
                _check_record(spec, path, where, record, shape, tokenizer_has_chat_template)
                n += 1
            if path.suffix.lower() == ".gz":
                _check_gzip_whole(path)
        except UnicodeDecodeError as exc:
            raise UserError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            f"re-encode it as UTF-8", field="data.path") from None
        except (EOFError, zlib.error) as exc:  # gzip cut off (EOFError: click would call it Ctrl-C) or damaged
            after = "" if n == 0 else f" after {where}"
            raise UserError(f"data file {path} is a cut-off or damaged gzip file ({exc}){after}; compress it "
                            f"again", field="data.path") from None
        except csv.Error as exc:  # a field over csv's limit (128 KiB), a NUL byte, ...
            raise UserError(f"data file {path} {_csv_where(where, n)}: not readable as CSV ({exc}); "
                            f"split long text into jsonl records", field="data.path") from None
        except OSError as exc:  # gzip.BadGzipFile and read errors
            raise UserError(f"data file {path}: cannot be read ({exc.strerror or exc}); a .gz name needs gzip "
                            f"content", field="data.path") from None
        if n == 0:
            raise UserError(f"data file {path} is empty (no records); give it records or point data.path elsewhere",
                            field="data.path")


GZIP_CHECK_LIMIT = 4 << 30  # compressed bytes read through to find a cut-off end (about 1 s per 300 MB)


def _check_gzip_whole(path: Path) -> None:
    """Read a .gz to its end: a cut-off file decompresses fine until its last block, so the sample alone
    does not find it, and the tokenizer would fail on it later (EOFError)."""
    import gzip

    if path.stat().st_size > GZIP_CHECK_LIMIT:
        return
    lines = 0
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                lines += chunk.count(b"\n")
    except (EOFError, zlib.error) as exc:
        raise UserError(f"data file {path} is a cut-off or damaged gzip file ({exc}) after line {lines}; compress "
                        f"it again", field="data.path") from None


def _csv_where(where: str, n: int) -> str:
    return f"after {where}" if n else "in its first records"


def sample_records(path: Path, fmt: str, spec: RunSpec, limit: int | None = SAMPLE_RECORDS) -> Iterator[tuple[str, Any]]:
    """(where, record) for the first `limit` records (None: all); `where` is 'line N' or 'record N'."""
    big = 1 << 62
    limit = big if limit is None else limit
    if fmt == "txt":
        if spec.task in PREFERENCE_TASKS:
            raise UserError(f"data file {path}: --task {spec.task} needs records with "
                            f"{spec.data.prompt_field!r}, {spec.data.chosen_field!r} and {spec.data.rejected_field!r} "
                            f"fields, and a .txt file holds plain text; use jsonl records", field="data.path")
        if spec.task == "sft":
            raise UserError(f"data file {path}: --task sft needs records with prompt/response or messages fields, "
                            f"and a .txt file holds plain text; use jsonl records or --task pretrain",
                            field="task")
        with open_text(path) as f:
            head = f.read(1 << 16)
        if head.strip():
            yield "text", {spec.data.text_field: head}
        return
    if fmt == "csv":
        with open_text(path) as f:
            reader = csv.DictReader(f)
            i = 0
            while i < limit:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise UserError(f"data file {path} line {reader.line_num}: not readable as CSV ({exc}); split "
                                    f"long text into jsonl records", field="data.path") from None
                yield f"line {reader.line_num}", row
                i += 1
        return
    if fmt == "parquet":
        yield from _sample_parquet(path, limit)
        return
    with open_text(path) as f:
        first = ""
        for ch in iter(lambda: f.read(1), ""):
            if not ch.isspace():
                first = ch
                break
    if fmt == "json" and first == "[":
        yield from _sample_json_array(path, limit)
    elif fmt == "json" and first == "{" and not _first_line_is_object(path):
        yield from _sample_json_columns(path, limit)
    else:
        yield from _sample_jsonl(path, limit)


def _sample_jsonl(path: Path, limit: int = SAMPLE_RECORDS) -> Iterator[tuple[str, Any]]:
    n = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"data file {path} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                f"each line must be one JSON object", field="data.path") from None
            except RecursionError:
                raise UserError(f"data file {path} line {lineno}: JSON nested too deeply to read; each line must "
                                f"be one flat JSON object of text fields", field="data.path") from None
            yield f"line {lineno}", record
            n += 1
            if n >= limit:
                return


def _first_line_is_object(path: Path) -> bool:
    with open_text(path) as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except (json.JSONDecodeError, RecursionError):
                    return False
    return False


def _sample_json_array(path: Path, limit: int = SAMPLE_RECORDS, chunk: int = 4 << 20) -> Iterator[tuple[str, Any]]:
    if limit > SAMPLE_RECORDS:
        chunk = -1  # every record: the whole file
    with open_text(path) as f:
        text = f.read(chunk)
        complete = len(f.read(1)) == 0
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    for n in range(limit):
        while pos < len(text) and (text[pos].isspace() or (n and text[pos] == ",")):
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, end = dec.raw_decode(text, pos)
        except RecursionError:
            raise UserError(f"data file {path} line {text.count(chr(10), 0, pos) + 1}: JSON nested too deeply to "
                            f"read; records must be flat objects of text fields", field="data.path") from None
        except json.JSONDecodeError as exc:
            if not complete and exc.pos >= len(text) - 1:
                return  # the sample window ends inside a record
            raise UserError(f"data file {path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                            field="data.path") from None
        yield f"record {n + 1} (line {text.count(chr(10), 0, pos) + 1})", record
        pos = end


def _sample_json_columns(path: Path, limit: int = SAMPLE_RECORDS) -> Iterator[tuple[str, Any]]:
    try:
        with open_text(path) as f:
            obj = json.load(f)
    except RecursionError:
        raise UserError(f"data file {path}: JSON nested too deeply to read; records must be flat objects of text "
                        f"fields", field="data.path") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"data file {path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                        field="data.path") from None
    if not (isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values())):
        raise UserError(f"data file {path} holds a single JSON object; write records as a JSON list of objects "
                        f"or one object per line (.jsonl)", field="data.path")
    n = min(limit, *(len(v) for v in obj.values()))
    for i in range(n):
        yield f"record {i + 1}", {k: v[i] for k, v in obj.items()}


def _sample_parquet(path: Path, limit: int = SAMPLE_RECORDS) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"data file {path} is not a readable parquet file ({exc}); rewrite it or use jsonl",
                        field="data.path") from None
    if pf.metadata.num_rows == 0:
        return
    i = 0
    for batch in pf.iter_batches(batch_size=min(limit, 1 << 16)):
        for row in batch.to_pylist():
            if i >= limit:
                return
            i += 1
            yield f"row {i}", row


def _fields_found(record: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in record) or "none"


def sft_shape(record: dict[str, Any], spec: RunSpec) -> str | None:
    """Which SFT layout a record has: 'chat', 'prompt', 'alpaca', or None."""
    d = spec.data
    if d.messages_field in record:
        return "chat"
    if d.prompt_field in record and d.response_field in record:
        return "prompt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _check_record(spec: RunSpec, path: Path, where: str, record: Any, shape: list[str | None],
                  has_template: bool | None) -> None:
    at = f"data file {path} {where}"
    if not isinstance(record, dict):
        raise UserError(f"{at}: expected a JSON object with fields, got {type(record).__name__}", field="data.path")
    d = spec.data
    if spec.task in PREFERENCE_TASKS:
        _check_preference(spec, at, record, shape, has_template)
        return
    if spec.task == "pretrain":
        if d.text_field not in record:
            raise UserError(f"{at}: no field {d.text_field!r} (data.text_field, the text to pretrain on); fields "
                            f"found: {_fields_found(record)}; set --set data.text_field=NAME", field="data.text_field")
        _need_str(at, record, d.text_field, "data.text_field")
        return
    kind = sft_shape(record, spec)
    if kind is None:
        if d.prompt_field in record or d.response_field in record:
            have, miss, fld = ((d.prompt_field, d.response_field, "data.response_field")
                               if d.prompt_field in record else (d.response_field, d.prompt_field, "data.prompt_field"))
            raise UserError(f"{at}: field {have!r} has no partner field {miss!r} ({fld}); fields found: "
                            f"{_fields_found(record)}; set --set {fld}=NAME", field=fld)
        raise UserError(f"{at}: --task sft needs a {d.messages_field!r} field (data.messages_field), "
                        f"{d.prompt_field!r} and {d.response_field!r} fields (data.prompt_field, "
                        f"data.response_field), or 'instruction' and 'output'; fields found: "
                        f"{_fields_found(record)}", field="data.prompt_field")
    _same_layout(at, shape, kind)
    if kind == "prompt":
        _need_str(at, record, d.prompt_field, "data.prompt_field")
        _need_str(at, record, d.response_field, "data.response_field")
    elif kind == "alpaca":
        _need_str(at, record, "instruction", None)
        _need_str(at, record, "output", None)
        if record.get("input") is not None:
            _need_str(at, record, "input", None)
    else:
        _check_messages(at, record[d.messages_field], d.messages_field, has_template, spec)


def _same_layout(at: str, shape: list[str | None], layout: str) -> None:
    """The first record fixes the data set's layout (`shape`, shared across files); every other must match."""
    if shape[0] is None:
        shape[0] = layout
    elif shape[0] != layout:
        raise UserError(f"{at}: this record is {layout}-shaped but the first record is {shape[0]}-shaped; "
                        f"use one layout for the whole data set", field="data.path")


def _need_str(at: str, record: dict[str, Any], key: str, field: str | None) -> None:
    v = record[key]
    if not isinstance(v, str):
        got = "null" if v is None else type(v).__name__
        raise UserError(f"{at}: field {key!r} is {got}, expected a string", field=field)


def _check_messages(at: str, msgs: Any, key: str, has_template: bool | None, spec: RunSpec) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{at}: field {key!r} must be a non-empty list of {{role, content}} objects",
                        field="data.messages_field")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            found = _fields_found(m) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"{at}: {key}[{i}] needs a string 'role' and a string 'content' (found: {found})",
                            field="data.messages_field")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{at}: {key!r} has no 'assistant' message, so there is nothing to learn; "
                        f"each conversation needs at least one", field="data.messages_field")
    if has_template is False:
        raise UserError(f"{at}: chat {key!r} need the tokenizer's chat template, and the tokenizer of model "
                        f"{spec.model.name!r} has none; use a model whose tokenizer has one (an instruct/chat "
                        f"variant) or write the data as prompt/response fields", field="data.messages_field")


def preference_shape(record: dict[str, Any], spec: RunSpec) -> str:
    """'paired' ({prompt, chosen, rejected}) or 'unpaired' ({prompt, completion, label}: KTO only; KTO also takes
    pairs, each split into a desirable and an undesirable example)."""
    d = spec.data
    if spec.task == "kto" and d.completion_field in record and d.chosen_field not in record:
        return "unpaired"
    return "paired"


def _check_preference(spec: RunSpec, at: str, record: dict[str, Any], shape: list[str | None],
                      has_template: bool | None) -> None:
    """One preference record: its fields there, each text a non-empty string or a chat messages list (one kind
    for the whole set), chosen and rejected different."""
    d = spec.data
    kind = preference_shape(record, spec)
    if kind == "unpaired":
        need = [(d.prompt_field, "data.prompt_field"), (d.completion_field, "data.completion_field"),
                (d.label_field, "data.label_field")]
    else:
        need = [(d.prompt_field, "data.prompt_field"), (d.chosen_field, "data.chosen_field"),
                (d.rejected_field, "data.rejected_field")]
    for key, fld in need:
        if key not in record:
            wanted = ", ".join(repr(k) for k, _ in need)
            alt = (f" (or {d.prompt_field!r}, {d.completion_field!r}, {d.label_field!r})" if spec.task == "kto"
                   else "")
            raise UserError(f"{at}: no field {key!r} ({fld}); task {spec.task} needs {wanted}{alt}; fields found: "
                            f"{_fields_found(record)}; rename it in the data or set --set {fld}=NAME", field=fld)
    texts = [(key, fld) for key, fld in need if fld != "data.label_field"]
    layouts = set()
    for key, fld in texts:
        v = record[key]
        if isinstance(v, str):
            layouts.add("text")
            if not v.strip() and fld != "data.prompt_field":
                raise UserError(f"{at}: field {key!r} ({fld}) is empty; every response needs text (drop the "
                                f"record or fill it in)", field=fld)
        elif isinstance(v, list):
            layouts.add("chat")
            _check_turns(at, v, key, fld, has_template, spec, response=fld != "data.prompt_field")
        else:
            got = "null" if v is None else type(v).__name__
            raise UserError(f"{at}: field {key!r} ({fld}) is {got}; expected a string or a list of "
                            f"{{role, content}} messages", field=fld)
    if len(layouts) > 1:
        raise UserError(f"{at}: some of {', '.join(repr(k) for k, _ in texts)} are strings and some chat messages; "
                        f"write all of a record's fields one way", field=texts[0][1])
    _same_layout(at, shape, f"{kind}-{layouts.pop()}")
    if kind == "unpaired":
        if not isinstance(record[d.label_field], bool):
            raise UserError(f"{at}: field {d.label_field!r} (data.label_field) is {yamlio.quote(record[d.label_field])}; "
                            f"expected true (desirable) or false (undesirable)", field="data.label_field")
    elif record[d.chosen_field] == record[d.rejected_field]:
        raise UserError(f"{at}: {d.chosen_field!r} equals {d.rejected_field!r}, so the pair prefers nothing; drop "
                        f"the record or fix one of them", field="data.chosen_field")


def _check_turns(at: str, msgs: list[Any], key: str, fld: str, has_template: bool | None, spec: RunSpec, *,
                 response: bool) -> None:
    if not msgs:
        raise UserError(f"{at}: field {key!r} ({fld}) is an empty list; give it {{role, content}} messages",
                        field=fld)
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            found = _fields_found(m) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"{at}: {key}[{i}] needs a string 'role' and a string 'content' (found: {found})",
                            field=fld)
    if response and not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise UserError(f"{at}: field {key!r} ({fld}) has no non-empty 'assistant' message; a response is the "
                        f"assistant's turn", field=fld)
    if has_template is False:
        raise UserError(f"{at}: chat messages in {key!r} need the tokenizer's chat template, and the tokenizer of "
                        f"model {spec.model.name!r} has none; use a model whose tokenizer has one (an instruct/chat "
                        f"variant) or write the fields as strings", field=fld)
