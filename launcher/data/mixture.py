"""A pretraining mixture (data.sources, data.stages): which source, and which of its blocks, every
training sample comes from, as a pure function of (seed, sample index); sample n is the (n % G)-th
sequence of optimizer step n // G (G = the global batch in sequences).

Per stage, the weights become integer counts m_k over a cycle of CYCLE samples (largest remainders), and
the sources take turns inside the cycle by smooth weighted round robin, so after any number of samples
each source is within about one sample of its share. A source's c-th pick reads its block
perm(c mod B) in epoch c // B, a seeded affine permutation of its B training blocks. Nothing depends on
the number of ranks: a run resumed on another world size continues the same sequence.

Stdlib only (the plan and `launcher estimate` read the shares on a login node); the dataset class reads
the memory-mapped shards (launcher/data/shards.py) with numpy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from launcher.data.cache import source_dirs
from launcher.data.positions import IGNORE_INDEX, restart_positions
from launcher.data.shards import ShardSet
from launcher.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

CYCLE = 10_000  # weight resolution: 1 / CYCLE of the samples


@dataclass(frozen=True)
class Stage:
    start_step: int
    end_step: int | None  # None: to the end of the run
    weights: tuple[float, ...]  # normalized, one per source


def stages(spec: RunSpec) -> list[Stage]:
    """The mixture's stages: data.stages (after the last, its weights stay), else the sources' weights."""
    names = [s.name for s in spec.data.sources]
    if not spec.data.stages:
        return [Stage(0, None, _normalized([s.weight for s in spec.data.sources]))]
    out, start = [], 0
    for i, st in enumerate(spec.data.stages):
        end = None if i == len(spec.data.stages) - 1 else st.until_step
        out.append(Stage(start, end, _normalized([st.weights.get(n, 0.0) for n in names])))
        start = st.until_step
    return out


def _normalized(w: Sequence[float]) -> tuple[float, ...]:
    total = float(sum(w))
    return tuple(x / total for x in w)


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to `total` in the proportions of `weights` (largest remainders)."""
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (counts[k] - exact[k], k))
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


class _Cycle:
    """One stage's order of sources inside a cycle, and each source's picks before every position."""

    def __init__(self, weights: Sequence[float]):
        self.m = _apportion(weights, CYCLE)
        k_n = len(self.m)
        cur = [0] * k_n
        self.order: list[int] = []
        self.before: list[list[int]] = [[0] * k_n]  # picks of each source in positions [0, r)
        for _ in range(CYCLE):
            for k in range(k_n):
                cur[k] += self.m[k]
            k = max(range(k_n), key=lambda j: (cur[j], -j))
            cur[k] -= CYCLE
            self.order.append(k)
            row = list(self.before[-1])
            row[k] += 1
            self.before.append(row)

    def counts(self, p: int) -> list[int]:
        q, r = divmod(p, CYCLE)
        return [q * m + b for m, b in zip(self.m, self.before[r])]


class Schedule:
    """Sample index -> (source, that source's pick number), and picks per source before a sample."""

    def __init__(self, spec: RunSpec, global_batch: int):
        self.names = [s.name for s in spec.data.sources]
        self.g = global_batch
        self.stages = stages(spec)
        self.cycles = [_Cycle(st.weights) for st in self.stages]
        self.base: list[list[int]] = []  # picks of each source before each stage
        acc = [0] * len(self.names)
        for st, cyc in zip(self.stages, self.cycles):
            self.base.append(list(acc))
            if st.end_step is not None:
                acc = [a + c for a, c in zip(acc, cyc.counts((st.end_step - st.start_step) * global_batch))]

    def _stage(self, n: int) -> int:
        for i, st in enumerate(self.stages):
            if st.end_step is None or n < st.end_step * self.g:
                return i
        return len(self.stages) - 1  # pragma: no cover - the last stage is open-ended

    def counts_before(self, n: int) -> list[int]:
        """Samples of each source among samples [0, n)."""
        i = self._stage(n)
        p = n - self.stages[i].start_step * self.g
        return [b + c for b, c in zip(self.base[i], self.cycles[i].counts(p))]

    def pick(self, n: int) -> tuple[int, int]:
        """(source, its pick number) of sample n."""
        i = self._stage(n)
        p = n - self.stages[i].start_step * self.g
        cyc = self.cycles[i]
        k = cyc.order[p % CYCLE]
        return k, self.base[i][k] + cyc.counts(p)[k]

    def tokens_by_source(self, step: int, seq_len: int) -> dict[str, int]:
        """Training tokens each source gave in optimizer steps [0, step)."""
        return {name: c * seq_len for name, c in zip(self.names, self.counts_before(step * self.g))}


def permuted(c: int, blocks: int, seed: int, source: int) -> int:
    """The block a source's pick c reads: epoch c // blocks, through a seeded affine permutation."""
    epoch, i = divmod(c, blocks)
    h = hashlib.sha256(f"{seed}/{source}/{epoch}".encode()).digest()
    a = int.from_bytes(h[:8], "little") % blocks or 1
    while math.gcd(a, blocks) != 1:
        a += 1
    return (a * i + int.from_bytes(h[8:16], "little")) % blocks


def eval_blocks(blocks: int, fraction: float) -> int:
    """Held-out blocks of a source: the last round(blocks x fraction), at least one when asked for."""
    if fraction <= 0:
        return 0
    return min(blocks - 1, max(1, round(blocks * fraction)))


def source_fraction(spec: RunSpec, k: int) -> float:
    src = spec.data.sources[k]
    return src.eval_fraction if src.eval_fraction is not None else spec.data.eval_fraction


def item(tokens: Any, starts: Any, doc_mask: bool) -> dict[str, Any]:
    """A block as a training row; with doc_mask, position ids restart at each document start and the
    label of a document's first token is ignored (it would be predicted from the document before)."""
    import numpy as np

    row: dict[str, Any] = {"input_ids": tokens}
    if doc_mask:
        starts = starts[starts > 0]
        labels = tokens.copy()
        labels[starts] = IGNORE_INDEX
        row.update(labels=labels, position_ids=restart_positions(len(tokens), np.concatenate([[0], starts])))
    return row


class MixtureDataset:
    """The training samples of a mixture: index n = the run's n-th sample (map-style: a rank is handed
    its own indices by the sequential sampler, and reads only those blocks)."""

    def __init__(self, spec: RunSpec, sets: Sequence[ShardSet], global_batch: int, max_steps: int):
        self.schedule = Schedule(spec, global_batch)
        self.sets, self.seed, self.doc_mask = list(sets), spec.optim.seed, spec.data.doc_mask
        self.train_blocks = [s.blocks - eval_blocks(s.blocks, source_fraction(spec, k)) for k, s in enumerate(sets)]
        for k, n in enumerate(self.train_blocks):
            if n < 1:
                src = spec.data.sources[k]
                raise UserError(f"data source {src.name!r} ({src.path}) holds {sets[k].tokens} tokens, not one "
                                f"training block of data.seq_len={spec.data.seq_len}; give it more text or lower "
                                f"--seq-len", field="data.sources")
        self.length = global_batch * max_steps

    def __len__(self) -> int:
        return self.length

    def locate(self, n: int) -> tuple[int, int]:
        """(source, block) of sample n."""
        k, c = self.schedule.pick(n)
        return k, permuted(c, self.train_blocks[k], self.seed, k)

    def __getitem__(self, n: int) -> dict[str, Any]:
        k, j = self.locate(int(n))
        return item(*self.sets[k].block(j), self.doc_mask)


class SourceEvalDataset:
    """One source's held-out blocks in order (with held_out=False: its training blocks)."""

    def __init__(self, spec: RunSpec, shard_set: ShardSet, k: int, held_out: bool = True):
        self.set, self.doc_mask = shard_set, spec.data.doc_mask
        n_eval = eval_blocks(shard_set.blocks, source_fraction(spec, k))
        self.first, self.length = ((shard_set.blocks - n_eval, n_eval) if held_out
                                   else (0, shard_set.blocks - n_eval))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, n: int) -> dict[str, Any]:
        return item(*self.set.block(self.first + int(n)), self.doc_mask)


def open_mixture(spec: RunSpec, global_batch: int, max_steps: int) -> tuple[MixtureDataset, dict[str, SourceEvalDataset]]:
    """The training samples of the run and each source's held-out blocks (sources with none left out),
    read memory-mapped from the prepared shards."""
    sets = [ShardSet(d, spec.data.seq_len) for d in source_dirs(spec)]
    evals = {src.name: SourceEvalDataset(spec, s, k) for k, (src, s) in enumerate(zip(spec.data.sources, sets))}
    return MixtureDataset(spec, sets, global_batch, max_steps), {n: e for n, e in evals.items() if len(e)}


def summary_lines(spec: RunSpec, global_batch: int, max_steps: int, usd_per_mtok: float | None) -> list[str]:
    """plan.txt's lines on the mixture: each source's weight, training tokens over the run and their cost."""
    sched = Schedule(spec, global_batch)
    tokens = sched.tokens_by_source(max_steps, spec.data.seq_len)
    total = sum(tokens.values()) or 1
    lines = []
    for src in spec.data.sources:
        t = tokens[src.name]
        usd = f", ${t / 1e6 * usd_per_mtok:,.2f}" if usd_per_mtok is not None else ""
        lines.append(f"source       {src.name}: weight {src.weight:g}, {t:,} tokens ({100 * t / total:.1f}%){usd}")
    for i, st in enumerate(sched.stages):
        if len(sched.stages) > 1:
            end = f"step {st.end_step}" if st.end_step is not None else "the end"
            shares = ", ".join(f"{n} {w:.3f}" for n, w in zip(sched.names, st.weights))
            lines.append(f"stage        {i}: step {st.start_step} to {end}: {shares}")
    return lines


def source_rows(spec: RunSpec, k: int, held_out: bool = True) -> SourceEvalDataset:
    """Source k's held-out blocks (or its training blocks), read from the prepared shards (`launcher eval`)."""
    return SourceEvalDataset(spec, ShardSet(source_dirs(spec)[k], spec.data.seq_len), k, held_out)


def eval_blocks_of(spec: RunSpec, k: int) -> bool:
    """Whether source k holds blocks out for evaluation (its eval_fraction, else data.eval_fraction)."""
    return source_fraction(spec, k) > 0


def resume_batch_problem(attempts: Sequence[dict[str, Any]], global_batch: int, seq_len: int) -> str | None:
    """Why a mixture run cannot resume with this global batch, or None. Sample n is step n // G's, so a resume
    that changed G would continue at another sample (repeating or skipping part of the mixture); the earlier
    attempts (manifest.json) say which G they trained with."""
    ended = [a for a in attempts if a.get("end_step") and a.get("tokens_per_step")]
    if not ended:
        return None
    before = int(ended[-1]["tokens_per_step"]) // seq_len
    if before == global_batch:
        return None
    return (f"this mixture run trained with a global batch of {before} sequences and resumes with {global_batch}: "
            f"its sample sequence is indexed by step x global batch, so the resume would repeat or skip samples; "
            f"resume with optim.global_batch={before} (on any number of ranks: micro batch x accumulation x ranks "
            f"= {before})")
