"""Tokenize and pack the training data with the datasets library, once, into the cache entry that
data/cache.py names; ranks read it back with `load_prepared`. Heavy libraries (datasets, numpy,
pyarrow, transformers) are imported inside the functions.

`prepare` runs in the launching process or the Slurm prep job, never on a rank. Shapes of the prepared rows:
- pretrain: `input_ids`, exactly `seq_len` tokens (documents joined with EOS, cut into blocks; the
  tail shorter than a block is dropped). The collator adds `labels = input_ids`.
- sft: `input_ids`, `labels` (-100 on prompt tokens), at most `seq_len` tokens; the collator pads.
- dpo, orpo, simpo, rm: `prompt`, `chosen`, `rejected` (strings, or chat messages lists), renamed from the
  spec's field names and not tokenized: TRL's trainer tokenizes them on the rank (its own prompt/completion
  split and EOS handling). kto: `prompt`, `completion`, `label` (pairs are split into one desirable and one
  undesirable example each).
- sft with packing: examples packed in order into rows of at most `seq_len` tokens, with
  `position_ids` restarting at 0 per example and no attention mask; with `use_cache=False`
  transformers derives per-example attention from the position ids (see tests/integration/test_packing.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.data.cache import cache_dir, cache_key, key_inputs, require_prepared, tokenizer_dir
from launcher.config.spec import PREFERENCE_TASKS
from launcher.data.check import check_data, preference_shape, sft_shape
from launcher.data.positions import IGNORE_INDEX, restart_positions
from launcher.data.source import data_files, datasets_builder, staged_dataset
from launcher.errors import UserError
from launcher.model.load import load_tokenizer, load_tokenizer_from

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from launcher.config.spec import RunSpec

_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def prepare(spec: RunSpec, tokenizer: Any = None) -> Path:
    """Build the tokenized data into the cache unless it is there; return its folder.

    `tokenizer`: a loaded tokenizer, a tokenizer folder, or None for the run's model. Atomic: built
    in a temporary folder beside the cache entry and renamed into place.
    """
    tok_dir = tokenizer_dir(spec, tokenizer)
    final = cache_dir(spec) / cache_key(spec, tok_dir)
    if (final / "meta.json").is_file():
        return final  # checked and built from these very files and tokenizer: nothing to load (2-3 s)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer_from(tok_dir) if tokenizer is not None else load_tokenizer(spec)
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
        meta.update(key=final.name, inputs=key_inputs(spec, tok_dir))
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


def load_prepared(spec: RunSpec, tokenizer: Any = None, split: str = "train") -> Dataset:
    """The prepared split ('train' or 'eval'); UserError with the fix when it has not been prepared.

    Preference rows are read into memory: TRL's trainers tokenize them on the rank, and a dataset in memory
    keeps those results there instead of writing cache files into the shared cache entry."""
    path = require_prepared(spec, tokenizer)
    from datasets import load_from_disk

    dd = load_from_disk(str(path), keep_in_memory=spec.task in PREFERENCE_TASKS)
    if split not in dd:
        raise UserError(f"the prepared data has no {split!r} split (has: {', '.join(dd)}); "
                        f"set data.eval_fraction above 0 for an eval split", field="data.eval_fraction")
    return dd[split]


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
    if spec.task in PREFERENCE_TASKS:
        return _build_preference(spec, raw)
    return _build_sft(spec, tokenizer, raw, nproc)


def _build_preference(spec: RunSpec, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Preference records with TRL's column names (see the module's docstring); pairs split for KTO."""
    d = spec.data
    kind = preference_shape(raw[0], spec)
    names = ({d.prompt_field: "prompt", d.completion_field: "completion", d.label_field: "label"}
             if kind == "unpaired" else
             {d.prompt_field: "prompt", d.chosen_field: "chosen", d.rejected_field: "rejected"})
    missing = [k for k in names if k not in raw.column_names]
    if missing:
        raise UserError(f"data columns {', '.join(raw.column_names)} lack {', '.join(map(repr, missing))} for task "
                        f"{spec.task}; set the data.*_field names", field="data.prompt_field")
    ds = raw.select_columns(list(names)).rename_columns({k: v for k, v in names.items() if k != v})
    splits = _split(spec, ds)  # pairs stay whole across the split, also for KTO
    if spec.task == "kto" and kind == "paired":
        from trl.data_utils import unpair_preference_dataset

        splits = {k: unpair_preference_dataset(v) for k, v in splits.items()}
    meta = {"task": spec.task, "layout": kind, "examples": raw.num_rows,
            "splits": {k: {"rows": v.num_rows} for k, v in splits.items()}}
    return splits, meta


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
    positions = restart_positions(len(ids), starts).astype(np.int32)
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
