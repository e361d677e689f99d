"""Prepare a run's data into the cache: a mixture's sources into memory-mapped token shards
(launcher/data/shards.py), by N local processes or as task k of a Slurm array; any other run through
data/build.py as before. Runs in the launching process or the prep job, never on a rank."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.config.spec import RunSpec
from launcher.data import shards
from launcher.data.build import _PretrainTokenize
from launcher.data.build import prepare as prepare_arrow
from launcher.data.cache import source_dirs, source_key_inputs, tokenizer_dir
from launcher.data.check import check_data
from launcher.data.source import readable_files, source_spec
from launcher.errors import UserError
from launcher.hubcache import hf_home
from launcher.model.load import load_tokenizer, load_tokenizer_from

# test-only: a marker file path; the first shard written while it does not exist creates it and SIGKILLs
# the process (a preparation task killed mid-way). Never set it in a real run.
TEST_KILL_AFTER = "LAUNCHER_TEST_PREP_KILL_ONCE"


@dataclass
class PrepReport:
    dirs: list[Path]
    written: int  # shards this call wrote
    tokens_written: int
    seconds: float
    complete: bool  # every source has its manifest


def prepare(spec: RunSpec, tokenizer: Any = None) -> Path:
    """The run's data into the cache (a mixture: all of it, here); the folder ranks read (a mixture: the
    cache root). Used by `launcher run` and `launcher eval`."""
    if not spec.data.sources:
        return prepare_arrow(spec, tokenizer)
    prepare_sources(spec, tokenizer)
    return source_dirs(spec, tokenizer)[0].parent


def _work(spec: RunSpec, tokenizer: Any) -> tuple[list[Path], list[list[shards.Part]], list[dict[str, Any]]]:
    dirs = source_dirs(spec, tokenizer)
    tok = tokenizer_dir(spec, tokenizer)
    plans, inputs = [], []
    for k, src in enumerate(spec.data.sources):
        one = source_spec(spec, k)
        found = readable_files(one)  # a hub dataset: the snapshot `launcher stage` put in the hub cache
        if found is None:
            raise UserError(f"data.sources[{k}] ({src.name}): hub dataset {src.path!r} is not in the hub cache "
                            f"({hf_home(one)[0]}); preparation reads it offline. Stage it first where the hub "
                            f"is reachable: launcher stage SPEC (the same spec and flags)",
                            field=f"data.sources[{k}].path")
        fmt, files = found
        check_data(one)
        plans.append(shards.plan_parts(files, fmt, max(1, int(spec.data.shard_mb * (1 << 20)))))
        inputs.append(source_key_inputs(spec, k, tok))
    return dirs, plans, inputs


def prepare_sources(spec: RunSpec, tokenizer: Any = None, *, procs: int = 1, task: int | None = None,
                    tasks: int = 1) -> PrepReport:
    """Write the missing or invalid shards of every source (task k of `tasks`: only the shards whose
    number over all sources is k mod tasks), with `procs` processes; then write each source's manifest
    when its shards are complete (checked in full: counts and fingerprints)."""
    t0 = time.perf_counter()
    dirs, plans, inputs = _work(spec, tokenizer)
    todo: list[tuple[int, int]] = []
    g = 0
    for k, (d, parts) in enumerate(zip(dirs, plans)):
        d.mkdir(parents=True, exist_ok=True)
        for i in range(len(parts)):
            if (task is None or g % tasks == task) and shards.shard_info(d, i, deep=True) is None:
                todo.append((k, i))
            g += 1
    tok_arg = tokenizer if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None else tokenizer_dir(spec, tokenizer)
    jobs = [(spec, tok_arg, str(dirs[k]), i, asdict(plans[k][i]), k) for k, i in todo]
    written = 0
    tokens = 0
    if procs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork where there is one: the workers inherit the imports and the tokenizer loaded here (spawned
        # workers would each pay the interpreter, transformers and the tokenizer again, seconds apiece)
        _tokenizer(jobs[0][0], jobs[0][1])
        # the processes tokenize side by side: the Rust tokenizer's own threads (one process uses them all)
        # would only compete, and a forked process may not use them at all
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(procs, len(jobs))) as pool:
            for n in pool.imap_unordered(_write_one, jobs):
                written, tokens = written + 1, tokens + n
    else:
        for job in jobs:
            tokens += _write_one(job)
            written += 1
    complete = True
    for d, parts, inp in zip(dirs, plans, inputs):
        if shards.read_manifest(d) is None or shards.verify(d):
            complete = shards.finalize(d, parts, inp) is not None and complete
    return PrepReport(dirs, written, tokens, time.perf_counter() - t0, complete)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(spec: RunSpec, tok_arg: Any) -> Any:
    key = str(tok_arg)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(spec) if tok_arg is None else load_tokenizer_from(tok_arg)
    return _TOKENIZERS[key]


def _write_one(job: tuple[Any, ...]) -> int:
    spec, tok_arg, folder, i, part, k = job
    tok = _tokenizer(spec, tok_arg)
    one = source_spec(spec, k)
    encode = _PretrainTokenize(tok, one.data.text_field)
    docs = shards.tokenize_part(shards.Part(**part), one.data.text_field,
                                lambda texts: encode({one.data.text_field: texts}, list(range(len(texts))))["input_ids"])
    info = shards.write_shard(Path(folder), i, docs, extra={"part": part})
    marker = os.environ.get(TEST_KILL_AFTER)
    if marker and not Path(marker).exists():  # test-only: die mid-way once, as a killed task does
        Path(marker).write_text(f"{os.getpid()}\n")
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return int(info["tokens"])
