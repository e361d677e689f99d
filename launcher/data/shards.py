"""Memory-mapped token shards: the prepared form of a mixture source (data.sources).

A source's cache folder holds, per shard i, a flat token file `shard-i.bin` (uint32, every document's
tokens, each followed by EOS), a document index `shard-i.idx` (int64 offsets of the document starts,
one more than the documents) and `shard-i.json` (counts and the sha256 of both files, written last).
`manifest.json`, written once every shard is there and valid, lists the shards with their counts and
fingerprints: it is what "prepared" means. Ranks open the files with np.memmap, so a rank's memory does
not grow with the corpus.

The shard plan is a function of the data alone (never of the number of workers): every file is cut into
parts of about data.shard_mb input bytes (jsonl and txt at line boundaries; other formats and gzip files
are one part each), one shard per part. Worker k of N writes the shards i with i % N == k, so a Slurm
array task, a local process and a rerun all agree on which shard holds what; a rerun writes only the
shards that are missing or invalid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from launcher.data.source import open_text
from launcher.errors import UserError

TOKEN_DTYPE = "uint32"
INDEX_DTYPE = "int64"
SHARD_VERSION = 1
MANIFEST = "manifest.json"
_SPLITTABLE = ("jsonl", "txt")  # formats cut at line boundaries into byte ranges


@dataclass(frozen=True)
class Part:
    """One unit of preparation work: bytes [start, end) of a file (a line or paragraph belongs to the part
    its first byte is in); end -1 = to the end."""

    file: str
    fmt: str
    start: int
    end: int


def plan_parts(files: Sequence[Path], fmt: str, shard_bytes: int) -> list[Part]:
    """The shard plan of one source: each file cut into parts of about `shard_bytes` bytes."""
    parts: list[Part] = []
    for f in files:
        size = f.stat().st_size
        if fmt in _SPLITTABLE and not f.name.lower().endswith(".gz") and size > shard_bytes:
            n = -(-size // shard_bytes)
            step = -(-size // n)
            parts += [Part(str(f), fmt, k * step, min(size, (k + 1) * step)) for k in range(n)]
        else:
            parts.append(Part(str(f), fmt, 0, -1))
    return parts


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


# --------------------------------------------------------------------------- reading raw records

def _lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines whose first byte lies in the part."""
    with open(part.file, "rb") as f:
        if part.start > 0:
            f.seek(part.start - 1)
            f.readline()  # the rest of the line holding byte start-1: it belongs to the part before
        pos = f.tell()
        while part.end < 0 or pos < part.end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _prev_line_blank(path: str, pos: int) -> bool:
    """Whether the line ending just before byte `pos` (a line start) is blank, or there is none."""
    if pos == 0:
        return True
    with open(path, "rb") as f:
        back = min(pos, 4096)
        f.seek(pos - back)
        chunk = f.read(back)
    body = chunk[:-1]  # the chunk ends with the newline of the previous line
    if b"\n" not in body and back < pos:
        return False  # a line longer than the chunk
    return not body.rsplit(b"\n", 1)[-1].strip()


def _paragraphs(part: Part) -> Iterator[str]:
    """Documents of a text file: paragraphs (runs of non-blank lines). A paragraph belongs to the part its
    first line starts in, and is read to its end even past the part."""
    if part.end < 0 and part.start == 0:
        with open_text(Path(part.file)) as f:
            buf: list[str] = []
            for line in f:
                if line.strip():
                    buf.append(line)
                elif buf:
                    yield "".join(buf)
                    buf = []
            if buf:
                yield "".join(buf)
        return
    with open(part.file, "rb") as f:
        pos = part.start
        if pos > 0:
            f.seek(pos - 1)
            f.readline()
            pos = f.tell()
        skipping = pos > 0 and not _prev_line_blank(part.file, pos)  # inside a paragraph of the part before
        buf_b: list[bytes] = []
        while True:
            line = f.readline()
            if not line:
                break
            blank = not line.strip()
            if skipping:
                skipping = not blank
            elif blank:
                if buf_b:
                    yield b"".join(buf_b).decode("utf-8")
                    buf_b = []
                if pos >= part.end:
                    break
            elif buf_b or pos < part.end:
                buf_b.append(line)
            else:
                break
            pos += len(line)
        if buf_b:
            yield b"".join(buf_b).decode("utf-8")


def iter_texts(part: Part, field: str) -> Iterator[tuple[str, Any]]:
    """(where, text) of each document in the part; `where` names the file and line or record."""
    if part.fmt == "txt":
        for k, text in enumerate(_paragraphs(part), 1):
            yield f"{part.file} paragraph {k}", text
    elif part.fmt == "jsonl" and part.end >= 0:
        for pos, line in _lines(part):
            if line.strip():
                yield f"{part.file} byte {pos}", _field(json.loads(line), field, f"{part.file} byte {pos}")
    elif part.fmt == "parquet":
        import pyarrow.parquet as pq

        col = pq.read_table(part.file, columns=[field]).column(field).to_pylist()
        for k, text in enumerate(col, 1):
            yield f"{part.file} row {k}", text
    elif part.fmt == "csv":
        with open_text(Path(part.file)) as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{part.file} line {reader.line_num}", _field(row, field, f"{part.file} line {reader.line_num}")
    else:  # jsonl (whole file, gzip too) or json
        with open_text(Path(part.file)) as f:
            if part.fmt == "json":
                data = json.load(f)
                rows = data if isinstance(data, list) else [dict(zip(data, vals)) for vals in zip(*data.values())]
                for k, row in enumerate(rows, 1):
                    yield f"{part.file} record {k}", _field(row, field, f"{part.file} record {k}")
                return
            for k, line in enumerate(f, 1):
                if line.strip():
                    yield f"{part.file} line {k}", _field(json.loads(line), field, f"{part.file} line {k}")


def _field(row: Any, field: str, where: str) -> Any:
    if not isinstance(row, dict) or field not in row:
        raise UserError(f"data {where}: no field {field!r}; set the source's text_field (or data.text_field)",
                        field="data.sources.text_field")
    return row[field]


# --------------------------------------------------------------------------- writing

def _fingerprint(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_shard(out: Path, i: int, docs: Sequence[Sequence[int]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write shard i of `docs` (token lists, EOS included) atomically; its .json (written last) returned."""
    import numpy as np

    name = shard_name(i)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=INDEX_DTYPE)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for d in docs for t in d), dtype=TOKEN_DTYPE, count=int(offsets[-1]))
    bin_, idx = out / f"{name}.bin", out / f"{name}.idx"
    for arr, dst in ((flat, bin_), (offsets, idx)):
        tmp = dst.with_name(dst.name + tag)
        arr.tofile(tmp)
        os.replace(tmp, dst)
    info = {"shard": i, "tokens": int(offsets[-1]), "docs": len(docs), "sha256": _fingerprint(bin_, idx),
            "version": SHARD_VERSION, **(extra or {})}
    tmp = out / f"{name}.json{tag}"
    tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
    os.replace(tmp, out / f"{name}.json")
    return info


def shard_info(out: Path, i: int, deep: bool = False) -> dict[str, Any] | None:
    """Shard i's record when its files are there and agree with it (sizes; with `deep`, the sha256 too)."""
    name = shard_name(i)
    try:
        info = json.loads((out / f"{name}.json").read_text())
        ok = (info.get("version") == SHARD_VERSION
              and (out / f"{name}.bin").stat().st_size == info["tokens"] * 4
              and (out / f"{name}.idx").stat().st_size == (info["docs"] + 1) * 8)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ok and deep:
        ok = _fingerprint(out / f"{name}.bin", out / f"{name}.idx") == info["sha256"]
    return info if ok else None


def missing_shards(out: Path, n: int, deep: bool = False) -> list[int]:
    """Indices of the shards of 0..n-1 that are missing or invalid."""
    return [i for i in range(n) if shard_info(out, i, deep) is None]


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(out: Path, deep: bool = False) -> list[str]:
    """Problems with a prepared source folder (empty = complete): no manifest, or shards the manifest lists
    that are missing or differ from their counts (and, with `deep`, their fingerprints)."""
    man = read_manifest(out)
    if man is None:
        return [f"{out / MANIFEST} is missing: the preparation did not finish"]
    problems = []
    for s in man["shards"]:
        info = shard_info(out, s["shard"], deep)
        if info is None or info["sha256"] != s["sha256"] or info["tokens"] != s["tokens"]:
            problems.append(f"{out / shard_name(s['shard'])}.* is missing or differs from the manifest")
    return problems


def finalize(out: Path, parts: Sequence[Part], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Write manifest.json when every shard of the plan is there and valid (checked in full); None otherwise."""
    infos = [shard_info(out, i, deep=True) for i in range(len(parts))]
    if any(info is None for info in infos):
        return None
    man = {"version": SHARD_VERSION, "inputs": inputs, "token_dtype": TOKEN_DTYPE,
           "shards": [{"shard": i, "tokens": info["tokens"], "docs": info["docs"], "sha256": info["sha256"],
                       "part": asdict(parts[i])} for i, info in enumerate(infos) if info is not None],
           "tokens": sum(info["tokens"] for info in infos if info is not None),
           "docs": sum(info["docs"] for info in infos if info is not None)}
    tmp = out / f"{MANIFEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    return man


def tokenize_part(part: Part, field: str, encode: Callable[[list[str]], list[list[int]]],
                  batch: int = 512) -> list[list[int]]:
    """The part's documents as token lists (blank documents skipped). `encode` maps texts to token lists
    with the special prefix and EOS added."""
    docs: list[list[int]] = []
    texts: list[str] = []
    for where, text in iter_texts(part, field):
        if not isinstance(text, str):
            raise UserError(f"data {where}: field {field!r} is {'null' if text is None else type(text).__name__}, "
                            f"expected a string", field="data.sources.text_field")
        if text.strip():
            texts.append(text.strip())
        if len(texts) >= batch:
            docs += encode(texts)
            texts = []
    if texts:
        docs += encode(texts)
    return docs


# --------------------------------------------------------------------------- reading shards

class ShardSet:
    """A prepared source's shards, memory-mapped: blocks of `seq_len` tokens cut inside each shard (the
    tail of a shard shorter than a block is left out). Only the small per-shard block counts live in memory."""

    def __init__(self, folder: Path, seq_len: int):
        import numpy as np

        man = read_manifest(folder)
        if man is None:
            raise UserError(f"{folder / MANIFEST} is missing: run `launcher prepare SPEC`", field="data.sources")
        self.folder, self.seq_len = folder, seq_len
        self.shards = [s["shard"] for s in man["shards"]]
        self.tokens = int(man["tokens"])
        counts = np.array([s["tokens"] // seq_len for s in man["shards"]], dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(counts)])
        self.blocks = int(self.block_starts[-1])
        self._maps: dict[int, tuple[Any, Any]] = {}

    def _open(self, k: int) -> tuple[Any, Any]:
        if k not in self._maps:
            import numpy as np

            name = self.folder / shard_name(self.shards[k])
            self._maps[k] = (np.memmap(f"{name}.bin", dtype=TOKEN_DTYPE, mode="r"),
                             np.memmap(f"{name}.idx", dtype=INDEX_DTYPE, mode="r"))
        return self._maps[k]

    def block(self, j: int) -> tuple[Any, Any]:
        """Block j: (its tokens as int64, the offsets inside it where a document starts)."""
        import numpy as np

        k = int(np.searchsorted(self.block_starts, j, side="right")) - 1
        tokens, index = self._open(k)
        a = int(j - self.block_starts[k]) * self.seq_len
        b = a + self.seq_len
        lo, hi = np.searchsorted(index, [a, b], side="left")
        return np.asarray(tokens[a:b], dtype=np.int64), np.asarray(index[lo:hi], dtype=np.int64) - a

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers and pickling reopen the maps
        return {**self.__dict__, "_maps": {}}
