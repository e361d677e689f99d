"""The tokenized-data cache: where it is, the key of a run's entry (data files, tokenizer files and the
fields that shape tokens; never the learning rate or the cluster), and reading an entry back. Stdlib
only: `launcher slurm` computes the key on the login node and ranks check the entry before any heavy
import."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import assets
from launcher.config.spec import PREFERENCE_TASKS
from launcher.data.shards import verify
from launcher.data.source import data_files, source_spec
from launcher.errors import UserError
from launcher.rundir.layout import RunDir

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

PIPELINE_VERSION = 1  # part of the key: bump when data/build.py changes the tokens a given input produces
_TOKENIZER_FILES = re.compile(r"(token|vocab|merges|chat_template|spiece|\.model$)", re.I)


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


def _data_inputs(spec: RunSpec) -> dict[str, Any]:
    d = spec.data
    fmt, files = data_files(spec)
    data: dict[str, Any] = {"format": fmt}
    if fmt == "hub":
        data.update(name=d.path, split=d.split)
    else:
        data["files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return data


def key_inputs(spec: RunSpec, tokenizer_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything the cache key hashes (also written into the entry's meta.json)."""
    d = spec.data
    data = _data_inputs(spec)
    shaping: dict[str, Any] = {"task": spec.task, "seq_len": d.seq_len}
    if spec.task == "pretrain":
        shaping["text_field"] = d.text_field
    elif spec.task in PREFERENCE_TASKS:
        shaping.update(prompt_field=d.prompt_field, chosen_field=d.chosen_field, rejected_field=d.rejected_field,
                       completion_field=d.completion_field, label_field=d.label_field)
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
    inputs = key_inputs(spec, tokenizer_dir if tokenizer_dir is not None else tokenizer_source(spec))
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return f"{spec.task}-{spec.data.seq_len}-{digest}"


def tokenizer_dir(spec: RunSpec, tokenizer: Any) -> str:
    """The folder or hub id a tokenizer argument stands for: None (the run's), a path, or a loaded one."""
    if tokenizer is None:
        return tokenizer_source(spec)
    if isinstance(tokenizer, (str, os.PathLike)):
        return str(tokenizer)
    return str(getattr(tokenizer, "name_or_path", "") or tokenizer_source(spec))


def source_key_inputs(spec: RunSpec, k: int, tokenizer_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a mixture source's shards depend on: its files, format and text field, the shard size and the
    tokenizer; never seq_len, the weights, the eval split or the cluster (blocks are cut when read)."""
    one = source_spec(spec, k)
    return {"version": PIPELINE_VERSION, "kind": "shards", "data": _data_inputs(one),
            "text_field": one.data.text_field, "shard_mb": spec.data.shard_mb,
            "tokenizer": _tokenizer_fingerprint(tokenizer_dir, spec.model.revision)}


def source_dirs(spec: RunSpec, tokenizer: Any = None) -> list[Path]:
    """The cache folders of a mixture's sources, in data.sources order."""
    tok = tokenizer_dir(spec, tokenizer)
    out = []
    for k, src in enumerate(spec.data.sources):
        digest = hashlib.sha256(json.dumps(source_key_inputs(spec, k, tok), sort_keys=True).encode()).hexdigest()
        out.append(cache_dir(spec) / f"shards-{src.name}-{digest[:20]}")
    return out


def unprepared_paths(spec: RunSpec, tokenizer: Any = None) -> list[Path]:
    """Cache folders of this run's data that are not complete here (a mixture: a source folder with no
    manifest, or a shard it lists missing or of the wrong size)."""
    if spec.data.sources:
        return [p for p in source_dirs(spec, tokenizer) if verify(p)]
    path = prepared_path(spec, tokenizer)
    return [] if (path / "meta.json").is_file() else [path]


def prepared_path(spec: RunSpec, tokenizer: Any = None) -> Path:
    """Where `prepare` puts (or put) this run's tokenized data."""
    return cache_dir(spec) / cache_key(spec, tokenizer_dir(spec, tokenizer))


def require_prepared(spec: RunSpec, tokenizer: Any = None) -> Path:
    """The prepared data's folder; UserError (exit 2) naming it and the fix when it is not complete.

    Ranks call this first: they only read the cache, so a missing entry stops every rank at once,
    before any imports the heavy libraries or joins the process group (no rank tokenizes while the
    others wait in a collective).
    """
    path = prepared_path(spec, tokenizer) if not spec.data.sources else cache_dir(spec)
    missing = unprepared_paths(spec, tokenizer)
    if missing:
        spec_file = RunDir(Path(spec.output.dir)).spec_path
        target = str(spec_file) if spec_file.is_file() else "SPEC"
        what = ("(no meta.json)" if not spec.data.sources else
                "(a source's manifest.json is missing or a shard it lists is missing or damaged)")
        raise UserError(f"the tokenized data for this run is not in the cache: {', '.join(map(str, missing))} "
                        f"is missing or incomplete {what}. Ranks only read the cache; run `launcher prepare SPEC` first "
                        f"(`launcher prepare {target}`, where the ranks see the same cache: data.cache_dir or "
                        f"$LAUNCHER_CACHE), or submit with `launcher slurm --submit` without --no-prep, which "
                        f"queues a preparation job before training", field="data.path")
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts `prepare` recorded: rows and tokens per split, examples dropped or truncated."""
    return json.loads((Path(path) / "meta.json").read_text())


def _model_fingerprint(source: str, revision: str | None) -> dict[str, Any]:
    """A model folder's config and weight files (name, size, mtime), or a hub id and revision."""
    p = Path(source).expanduser()
    if not p.is_dir():
        return {"hub": source, "revision": revision}
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in
                                                                (".safetensors", ".bin") or f.name.endswith(".index.json")))
    return {"dir": str(p.resolve()), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def reference_key(spec: RunSpec, model_source: str, precision: str) -> str:
    """Name of the cached reference log-probs of a full DPO run ('ref-<hash>'): the tokenized data's key (data
    files, tokenizer, sequence settings), the reference model's files and the precision it runs in."""
    inputs = {"data": cache_key(spec), "model": _model_fingerprint(model_source, spec.model.revision),
              "precision": precision, "version": PIPELINE_VERSION}
    return "ref-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def reference_path(spec: RunSpec, model_source: str, precision: str) -> Path:
    """Where the reference log-probs of a full DPO run are cached (meta.json there once complete)."""
    return cache_dir(spec) / reference_key(spec, model_source, precision)
