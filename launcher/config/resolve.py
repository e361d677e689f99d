"""The layers of a run spec merged into one RunSpec. Later layers win, and only over fields a layer really
set (defaults fill only what no layer set): cluster profile < spec file < CLI flags < `--set key=value`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from launcher import yamlio
from launcher.config.flags import FLAG_FIELDS
from launcher.config.spec import RunSpec, expand_shorthands, validate
from launcher.errors import SpecError


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, recursively for mappings; lists and scalars are replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set a.b=value` pairs; the value is read as YAML (so `2`, `true`, `[q_proj, v_proj]` work)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise SpecError(f"--set {item!r}: expected dotted.key=value, for example --set optim.lr=1e-4")
        value = yamlio.loads(raw, source=f"--set {key}") if raw.strip() else ""
        _set_dotted(tree, key, value)
    return tree


def flags_to_tree(flags: dict[str, Any]) -> dict[str, Any]:
    """CLI flags that were given (None = not given) as a nested spec fragment."""
    tree: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        _set_dotted(tree, FLAG_FIELDS[name], value)
    return tree


def user_tree(
    spec_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The user's layers merged, unvalidated: spec file < flags < --set."""
    layers: list[dict[str, Any]] = []
    if spec_path is not None:
        data = yamlio.load_file(spec_path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SpecError(f"{spec_path}: a run spec is a YAML mapping of sections (model:, data:, ...), "
                            f"not a {type(data).__name__}")
        layers.append(data)
    layers.append(flags_to_tree(flags or {}))
    layers.append(parse_set(list(sets)))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, expand_shorthands(layer))
    return merged


def resolve(
    spec_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    profile: dict[str, Any] | None = None,
) -> RunSpec:
    """Merge profile < file < flags < --set and validate once. Raises SpecError with every problem."""
    return validate(deep_merge(expand_shorthands(profile or {}), user_tree(spec_path, flags, sets)))


def with_overrides(spec: RunSpec, tree: dict[str, Any]) -> RunSpec:
    """`spec` with the fields of `tree` set over it, validated again."""
    return validate(deep_merge(spec.to_dict(), tree))
