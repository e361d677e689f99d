"""The data pipeline: check, read, tokenize, block or pack, and cache the training data.

`check_data` is the cheap first look (stdlib only, no torch/transformers/datasets). `prepare` builds
the tokenized dataset once, in the launching process or the Slurm prep job, into a cache keyed by
what shapes the tokens; ranks only `load_prepared` it. The collators turn rows into batches.

Shapes of the prepared rows:
- pretrain: `input_ids`, exactly `seq_len` tokens (documents joined with EOS, cut into blocks; the
  tail shorter than a block is dropped). The collator adds `labels = input_ids`.
- sft: `input_ids`, `labels` (-100 on prompt tokens), at most `seq_len` tokens; the collator pads.
- sft with packing: examples packed in order into rows of at most `seq_len` tokens, with
  `position_ids` restarting at 0 per example and no attention mask; with `use_cache=False`
  transformers derives per-example attention from the position ids (see tests/integration/test_packing.py).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from launcher import assets
from launcher.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from launcher.config.spec import RunSpec

PIPELINE_VERSION = 1  # bump when a change here changes the tokens a given input produces
SAMPLE_RECORDS = 100  # records check_data reads per file
IGNORE_INDEX = -100
_EXT_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".csv": "csv", ".txt": "txt"}
_TOKENIZER_FILES = re.compile(r"(token|vocab|merges|chat_template|spiece|\.model$)", re.I)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


# =========================================================================== where the data is

def data_files(spec: RunSpec) -> tuple[str, list[Path]]:
    """(format, files) of the run's data; ("hub", []) for a datasets hub name. Stdlib only."""
    d = spec.data
    if d.path is None:
        name = "sft.jsonl" if spec.task == "sft" else "corpus.txt"
        return _EXT_FORMAT[Path(name).suffix], [assets.tiny_dir() / name]
    if d.format == "hub":
        return "hub", []
    p = Path(d.path).expanduser()
    if p.is_file():
        fmt = d.format if d.format != "auto" else _format_of(p)
        if fmt is None:
            raise UserError(f"data file {p}: cannot tell its format from the extension {''.join(p.suffixes)!r}; "
                            f"use .jsonl, .json, .parquet, .csv or .txt, or set data.format", field="data.format")
        return fmt, [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _format_of(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if d.format != "auto":
            files = [f for f in files if datasets_builder(_format_of(f)) == datasets_builder(d.format)]
        if not files:
            want = f"{d.format} files" if d.format != "auto" else "data files (.jsonl, .json, .parquet, .csv, .txt)"
            raise UserError(f"data folder {p} has no {want}; put the data there or point data.path at a file",
                            field="data.path")
        kinds = sorted({datasets_builder(_format_of(f)) for f in files})
        if len(kinds) > 1:
            raise UserError(f"data folder {p} mixes formats ({', '.join(kinds)}); keep one format per folder or "
                            f"choose one with data.format", field="data.format")
        return d.format if d.format != "auto" else _format_of(files[0]), files  # type: ignore[return-value]
    looks_local = d.path.startswith((".", "/", "~")) or Path(d.path).suffix.lower() in (*_EXT_FORMAT, ".gz")
    if d.format != "auto" or looks_local or not _HUB_NAME.fullmatch(d.path):
        raise UserError(f"data file {d.path} does not exist (working directory {Path.cwd()}); fix data.path "
                        f"(--data) or drop it to train on the embedded corpus", field="data.path")
    return "hub", []


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _EXT_FORMAT.get(suffixes[-1]) if suffixes else None


def datasets_builder(fmt: str | None) -> str | None:
    """The datasets builder that reads a format (json reads both .json and .jsonl)."""
    return {"jsonl": "json", "txt": "text"}.get(fmt, fmt) if fmt else None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


# =========================================================================== cheap checks

def check_data(spec: RunSpec, tokenizer_has_chat_template: bool | None = None) -> None:
    """Look at the first records of each data file and raise UserError on the first problem found.

    Needs no torch, transformers or datasets (pyarrow only for parquet). Pass whether the model's
    tokenizer has a chat template to check chat-shaped SFT data against it; None skips that check.
    """
    fmt, files = data_files(spec)
    if fmt == "hub":
        return  # nothing on this machine to look at; the load in `prepare` reports problems
    shape: list[str | None] = [None]  # the SFT shape the first record fixed, shared across files
    for path in files:
        try:
            if path.stat().st_size == 0:
                raise UserError(f"data file {path} is empty; give it records or point data.path elsewhere",
                                field="data.path")
            n = 0
            for where, record in _sample(path, fmt, spec):
                _check_record(spec, path, where, record, shape, tokenizer_has_chat_template)
                n += 1
        except UnicodeDecodeError as exc:
            raise UserError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            f"re-encode it as UTF-8", field="data.path") from None
        if n == 0:
            raise UserError(f"data file {path} is empty (no records); give it records or point data.path elsewhere",
                            field="data.path")


def _sample(path: Path, fmt: str, spec: RunSpec) -> Iterator[tuple[str, Any]]:
    """(where, record) for the first SAMPLE_RECORDS records; `where` is 'line N' or 'record N'."""
    if fmt == "txt":
        if spec.task == "sft":
            raise UserError(f"data file {path}: --task sft needs records with prompt/response or messages fields, "
                            f"and a .txt file holds plain text; use jsonl records or --task pretrain",
                            field="task")
        with _open_text(path) as f:
            head = f.read(1 << 16)
        if head.strip():
            yield "text", {spec.data.text_field: head}
        return
    if fmt == "csv":
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader):
                if i >= SAMPLE_RECORDS:
                    break
                yield f"line {reader.line_num}", row
        return
    if fmt == "parquet":
        yield from _sample_parquet(path)
        return
    with _open_text(path) as f:
        first = ""
        for ch in iter(lambda: f.read(1), ""):
            if not ch.isspace():
                first = ch
                break
    if fmt == "json" and first == "[":
        yield from _sample_json_array(path)
    elif fmt == "json" and first == "{" and not _first_line_is_object(path):
        yield from _sample_json_columns(path)
    else:
        yield from _sample_jsonl(path)


def _sample_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    n = 0
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"data file {path} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                f"each line must be one JSON object", field="data.path") from None
            yield f"line {lineno}", record
            n += 1
            if n >= SAMPLE_RECORDS:
                return


def _first_line_is_object(path: Path) -> bool:
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def _sample_json_array(path: Path, chunk: int = 4 << 20) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read(chunk)
        complete = len(f.read(1)) == 0
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    for n in range(SAMPLE_RECORDS):
        while pos < len(text) and (text[pos].isspace() or (n and text[pos] == ",")):
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if not complete and exc.pos >= len(text) - 1:
                return  # the sample window ends inside a record
            raise UserError(f"data file {path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                            field="data.path") from None
        yield f"record {n + 1} (line {text.count(chr(10), 0, pos) + 1})", record
        pos = end


def _sample_json_columns(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"data file {path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                        field="data.path") from None
    if not (isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values())):
        raise UserError(f"data file {path} holds a single JSON object; write records as a JSON list of objects "
                        f"or one object per line (.jsonl)", field="data.path")
    n = min(SAMPLE_RECORDS, *(len(v) for v in obj.values()))
    for i in range(n):
        yield f"record {i + 1}", {k: v[i] for k, v in obj.items()}


def _sample_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"data file {path} is not a readable parquet file ({exc}); rewrite it or use jsonl",
                        field="data.path") from None
    if pf.metadata.num_rows == 0:
        return
    batch = next(pf.iter_batches(batch_size=SAMPLE_RECORDS))
    for i, row in enumerate(batch.to_pylist()):
        yield f"row {i + 1}", row


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
    if shape[0] is None:
        shape[0] = kind
    elif shape[0] != kind:
        raise UserError(f"{at}: this record is {kind}-shaped but the first record is {shape[0]}-shaped; "
                        f"use one layout for the whole data set", field="data.path")
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


# =========================================================================== cache key

def cache_dir(spec: RunSpec) -> Path:
    """Root of the tokenized-data cache: data.cache_dir, else $LAUNCHER_CACHE/data, else ~/.cache/launcher/data."""
    if spec.data.cache_dir:
        return Path(spec.data.cache_dir).expanduser()
    root = os.environ.get("LAUNCHER_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "launcher") / "data"


def tokenizer_source(spec: RunSpec) -> str:
    """Where the run's tokenizer loads from: the embedded tiny folder for model 'tiny', else model.name."""
    return str(assets.tiny_dir()) if spec.model.name == "tiny" else spec.model.name


def _tokenizer_fingerprint(tokenizer_dir: str | os.PathLike[str], revision: str | None) -> dict[str, Any]:
    p = Path(tokenizer_dir).expanduser()
    if not p.is_dir():  # a hub id: its files are not ours to read offline; name and revision stand in
        return {"hub": str(tokenizer_dir), "revision": revision}
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.is_file() and _TOKENIZER_FILES.search(f.name))
    extra = p / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(f for f in extra.iterdir() if f.is_file())
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return {"files": [f.relative_to(p).as_posix() for f in files], "sha256": h.hexdigest()}


def _key_inputs(spec: RunSpec, tokenizer_dir: str | os.PathLike[str]) -> dict[str, Any]:
    d = spec.data
    fmt, files = data_files(spec)
    data: dict[str, Any] = {"format": fmt}
    if fmt == "hub":
        data.update(name=d.path, split=d.split)
    else:
        data["files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    shaping: dict[str, Any] = {"task": spec.task, "seq_len": d.seq_len}
    if spec.task == "pretrain":
        shaping["text_field"] = d.text_field
    else:
        shaping.update(packing=d.packing, prompt_field=d.prompt_field, response_field=d.response_field,
                       messages_field=d.messages_field)
    if d.eval_fraction > 0:  # the split depends on the seed only when there is one
        shaping.update(eval_fraction=d.eval_fraction, seed=spec.optim.seed)
    return {"version": PIPELINE_VERSION, "data": data, "shaping": shaping,
            "tokenizer": _tokenizer_fingerprint(tokenizer_dir, spec.model.revision)}


def cache_key(spec: RunSpec, tokenizer_dir: str | os.PathLike[str] | None = None) -> str:
    """Name of the prepared data's cache folder: '<task>-<seq_len>-<hash>' of the data files
    (path, size, mtime), the tokenizer files and the fields that shape tokens; never lr or cluster."""
    inputs = _key_inputs(spec, tokenizer_dir if tokenizer_dir is not None else tokenizer_source(spec))
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return f"{spec.task}-{spec.data.seq_len}-{digest}"


def _tok_dir(spec: RunSpec, tokenizer: Any) -> str:
    if tokenizer is None:
        return tokenizer_source(spec)
    if isinstance(tokenizer, (str, os.PathLike)):
        return str(tokenizer)
    return str(getattr(tokenizer, "name_or_path", "") or tokenizer_source(spec))


def prepared_path(spec: RunSpec, tokenizer: Any = None) -> Path:
    """Where `prepare` puts (or put) this run's tokenized data."""
    return cache_dir(spec) / cache_key(spec, _tok_dir(spec, tokenizer))


# =========================================================================== prepare / load

def load_tokenizer(spec: RunSpec) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_source(spec), revision=spec.model.revision,
                                         trust_remote_code=spec.model.trust_remote_code)


def prepare(spec: RunSpec, tokenizer: Any = None) -> Path:
    """Build the tokenized data into the cache unless it is there; return its folder.

    `tokenizer`: a loaded tokenizer, a tokenizer folder, or None for the run's model. Atomic: built
    in a temporary folder beside the cache entry and renamed into place.
    """
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tok_dir = _tok_dir(spec, tokenizer)
        if tokenizer is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tokenizer = load_tokenizer(spec)
    else:
        tok_dir = _tok_dir(spec, tokenizer)
    final = cache_dir(spec) / cache_key(spec, tok_dir)
    if (final / "meta.json").is_file():
        return final
    check_data(spec, tokenizer_has_chat_template=bool(getattr(tokenizer, "chat_template", None)))
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of model {spec.model.name!r} has no eos_token, which separates documents "
                        f"and ends responses; use a tokenizer that has one", field="model.name")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        splits, meta = _build(spec, tokenizer, tmp / "hf")
        from datasets import DatasetDict

        out = tmp / "dataset"
        DatasetDict(splits).save_to_disk(str(out))
        meta.update(key=final.name, inputs=_key_inputs(spec, tok_dir))
        (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.is_dir() and not (final / "meta.json").is_file():
            shutil.rmtree(final)  # a half-removed entry: meta.json is written last, so it is incomplete
        try:
            os.rename(out, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def require_prepared(spec: RunSpec, tokenizer: Any = None) -> Path:
    """The prepared data's folder; UserError (exit 2) naming it and the fix when it is not complete.

    Ranks call this first: they only read the cache, so a missing entry stops every rank at once,
    before any imports the heavy libraries or joins the process group (no rank tokenizes while the
    others wait in a collective).
    """
    path = prepared_path(spec, tokenizer)
    if not (path / "meta.json").is_file():
        spec_file = Path(spec.output.dir) / "spec.yaml"
        target = str(spec_file) if spec_file.is_file() else "SPEC"
        raise UserError(f"the tokenized data for this run is not in the cache: {path} is missing or incomplete "
                        f"(no meta.json). Ranks only read the cache; run `launcher prepare SPEC` first "
                        f"(`launcher prepare {target}`, where the ranks see the same cache: data.cache_dir or "
                        f"$LAUNCHER_CACHE), or submit with `launcher slurm --submit` without --no-prep, which "
                        f"queues a preparation job before training", field="data.path")
    return path


def load_prepared(spec: RunSpec, tokenizer: Any = None, split: str = "train") -> Dataset:
    """The prepared split ('train' or 'eval'); UserError with the fix when it has not been prepared."""
    path = require_prepared(spec, tokenizer)
    from datasets import load_from_disk

    dd = load_from_disk(str(path))
    if split not in dd:
        raise UserError(f"the prepared data has no {split!r} split (has: {', '.join(dd)}); "
                        f"set data.eval_fraction above 0 for an eval split", field="data.eval_fraction")
    return dd[split]


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts `prepare` recorded: rows and tokens per split, examples dropped or truncated."""
    return json.loads((Path(path) / "meta.json").read_text())


# =========================================================================== building

def _num_proc(spec: RunSpec, files: list[Path], rows: int) -> int | None:
    if spec.data.num_proc:
        return spec.data.num_proc if spec.data.num_proc > 1 else None
    size = sum(f.stat().st_size for f in files)
    if size > (64 << 20) or rows > 200_000:  # below this, worker start-up costs more than it saves
        return min(8, os.cpu_count() or 1) or None
    return None


def _load_raw(spec: RunSpec, hf_cache: Path) -> tuple[Any, list[Path]]:
    import datasets

    fmt, files = data_files(spec)
    kw: dict[str, Any] = {"cache_dir": str(hf_cache)}
    try:
        if fmt == "hub":
            from launcher.submit.stage import staged_dataset

            # staged by `launcher stage` into the shared hub cache: read that snapshot folder, which needs no
            # hub (the jobs run with HF_HUB_OFFLINE=1); otherwise the datasets library fetches it
            staged = staged_dataset(spec)
            ds = datasets.load_dataset(str(staged) if staged else spec.data.path, split=spec.data.split, **kw)
        else:
            builder = datasets_builder(fmt)
            if builder == "text":
                kw.update(sample_by="paragraph")  # a blank line separates documents
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kw)
    except (datasets.exceptions.DatasetGenerationError, datasets.exceptions.DatasetNotFoundError) as exc:
        cause = exc.__cause__ or exc
        where = spec.data.path if fmt == "hub" else ", ".join(map(str, files))
        raise UserError(f"cannot read data {where}: {type(cause).__name__}: {cause}; check that every record has "
                        f"the same fields and types", field="data.path") from None
    if fmt == "txt":
        ds = ds.rename_column("text", spec.data.text_field) if spec.data.text_field != "text" else ds
    return ds, files


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text on its own (a BOS for Llama-style tokenizers)."""
    with_ = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_) - len(without) + 1):
        if with_[i: i + len(without)] == without:
            return with_[:i]
    return []


def _build(spec: RunSpec, tokenizer: Any, hf_cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, files = _load_raw(spec, hf_cache)
    if raw.num_rows == 0:
        raise UserError(f"data {spec.data.path or files[0]} has no records", field="data.path")
    nproc = _num_proc(spec, files, raw.num_rows)
    if spec.task == "pretrain":
        return _build_pretrain(spec, tokenizer, raw, nproc)
    return _build_sft(spec, tokenizer, raw, nproc)


class _PretrainTokenize:
    def __init__(self, tokenizer: Any, field: str):
        self.tok, self.field = tokenizer, field
        self.prefix, self.eos = _special_prefix(tokenizer), tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[list[int]]]:
        texts = batch[self.field]
        for t, i in zip(texts, idx):
            if not isinstance(t, str):
                raise UserError(f"data row {i + 1}: field {self.field!r} is "
                                f"{'null' if t is None else type(t).__name__}, expected a string",
                                field="data.text_field")
        keep = [t.strip() for t in texts if t.strip()]
        ids = self.tok(keep, add_special_tokens=False, verbose=False)["input_ids"] if keep else []
        return {"input_ids": [self.prefix + x + [self.eos] for x in ids]}


def _build_pretrain(spec: RunSpec, tokenizer: Any, raw: Any,
                    nproc: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    field = spec.data.text_field
    if field not in raw.column_names:
        raise UserError(f"data has no column {field!r} (data.text_field); columns found: "
                        f"{', '.join(raw.column_names)}", field="data.text_field")
    docs = raw.map(_PretrainTokenize(tokenizer, field), batched=True, with_indices=True, num_proc=nproc,
                   remove_columns=raw.column_names, desc="tokenizing", new_fingerprint="tokenize",
                   load_from_cache_file=False)
    flat = docs.with_format("arrow")[:].column("input_ids").combine_chunks().flatten()
    flat = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int32)
    seq = spec.data.seq_len
    n = len(flat) // seq
    need = 2 if spec.data.eval_fraction > 0 else 1
    if n < need:
        raise UserError(f"the data holds {len(flat)} tokens, fewer than {need} block(s) of data.seq_len={seq}; "
                        f"give more text or lower --seq-len", field="data.seq_len")
    blocks = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * seq),
                                      pa.array(flat[: n * seq]))
    ds = Dataset(pa.table({"input_ids": blocks}))
    splits = _split(spec, ds)
    meta = {"task": "pretrain", "documents": docs.num_rows, "tokens": int(len(flat)),
            "tokens_dropped_tail": int(len(flat) - n * seq),
            "splits": {k: {"rows": v.num_rows, "tokens": v.num_rows * seq} for k, v in splits.items()}}
    return splits, meta


def _split(spec: RunSpec, ds: Any) -> dict[str, Any]:
    frac = spec.data.eval_fraction
    if frac <= 0:
        return {"train": ds}
    n_eval = max(1, round(ds.num_rows * frac))
    if n_eval >= ds.num_rows:
        raise UserError(f"data.eval_fraction={frac} of {ds.num_rows} rows leaves nothing to train on; "
                        f"lower it or give more data", field="data.eval_fraction")
    parts = ds.train_test_split(test_size=n_eval, shuffle=True, seed=spec.optim.seed)
    return {"train": parts["train"].flatten_indices(), "eval": parts["test"].flatten_indices()}


class _SFTTokenize:
    """Rows of one SFT layout -> input_ids, labels (-100 outside responses), truncated to seq_len."""

    def __init__(self, tokenizer: Any, spec: RunSpec, shape: str):
        d = spec.data
        self.tok, self.shape, self.seq_len = tokenizer, shape, d.seq_len
        self.prompt_f, self.response_f, self.messages_f = d.prompt_field, d.response_field, d.messages_field
        self.prefix, self.eos = _special_prefix(tokenizer), tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "truncated": [], "learnable": []}
        for j, i in enumerate(idx):
            row = {k: v[j] for k, v in batch.items()}
            try:
                ids, labels = self._chat(row) if self.shape == "chat" else self._plain(row)
            except (TypeError, KeyError, AttributeError) as exc:
                raise UserError(f"data row {i + 1}: cannot read it as {self.shape} SFT data ({exc}); "
                                f"run `launcher prepare` after fixing that record", field="data.path") from None
            out["truncated"].append(len(ids) > self.seq_len)
            out["input_ids"].append(ids[: self.seq_len])
            out["labels"].append(labels[: self.seq_len])
            # The first token's label is never used (nothing precedes it): a response cut away entirely
            # leaves nothing to learn from.
            out["learnable"].append(any(x != IGNORE_INDEX for x in labels[1: self.seq_len]))
        return out

    def _plain(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        if self.shape == "prompt":
            prompt, response = row[self.prompt_f], row[self.response_f]
        else:
            inp = row.get("input") or ""
            prompt = _ALPACA_PROMPT.format(instruction=row["instruction"],
                                           input_block=f"### Input:\n{inp}\n\n" if inp else "")
            response = row["output"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError("the prompt and the response must be strings")
        p = self.prefix + self.tok(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        r = self.tok(response, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos]
        return p + r, [IGNORE_INDEX] * len(p) + r

    def _chat(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        msgs = [{k: v for k, v in m.items() if v is not None} for m in row[self.messages_f]]

        def render(m: list[dict[str, Any]], gen: bool) -> str:
            return self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

        full = render(msgs, False)
        spans = []  # character spans of what the model learns: each assistant turn after its header
        for k, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            start, end = len(render(msgs[:k], True)), len(render(msgs[: k + 1], False))
            if not full.startswith(render(msgs[: k + 1], False)):
                raise UserError("the chat template renders a conversation differently from its own beginning, "
                                "so response tokens cannot be told from prompt tokens; write the data as "
                                "prompt/response fields", field="data.messages_field")
            spans.append((start, end))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
                  for t, (a, _b) in zip(ids, enc["offset_mapping"])]
        return ids, labels


def _build_sft(spec: RunSpec, tokenizer: Any, raw: Any, nproc: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    first = raw[0]
    shape = sft_shape(first, spec)
    if shape is None:
        raise UserError(f"data columns {', '.join(raw.column_names)} hold no SFT layout: need "
                        f"{spec.data.messages_field!r}, {spec.data.prompt_field!r}+{spec.data.response_field!r}, "
                        f"or 'instruction'+'output'", field="data.prompt_field")
    if shape == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"chat data ({spec.data.messages_field!r}) needs a chat template and the tokenizer of "
                        f"model {spec.model.name!r} has none; use a chat model or prompt/response fields",
                        field="data.messages_field")
    if shape == "chat" and not getattr(tokenizer, "is_fast", False):
        raise UserError("chat data needs a fast (tokenizers-backed) tokenizer to find the response tokens",
                        field="model.name")
    ex = raw.map(_SFTTokenize(tokenizer, spec, shape), batched=True, with_indices=True, num_proc=nproc,
                 remove_columns=raw.column_names, desc="tokenizing", new_fingerprint="sft-tokenize",
                 load_from_cache_file=False)
    import numpy as np

    flags = ex.with_format("numpy", columns=["truncated", "learnable"])[:]
    truncated, learnable = int(flags["truncated"].sum()), flags["learnable"].astype(bool)
    dropped = int((~learnable).sum())
    ex = ex.remove_columns(["truncated", "learnable"])
    if dropped:
        ex = ex.select(np.flatnonzero(learnable))
    if ex.num_rows == 0:
        raise UserError(f"no SFT example keeps a response token within data.seq_len={spec.data.seq_len}; "
                        f"raise --seq-len", field="data.seq_len")
    splits = _split(spec, ex)
    if spec.data.packing:
        splits = {k: pack(v, spec.data.seq_len) for k, v in splits.items()}
    meta = {"task": "sft", "layout": shape, "examples": raw.num_rows, "truncated": truncated,
            "dropped_no_response": dropped, "packing": spec.data.packing,
            "splits": {k: {"rows": v.num_rows, "tokens": _count_tokens(v)} for k, v in splits.items()}}
    return splits, meta


def _count_tokens(ds: Any) -> int:
    return int(ds.with_format("arrow")[:].column("input_ids").combine_chunks().value_lengths().to_numpy().sum())


def pack(ds: Dataset, seq_len: int) -> Dataset:
    """SFT examples (input_ids, labels) packed in order into rows of at most seq_len tokens.

    Adds `position_ids` restarting at 0 per example; the label of each example's first token is
    -100 (in a packed row it would be predicted from the previous example; unpacked it is never used).
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    table = ds.with_format("arrow")[:]
    ids_col = table.column("input_ids").combine_chunks()
    lab_col = table.column("labels").combine_chunks()
    lengths = ids_col.value_lengths().to_numpy().astype(np.int64)
    ids = np.asarray(ids_col.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
    labels = np.asarray(lab_col.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    labels[starts[lengths > 0]] = IGNORE_INDEX
    positions = (np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    # Greedy in order: a row closes when the next example does not fit. Rows are runs of examples.
    bounds, used = [0], 0
    for k, n in enumerate(lengths.tolist()):
        if used + n > seq_len and used > 0:
            bounds.append(int(starts[k]))
            used = 0
        used += n
    bounds.append(len(ids))
    offsets = pa.array(np.asarray(bounds, dtype=np.int32))

    def col(values: Any) -> Any:
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    return Dataset(pa.table({"input_ids": col(ids), "labels": col(labels), "position_ids": col(positions)}))


# =========================================================================== collators

class PretrainCollator:
    """Equal-length blocks -> input_ids and labels (the same tokens; the model shifts them)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


class PadCollator:
    """SFT examples -> right-padded to the longest in the batch; pad has attention 0 and label -100."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad, self.multiple = pad_token_id, pad_to_multiple_of

    def _padded(self, features: list[dict[str, Any]]) -> tuple[Any, Any, list[int]]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        w = max(lengths)
        if self.multiple:
            w = -(-w // self.multiple) * self.multiple
        ids = torch.full((len(features), w), self.pad, dtype=torch.long)
        labels = torch.full((len(features), w), IGNORE_INDEX, dtype=torch.long)
        for i, (f, n) in enumerate(zip(features, lengths)):
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
        return ids, labels, lengths

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels, lengths = self._padded(features)
        mask = ids.new_zeros(ids.shape)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator(PadCollator):
    """Packed SFT rows -> input_ids, labels, position_ids and NO attention_mask.

    Padding becomes one more segment (positions from 0, labels -100), so it attends only to itself.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, lengths = self._padded(features)
        pos = ids.new_zeros(ids.shape)
        for i, (f, n) in enumerate(zip(features, lengths)):
            pos[i, :n] = torch.as_tensor(f["position_ids"])
            pos[i, n:] = torch.arange(ids.shape[1] - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def make_collator(spec: RunSpec, tokenizer: Any, pad_to_multiple_of: int | None = None) -> Callable[..., Any]:
    """The Trainer's data_collator for this run's task and packing."""
    if spec.task == "pretrain":
        return PretrainCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (PackedCollator if spec.data.packing else PadCollator)(pad, pad_to_multiple_of)
