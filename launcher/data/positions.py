"""Labels and position ids of packed rows, shared by SFT packing (data/build.py) and pretraining blocks
with document boundaries (data.doc_mask, data/mixture.py)."""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # the label of a token the loss skips (transformers' default ignore index)


def restart_positions(n: int, starts: Any) -> Any:
    """Position ids of n packed tokens, restarting at 0 at every offset in `starts` (sorted, starts[0] == 0).
    With these and no attention mask (use_cache=False), transformers keeps each segment's attention to itself."""
    import numpy as np

    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, n))
    return (np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int64)
