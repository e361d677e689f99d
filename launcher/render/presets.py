"""The DeepSpeed presets shipped in ds_configs/: each a spec fragment rendered without a model or a
world size, so DeepSpeed derives train_batch_size wherever it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.config.spec import validate
from launcher.render import deepspeed as ds_render

NVME_PLACEHOLDER = "/local_nvme"

PRESETS: dict[str, dict[str, Any]] = {}
for _prec in ("bf16", "fp16"):
    for _stage in (0, 1, 2, 3):
        PRESETS[f"zero{_stage}_{_prec}"] = {"zero": {"stage": _stage}, "precision": _prec}
    PRESETS[f"zero2_offload_{_prec}"] = {"zero": {"stage": 2, "offload_optimizer": "cpu"}, "precision": _prec}
    PRESETS[f"zero3_offload_{_prec}"] = {
        "zero": {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}, "precision": _prec}
PRESETS["zero3_offload_nvme_bf16"] = {
    "zero": {"stage": 3, "offload_optimizer": "nvme", "offload_param": "nvme", "nvme_path": NVME_PLACEHOLDER},
    "precision": "bf16"}


def render_preset(name: str) -> dict[str, Any]:
    # A preset serves any script and trainer; the schedule belongs to the training arguments (render has none).
    return ds_render.render(validate(PRESETS[name]), None, preset=True)


def dumps(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PRESETS:
        path = folder / f"{name}.json"
        path.write_text(dumps(render_preset(name)))
        written.append(path)
    return written
