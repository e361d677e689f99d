"""The setups of a bench: matrix files, the axes whose product is the setups, their labels, and the spec
each setup runs (plus which setups a baseline run stands beside). No measuring here, and no torch."""

from __future__ import annotations

import itertools
import typing
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from launcher import yamlio
from launcher.config import profiles
from launcher.config.flags import annotation
from launcher.config.resolve import deep_merge, user_tree, with_overrides
from launcher.config.spec import RunSpec, expand_shorthands, validate
from launcher.errors import SpecError, UserError
from launcher.plan import hardware
from launcher.plan.plan import make_plan
from launcher.plan.price import usd_per_device_hour as profile_price

# Axes of a matrix, each a spec field, in the order a setup's label names them.
AXES: dict[str, str] = {
    "method": "method.name",
    "zero": "zero.stage",
    "attn": "model.attn",
    "grad_ckpt": "model.grad_ckpt",
    "micro_batch": "optim.micro_batch",
    "seq_len": "data.seq_len",
    "precision": "precision.dtype",
    "loss": "optim.loss",
    "compile": "model.compile",
}
_SWITCHES = ("grad_ckpt", "compile")  # on/off axes
DEFAULT_STEPS, DEFAULT_WARMUP = 10, 3


def parse_axis(axis: str, text: str | Iterable[Any]) -> list[Any]:
    """A comma list (`full,lora`, `2,3`, `on,off`) or a YAML list -> typed values. UserError on junk."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(x == "" for x in items):
        raise UserError(f"--{axis.replace('_', '-')} {text!r}: give comma-separated values without empty items")
    out: list[Any] = []
    for x in items:
        if axis == "zero" and str(x) == "auto":
            out.append("auto")
        elif axis in ("zero", "micro_batch", "seq_len"):
            if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, str) and x.isdigit())):
                raise UserError(f"--{axis.replace('_', '-')}: {x!r} is not a whole number")
            out.append(int(x))
        elif axis in _SWITCHES:
            v = {"on": True, "true": True, "yes": True, "1": True,
                 "off": False, "false": False, "no": False, "0": False}.get(str(x).lower())
            if v is None:
                raise UserError(f"--{axis.replace('_', '-')}: {x!r} is not on or off")
            out.append(v)
        elif axis in AXES:
            choices = _choices(AXES[axis])
            if choices and str(x) not in choices:
                raise UserError(f"--{axis.replace('_', '-')}: {x!r} is not one of {', '.join(choices)}")
            out.append(str(x))
        else:
            raise UserError(f"unknown matrix axis {axis!r}; axes are {', '.join(AXES)}")
    if len(set(map(repr, out))) != len(out):
        raise UserError(f"--{axis.replace('_', '-')} {text!r}: a value is given twice")
    return out


def _choices(field: str) -> list[str]:
    """The words a spec field takes (its Literal), [] for a free-form one."""
    ann = annotation(field)
    return [str(v) for v in typing.get_args(ann)] if typing.get_origin(ann) is typing.Literal else []


@dataclass
class Matrix:
    """A matrix file: spec fields every setup shares, the axes whose product is the setups, settings."""

    name: str = "bench"
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    steps: int | None = None
    warmup: int | None = None
    usd_per_device_hour: float | None = None
    device_tflops: float | None = None
    baseline: bool = False


_MATRIX_KEYS = {"name", "base", "axes", "steps", "warmup", "usd_per_device_hour", "device_tflops", "baseline",
                "description"}


def load_matrix(path: str | Path) -> Matrix:
    data = yamlio.load_file(path) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a bench matrix is a YAML mapping (name, base, axes, steps, warmup, ...)")
    unknown = sorted(set(data) - _MATRIX_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a matrix has {', '.join(sorted(_MATRIX_KEYS))}")
    base = data.get("base") or {}
    axes_in = data.get("axes") or {}
    if not isinstance(base, dict) or not isinstance(axes_in, dict):
        raise UserError(f"{path}: 'base' is a run spec mapping and 'axes' maps {', '.join(AXES)} to lists")
    axes = {}
    for k, v in axes_in.items():
        if k not in AXES:
            raise UserError(f"{path}: axes.{k} is not an axis; axes are {', '.join(AXES)}")
        axes[k] = parse_axis(k, v if isinstance(v, list) else [v])
    for key in ("usd_per_device_hour", "device_tflops"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v < 0 or (key == "device_tflops" and v == 0)):
            raise UserError(f"{path}: {key} is {yamlio.quote(v)}; give a plain number "
                            f"({'> 0' if key == 'device_tflops' else '>= 0'})", field=key)
    m = Matrix(name=str(data.get("name") or Path(path).stem), base=base, axes=axes,
               steps=data.get("steps"), warmup=data.get("warmup"),
               usd_per_device_hour=data.get("usd_per_device_hour"), device_tflops=data.get("device_tflops"),
               baseline=bool(data.get("baseline", False)))
    for key in ("steps", "warmup"):
        v = getattr(m, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "steps" else 0)):
            raise UserError(f"{path}: {key} must be a whole number ({'>= 1' if key == 'steps' else '>= 0'})")
    return m


def resolve_base(matrix_base: dict[str, Any], spec_path: str | None, flags: dict[str, Any], sets: list[str],
                 cluster: str | None = None, clusters_file: str | None = None) -> RunSpec:
    """The spec every setup starts from: profile < matrix base < SPEC < flags < --set (as
    profiles.resolve, with the matrix's base one layer under the spec file)."""
    tree = deep_merge(expand_shorthands(matrix_base), user_tree(spec_path, flags, sets))
    if not cluster:
        profiles.check_file(clusters_file)
        return validate(tree)
    profile = profiles.load(cluster, clusters_file)
    part = tree.get("cluster", {}).get("partition") if isinstance(tree.get("cluster"), dict) else None
    spec = validate(deep_merge(profile.layer(part if isinstance(part, str) else None), tree))
    problems = profiles.check_limits(spec, profile)
    if problems:
        raise SpecError(problems)
    return spec


@dataclass(frozen=True)
class Setup:
    index: int
    values: dict[str, Any]  # the axis values of this setup
    spec: RunSpec | None  # None when the combination is refused (error says why)
    error: str | None = None

    @property
    def label(self) -> str:
        return setup_label(self.values)


def setup_label(v: dict[str, Any]) -> str:
    """The axis values, `auto` ones as auto (the row's columns say what each became)."""
    return (f"{v['method']} z{v['zero']} {v['attn']} {'ckpt' if v['grad_ckpt'] else 'nockpt'} "
            f"mb{v['micro_batch']} s{v['seq_len']} {v.get('precision', 'auto')} {v.get('loss', 'auto')}"
            + (" compile" if v.get("compile") else ""))


def baseline_label(v: dict[str, Any]) -> str:
    return f"HF baseline {v['method']} sdpa {'ckpt' if v['grad_ckpt'] else 'nockpt'} mb{v['micro_batch']} s{v['seq_len']}"


def baseline_key(v: dict[str, Any]) -> tuple[Any, ...]:
    """Setups that share one baseline run: the baseline has no ZeRO stage and always runs sdpa."""
    return (v["method"], bool(v["grad_ckpt"]), v["micro_batch"], v["seq_len"], v.get("precision", "auto"))


def baseline_setups(setups: list[Setup]) -> list[Setup]:
    """The first runnable setup of each baseline key, on one device (the baseline is one process)."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for s in setups:
        if s.spec is None or baseline_key(s.values) in seen or make_plan(s.spec).world_size != 1:
            continue
        seen.add(baseline_key(s.values))
        out.append(s)
    return out


def _axis_value(spec: RunSpec, axis: str) -> Any:
    node: Any = spec
    for part in AXES[axis].split("."):
        node = getattr(node, part)
    return node


def expand(spec: RunSpec, axes: dict[str, list[Any]]) -> list[Setup]:
    """One setup per combination (axes in AXES order, the first varying slowest); an axis not given
    keeps the spec's value. A combination the spec refuses is a Setup with its error, not a crash."""
    lists = [axes.get(a) or [_axis_value(spec, a)] for a in AXES]
    out = []
    for i, combo in enumerate(itertools.product(*lists)):
        values = dict(zip(AXES, combo))
        tree = spec.to_dict()
        for axis, value in values.items():
            section, key = AXES[axis].split(".")
            tree = deep_merge(tree, {section: {key: value}})
        try:
            out.append(Setup(i, values, validate(tree)))
        except SpecError as exc:
            out.append(Setup(i, values, None, f"refused: {exc}"))
    return out


def bench_spec(spec: RunSpec, out_dir: Path, steps: int, warmup: int, index: int) -> RunSpec:
    """The setup's spec as the bench runs it: warmup + steps optimizer steps and one more, untimed,
    in which the held tensors are counted; no checkpoints, no eval, no TensorBoard, never resumed."""
    total = warmup + steps + 1
    return with_overrides(spec, {
        "name": f"bench-{index}",
        # the learning-rate warm-up does not change a step's cost; kept below the step count it must be under
        "optim": {"max_steps": total, "warmup_steps": min(spec.optim.warmup_steps, total - 1)},
        "data": {"eval_fraction": 0.0},
        "output": {"dir": str(out_dir), "save_every": 0, "log_every": 1, "resume": "never", "tensorboard": False},
    })


@dataclass(frozen=True)
class Options:
    """How every setup of one bench is measured and priced."""

    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    usd_per_device_hour: float | None = None
    device_tflops: float | None = None
    gpu: str | None = None  # device-table key that overrides the detected one
    baseline: bool = False
    bench: str = "bench"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Bench:
    """A bench as asked for: its setups (refused ones included) and the options they all share."""

    setups: list[Setup]
    options: Options


def make_bench(*, matrix: str | None, spec: str | None, axes: dict[str, str | None], flags: dict[str, Any],
               sets: list[str], cluster: str | None = None, clusters_file: str | None = None,
               steps: int | None = None, warmup: int | None = None, usd_per_device_hour: float | None = None,
               device_tflops: float | None = None, gpu: str | None = None, baseline: bool = False,
               name: str = "bench") -> Bench:
    """The bench the command line describes: the matrix file (if any) under SPEC, the flags and --set;
    axis comma lists replace the matrix's axes; the settings given win over the matrix's, which win
    over the defaults (and the cluster section's price). `name` names a bench without a matrix file."""
    if gpu:
        device = hardware.find(gpu)
        if device is None:
            raise UserError(f"--gpu {gpu!r} is not in the table ({', '.join(hardware.DEVICES)}); give --device-tflops "
                            f"instead")
        gpu = device.key
    m = load_matrix(matrix) if matrix else Matrix(name=name)
    chosen = dict(m.axes)
    for axis in AXES:
        if axes.get(axis) is not None:
            chosen[axis] = parse_axis(axis, axes[axis])  # type: ignore[arg-type]
    base = resolve_base(m.base, spec, flags, sets, cluster, clusters_file)
    model = Path(base.model.name).expanduser()
    if base.model.name.startswith((".", "/", "~")) and not model.is_dir():
        raise UserError(f"model {base.model.name}: no such directory; build a benchmark shape with "
                        f"`python benchmarks/make_model.py llama-3.2-1b|llama-3-8b --out {base.model.name}`")
    price = usd_per_device_hour if usd_per_device_hour is not None else m.usd_per_device_hour
    if price is None:
        price = profile_price(base.cluster)
    opts = Options(
        steps=steps or m.steps or DEFAULT_STEPS,
        warmup=warmup if warmup is not None else (m.warmup if m.warmup is not None else DEFAULT_WARMUP),
        usd_per_device_hour=price, device_tflops=device_tflops or m.device_tflops, gpu=gpu,
        baseline=bool(baseline or m.baseline), bench=m.name)
    return Bench(expand(base, chosen), opts)
