"""What the Python that runs the ranks must have: the version floors of the packages launcher runs on (the
same floors as pyproject.toml, a test keeps them equal) and whether FlashAttention-2 really imports.

Stdlib at import: pre-flight and `doctor` read versions from package metadata without importing torch.
"""

from __future__ import annotations

import re
from typing import Mapping

from launcher.rundir.manifest import package_versions

# package -> (floor, why). Each floor is the version the whole suite runs on (tests/constraints.txt):
# nothing older is proven, and these are known to break.
FLOORS: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "the job script's `torchrun --signals-to-handle` needs torch 2.9 or newer"),
    "deepspeed": ("0.19.8", "LoRA/QLoRA with ZeRO-3 and non-reentrant checkpointing fails on 0.19.2 and older "
                  "(DeepSpeed PR 8148)"),
    "transformers": ("5.23.0", "activation_checkpointing_enable, from_pretrained(dtype=) and "
                     "Trainer(processing_class=) are transformers 5 names"),
    "peft": ("0.21.2", "the adapter methods are tested on it"),
    "accelerate": ("1.15.0", "the Trainer's DeepSpeed integration is tested on it"),
    "datasets": ("5.2.0", "data preparation is tested on it"),
    "bitsandbytes": ("0.50.2", "QLoRA's 4-bit storage (quant storage = compute dtype for ZeRO-3) is tested on it"),
}


def _release(text: str) -> tuple[int, ...]:
    """The release numbers of a version string: '2.13.0+cu128' -> (2, 13, 0); '0.19.2rc1' -> (0, 19, 2)."""
    nums = []
    for part in text.split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
        if m.end() < len(part):  # 2rc1, 0a0: a pre-release of this number
            break
    return tuple(nums)


def below_floor(name: str, version: str | None) -> str | None:
    """What to change when `version` of `name` is older than launcher's floor (None: fine or not installed)."""
    if version is None or name not in FLOORS:
        return None
    floor, why = FLOORS[name]
    have, need = _release(version), _release(floor)
    n = max(len(have), len(need))
    if have + (0,) * (n - len(have)) >= need + (0,) * (n - len(need)):
        return None
    return (f"{name} {version} is older than launcher's floor {floor} ({why}); install {name}>={floor} where the "
            f"ranks run (pip install '{name}>={floor}', or a container image that has it)")


def version_problems(versions: Mapping[str, str | None]) -> list[str]:
    """One line per package below its floor, from a name -> version mapping (package metadata)."""
    return [p for name, v in versions.items() if (p := below_floor(name, v)) is not None]


def installed_versions() -> dict[str, str | None]:
    """This Python's versions of the packages with floors (metadata only, nothing imported)."""
    return package_versions(tuple(FLOORS), missing=True)


def first_line(exc: BaseException) -> str:
    """An exception as one bounded line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def flash_attn_import_error() -> str | None:
    """None when `import flash_attn` works here; else the error, one line (the usual one is an
    `undefined symbol` after torch was upgraded under a compiled flash_attn: found, but never loads)."""
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # an ImportError or OSError from the compiled extension, whatever it raises
        return first_line(exc)
    return None
