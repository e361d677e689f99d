"""How long preparing a mixture's token shards takes (`launcher estimate`), from the input bytes (or the
token counts of shards already written) and a measured tokenization rate. Stdlib only: login node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.data.cache import source_dirs
from launcher.data.shards import read_manifest
from launcher.data.source import readable_files, source_spec
from launcher.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

# Measured on this project's CPU machines with the embedded tiny tokenizer (a fast, Llama-style BPE):
# one `launcher prepare` process tokenizes about 200k tokens/s of the embedded corpus, and that corpus
# holds 4.1 bytes per token. Other tokenizers and languages differ; the estimate says which it assumed.
TOKENS_PER_S_PER_PROCESS = 200_000
BYTES_PER_TOKEN = 4.1
TASK_START_S = 15.0  # interpreter, transformers and tokenizer load per task


@dataclass(frozen=True)
class PrepEstimate:
    tokens: int
    measured: bool  # tokens read from manifests already written (else from the input bytes)
    processes: int
    seconds: float


def estimate_prep(spec: RunSpec) -> PrepEstimate | None:
    """Preparation time of a mixture's shards with cluster.prep.tasks tasks of data.num_proc processes;
    None without data.sources or when the data is not readable here."""
    if not spec.data.sources:
        return None
    try:
        dirs = source_dirs(spec)
        tokens, measured = 0, True
        for k, d in enumerate(dirs):
            man = read_manifest(d)
            if man is not None:
                tokens += int(man["tokens"])
                continue
            measured = False
            found = readable_files(source_spec(spec, k))
            if found is None:  # a hub dataset not staged here: its size is unknown
                return None
            files = found[1]
            tokens += int(sum(f.stat().st_size for f in files) / BYTES_PER_TOKEN)
    except (UserError, OSError, ValueError):  # a source not readable here: no estimate, not a failure
        return None
    procs = spec.cluster.prep.tasks * (spec.data.num_proc or 1)
    return PrepEstimate(tokens, measured, procs, TASK_START_S + tokens / (TOKENS_PER_S_PER_PROCESS * procs))
