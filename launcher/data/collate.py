"""The Trainer's data collators: prepared rows (data/build.py) into batches of tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from launcher.data.build import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec


class PretrainCollator:
    """Equal-length blocks -> input_ids and labels (the same tokens; the model shifts them)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        ids = torch.as_tensor(np.asarray([f["input_ids"] for f in features]), dtype=torch.long)
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
    if spec.task == "pretrain" and not spec.data.doc_mask:
        return PretrainCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if spec.task == "pretrain":  # doc_mask: blocks carry position ids restarting per document, as packed SFT rows
        return PackedCollator(pad, pad_to_multiple_of)
    return (PackedCollator if spec.data.packing else PadCollator)(pad, pad_to_multiple_of)
