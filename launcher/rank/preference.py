"""Preference tuning on every rank: TRL's trainer for the run's task (DPO, ORPO, KTO, SimPO through CPO, reward
model), built on the same TrainingArguments as every run (rank/loop.py) and the same resilient checkpointing.

The reference model (dpo, kto): for the LoRA family the base with the adapter disabled (TRL's own path when the
trainer is given the unwrapped model and the peft config, so there is no second copy); for full fine-tuning
either precomputed reference log-probs (dpo: a column of the training rows, from their own job's cache, or
computed here before the first step from the untouched policy) or a frozen copy in memory (pref.reference:
in_memory; kto always). Heavy imports (trl, torch) live inside the functions.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.config.spec import TRL_CLASSES, RunSpec, reference_mode

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # what TRL's DPO loss reads from a batch


def trl_classes(task: str) -> tuple[type, type]:
    """(trainer class, config class) of TRL for a task."""
    if task not in TRL_CLASSES:
        raise ValueError(f"task {task!r} is not a preference task")
    module, trainer, config = TRL_CLASSES[task]
    mod = importlib.import_module(module)
    return getattr(mod, trainer), getattr(mod, config)


def config_kwargs(spec: RunSpec) -> dict[str, Any]:
    """What a task's TRL config adds to the run's TrainingArguments keywords. Pure."""
    p = spec.pref
    kw: dict[str, Any] = dict(
        max_length=spec.data.seq_len,  # prompt + response, each of chosen and rejected
        # the model's checkpointing is set where it is loaded (model.grad_ckpt); TRL's configs default it on
        gradient_checkpointing=False,
        # metrics every logging step: TRL's configs default to 10
        logging_steps=spec.output.log_every,
    )
    if spec.task in ("dpo", "kto", "orpo", "simpo"):
        kw["beta"] = p.beta
    if spec.task in ("dpo", "kto"):
        kw["precompute_ref_log_probs"] = reference_mode(spec) == "precomputed"
    if spec.task == "simpo":
        kw.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=p.simpo_gamma)
    return kw


def training_arguments(spec: RunSpec, args_kwargs: dict[str, Any]) -> Any:
    """TRL's config of the task: the run's TrainingArguments keywords (rank/loop.py) and the task's own."""
    kw = {k: v for k, v in args_kwargs.items() if k != "label_names"}  # TRL's trainers name their own inputs
    kw.update(config_kwargs(spec))
    return trl_classes(spec.task)[1](**kw)


def make_trainer(spec: RunSpec, args: Any, model: Any, tokenizer: Any, train_ds: Any,
                 eval_ds: Any, callbacks: list[Any], peft_config: Any) -> Any:
    """TRL's trainer for spec.task with launcher's atomic checkpoints, on `model` (unwrapped: TRL wraps it with
    `peft_config` when the method is a peft one)."""
    from launcher.rank import checkpoint

    base = checkpoint.trainer_class(trl_classes(spec.task)[0])

    class PreferenceTrainer(base):  # type: ignore[misc, valid-type]
        def create_model_card(self, *a: Any, **k: Any) -> None:
            """No README.md beside the checkpoints (TRL writes one at every save)."""

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            """The reference log-probs of every row, as two columns: those the ref job cached (rows in the order
            TRL prepared them), or computed here from the policy before its first step on every rank (the rows
            split over the ranks and gathered back; TRL's own version shares them through a cache file one rank
            writes beside the data) and then cached for the next job."""
            if all(c in dataset.column_names for c in REF_COLUMNS):
                return dataset
            folder = reference_path(spec)
            cached = read_reference(folder, name, len(dataset))
            if cached is None:
                cached = reference_logps(self, dataset, batch_size)
                write_reference(folder, name, *cached)
                self.launcher_reference_computed = True
            return dataset.add_column(REF_COLUMNS[0], cached[0]).add_column(REF_COLUMNS[1], cached[1])

    # dpo/kto with in_memory: no ref_model given, so TRL loads the frozen copy from the policy's own folder
    # (config name_or_path: the run dir's base for `tiny`, else model.name)
    return PreferenceTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)


def reference_path(spec: RunSpec) -> Path:
    """The cache folder of a full DPO run's reference log-probs (data/cache.py names it): the reference is the
    run's base model, in the run's precision."""
    from launcher.data.cache import reference_path as path_of
    from launcher.model.load import model_source

    return path_of(spec, model_source(spec), spec.precision.dtype)


def read_reference(folder: Path, split: str, rows: int) -> tuple[list[float], list[float]] | None:
    """A split's cached (chosen, rejected) log-probs, or None when not cached (or cached for other rows)."""
    path = folder / f"{split}.json"
    if not (folder / "meta.json").is_file() or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if len(data["chosen"]) != rows:
        return None
    return data["chosen"], data["rejected"]


def write_reference(folder: Path, split: str, chosen: list[float], rejected: list[float]) -> None:
    """Global rank 0 writes a split's reference log-probs (every rank holds them all), atomically; meta.json
    last marks the folder complete."""
    if identity.rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in ((f"{split}.json", {"chosen": chosen, "rejected": rejected}),
                          ("meta.json", {"splits": sorted({*(p.stem for p in folder.glob("*.json")
                                                             if p.name != "meta.json"), split}),
                                         "time": time.time()})):
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload) + "\n")
        os.replace(tmp, folder / name)


def reference_logps(trainer: Any, dataset: Any, batch_size: int) -> tuple[list[float], list[float]]:
    """Sum of the reference's log-probs over each row's chosen and rejected response, in row order, on every
    rank: the rows are split over the ranks and gathered back (TRL's compute_ref_log_probs per batch). Under
    DeepSpeed the model is wrapped in an inference engine first (ZeRO-3 gathers each layer as it runs)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False,
                        num_workers=0)
    loader = trainer.accelerator.prepare(loader)
    model = trainer.ref_model or trainer.model
    if trainer.ref_model is None and trainer.is_deepspeed_enabled:
        if getattr(trainer, "_precompute_engine", None) is None:
            from trl.models.utils import prepare_deepspeed

            trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
        model = trainer._precompute_engine
    chosen, rejected = [], []
    for batch in loader:
        c, r = trainer.compute_ref_log_probs(model, batch)
        c, r = trainer.accelerator.gather_for_metrics((c, r))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen).tolist(), torch.cat(rejected).tolist()
