"""Where a run's data is: the local files and their format, or a datasets hub name (and the snapshot
`launcher stage` put in the hub cache). Stdlib only: the login node, pre-flight and stage use it."""

from __future__ import annotations

import glob
import gzip
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import assets
from launcher.errors import UserError
from launcher.hubcache import HUB_ID, HubItem, cached_snapshot, hf_home

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

EXT_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".csv": "csv", ".txt": "txt"}


def data_files(spec: RunSpec) -> tuple[str, list[Path]]:
    """(format, files) of the run's data; ("hub", []) for a datasets hub name."""
    d = spec.data
    if d.path is None:
        name = {"pretrain": "corpus.txt", "sft": "sft.jsonl"}.get(spec.task, "pref.jsonl")  # pref: preference pairs
        return EXT_FORMAT[Path(name).suffix], [assets.tiny_dir() / name]
    if d.format == "hub":
        return "hub", []
    p = Path(d.path).expanduser()
    if p.is_file():
        fmt = d.format if d.format != "auto" else format_of(p)
        if fmt is None:
            raise UserError(f"data file {p}: cannot tell its format from the extension {''.join(p.suffixes)!r}; "
                            f"use .jsonl, .json, .parquet, .csv or .txt, or set data.format", field="data.format")
        return fmt, [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and format_of(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if d.format != "auto":
            files = [f for f in files if datasets_builder(format_of(f)) == datasets_builder(d.format)]
        if not files:
            want = f"{d.format} files" if d.format != "auto" else "data files (.jsonl, .json, .parquet, .csv, .txt)"
            raise UserError(f"data folder {p} has no {want}; put the data there or point data.path at a file",
                            field="data.path")
        kinds = sorted({datasets_builder(format_of(f)) for f in files})
        if len(kinds) > 1:
            raise UserError(f"data folder {p} mixes formats ({', '.join(kinds)}); keep one format per folder or "
                            f"choose one with data.format", field="data.format")
        return d.format if d.format != "auto" else format_of(files[0]), files  # type: ignore[return-value]
    if any(c in d.path for c in "*?["):  # a glob (a mixture source's path may be one)
        matched = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not matched:
            raise UserError(f"data glob {d.path} matches no file (working directory {Path.cwd()}); fix the path",
                            field="data.path")
        fmts = {d.format if d.format != "auto" else format_of(f) for f in matched}
        if None in fmts or len({datasets_builder(f) for f in fmts}) > 1:
            raise UserError(f"data glob {d.path} matches files of mixed or unknown formats ({', '.join(sorted(map(str, fmts)))}); "
                            f"match one format (.jsonl, .json, .parquet, .csv, .txt)", field="data.format")
        return fmts.pop(), matched  # type: ignore[return-value]
    looks_local = d.path.startswith((".", "/", "~")) or Path(d.path).suffix.lower() in (*EXT_FORMAT, ".gz")
    if d.format != "auto" or looks_local or not HUB_ID.fullmatch(d.path):
        raise UserError(f"data file {d.path} does not exist (working directory {Path.cwd()}); fix data.path "
                        f"(--data) or drop it to train on the embedded corpus", field="data.path")
    return "hub", []


def source_spec(spec: RunSpec, k: int) -> RunSpec:
    """The run's spec as if mixture source k were its only data (data.path, format, text_field)."""
    src, d = spec.data.sources[k], spec.data
    data = d.model_copy(update={"path": src.path, "format": src.format or d.format,
                                "text_field": src.text_field or d.text_field, "sources": [], "stages": []})
    return spec.model_copy(update={"data": data})


def format_of(path: Path) -> str | None:
    """The format a file's extension names (a trailing .gz looked through), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return EXT_FORMAT.get(suffixes[-1]) if suffixes else None


def datasets_builder(fmt: str | None) -> str | None:
    """The datasets builder that reads a format (json reads both .json and .jsonl)."""
    return {"jsonl": "json", "txt": "text"}.get(fmt, fmt) if fmt else None


def open_text(path: Path) -> io.TextIOBase:
    """A data file as UTF-8 text, gzip-compressed or not."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def staged_files(spec: RunSpec) -> tuple[str, list[Path]] | None:
    """(format, files) of the spec's hub dataset as `launcher stage` put it in the hub cache: the snapshot's
    data files whose path names data.split as a word ("data/train-00000-of-00001.parquet", "train.jsonl"),
    or all of them when none does. None when it was not staged."""
    snap = staged_dataset(spec)
    if snap is None:
        return None
    fmt, files = data_files(spec.model_copy(update={"data": spec.data.model_copy(update={"path": str(snap),
                                                                                        "format": "auto"})}))
    split = [f for f in files if spec.data.split in re.split(r"[-_./]", f.relative_to(snap).as_posix())]
    return fmt, split or files


def readable_files(spec: RunSpec) -> tuple[str, list[Path]] | None:
    """(format, files) to read the spec's data from here: its local files, or a hub dataset's staged snapshot
    (staged_files); None for a hub dataset that was not staged."""
    fmt, files = data_files(spec)
    return staged_files(spec) if fmt == "hub" else (fmt, files)


def staged_dataset(spec: RunSpec) -> Path | None:
    """The snapshot folder of the spec's hub dataset in the hub cache (cluster.hf_home, $HF_HOME or the
    default), or None when it is not a hub dataset or was not staged."""
    if spec.data.path is None or data_files(spec)[0] != "hub":
        return None
    home, _ = hf_home(spec)
    return cached_snapshot(home, HubItem("dataset", spec.data.path, None, "data.path"))
