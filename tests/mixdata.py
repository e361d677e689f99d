"""Small mixture corpora for the tests of data.sources: three sources (jsonl, txt with paragraphs split by
one or more blank lines, jsonl with another text field), deterministic from a seed."""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.config.spec import validate


def _paragraphs(rng: random.Random, n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    out = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        out.append("\n".join(lines))
    return out


def mixture_files(root: Path, n: int = 120, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"web": root / "web.jsonl", "code": root / "code.txt", "replay": root / "replay.jsonl"}
    paths["web"].write_text("".join(json.dumps({"text": p}) + "\n" for p in _paragraphs(rng, n)))
    # paragraphs separated by one or more blank lines (a blank line may hold spaces)
    paths["code"].write_text("".join(p + rng.choice(["\n\n", "\n\n\n", "\n  \n"]) for p in _paragraphs(rng, n)))
    paths["replay"].write_text("".join(json.dumps({"body": p}) + "\n" for p in _paragraphs(rng, n)))
    return paths


def mixture_spec(root: Path, cache: Path, **data):
    p = mixture_files(root)
    return validate({"data": {"seq_len": 32, "shard_mb": 0.002, "cache_dir": str(cache), "sources": [
        {"name": "web", "path": str(p["web"]), "weight": 0.6},
        {"name": "code", "path": str(p["code"]), "weight": 0.3},
        {"name": "replay", "path": str(p["replay"]), "weight": 0.1, "text_field": "body"}], **data}})
