"""`launcher bench`: measured tokens/s, MFU, memory and $ per 1M tokens per setup, beside the estimate.

Each setup trains through the product's own path: `launcher.rank.loop.train` (the run dir's
DeepSpeed JSON, the launcher's model, data and Trainer), started by the same deepspeed launcher as
`launcher run`. The ranks run `python -m launcher.bench.run rank SPEC`, which adds one measuring
callback to that Trainer and nothing else. Timing: the device is synchronized at the end of every
optimizer step; the first `warmup` steps are left out; throughput is the wall time of the next
`steps` steps, everything the loop does in them included (data, logging). Heavy imports live
inside the functions: the CLI's --help must not load torch.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from launcher.errors import SpecError, UserError
from launcher.config.spec import RunSpec

ROOT = Path(__file__).resolve().parent.parent
BASELINE_SCRIPT = ROOT / "benchmarks" / "baseline_hf.py"
TASK_FILE = "bench_task.json"  # in each setup's run dir: what the ranks measure and how
SETTINGS_FILE = "bench.json"  # in a --slurm bench dir: the options `collect` needs
RESULTS_JSONL, RESULTS_CSV = "results.jsonl", "results.csv"
PLOTS = ("tokens_per_s.png", "usd_per_mtok.png", "memory.png")
# Axes of a matrix: the six, each a spec field, in the order a setup's label names them.
AXES: dict[str, str] = {
    "method": "method.name",
    "zero": "zero.stage",
    "attn": "model.attn",
    "grad_ckpt": "model.grad_ckpt",
    "micro_batch": "optim.micro_batch",
    "seq_len": "data.seq_len",
}
DEFAULT_STEPS, DEFAULT_WARMUP = 10, 3

COLUMNS = [
    "bench", "kind", "setup", "method", "zero", "attn", "grad_ckpt", "micro_batch", "seq_len", "precision",
    "device", "devices", "steps", "warmup", "tokens_per_step",
    "tokens_per_s", "tokens_per_s_per_device", "step_time_s", "step_time_median_s",
    "model_flops_per_token", "hardware_flops_per_token", "flops_note",
    "model_tflops_per_device", "hardware_tflops_per_device", "peak_tflops_per_device", "mfu", "hfu",
    "peak_mem_bytes", "peak_mem_reserved_bytes", "rss_peak_bytes", "engine_tensor_bytes",
    "usd_per_device_hour", "usd_per_mtok",
    "est_peak_bytes", "est_model_states_bytes", "est_mem_basis", "est_mem_bytes", "measured_mem_bytes",
    "mem_error", "est_tokens_per_s", "tokens_per_s_error",
    "baseline_tokens_per_s", "speedup_vs_baseline", "baseline_mem_bytes", "mem_vs_baseline",
    "error",
]


# =========================================================================== matrix

def parse_axis(axis: str, text: str | Iterable[Any]) -> list[Any]:
    """A comma list (`full,lora`, `2,3`, `on,off`) or a YAML list -> typed values. UserError on junk."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(x == "" for x in items):
        raise UserError(f"--{axis.replace('_', '-')} {text!r}: give comma-separated values without empty items")
    out: list[Any] = []
    for x in items:
        if axis in ("zero", "micro_batch", "seq_len"):
            if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, str) and x.isdigit())):
                raise UserError(f"--{axis.replace('_', '-')}: {x!r} is not a whole number")
            out.append(int(x))
        elif axis == "grad_ckpt":
            v = {"on": True, "true": True, "yes": True, "1": True,
                 "off": False, "false": False, "no": False, "0": False}.get(str(x).lower())
            if v is None:
                raise UserError(f"--grad-ckpt: {x!r} is not on or off")
            out.append(v)
        elif axis in AXES:
            out.append(str(x))
        else:
            raise UserError(f"unknown matrix axis {axis!r}; axes are {', '.join(AXES)}")
    if len(set(map(repr, out))) != len(out):
        raise UserError(f"--{axis.replace('_', '-')} {text!r}: a value is given twice")
    return out


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
    from launcher import yamlio

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
    from launcher.config import profiles
    from launcher.config.spec import deep_merge, user_tree, validate

    tree = deep_merge(matrix_base, user_tree(spec_path, flags, sets))
    if not cluster:
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
    return (f"{v['method']} z{v['zero']} {v['attn']} {'ckpt' if v['grad_ckpt'] else 'nockpt'} "
            f"mb{v['micro_batch']} s{v['seq_len']}")


def baseline_label(v: dict[str, Any]) -> str:
    return f"HF baseline {v['method']} sdpa {'ckpt' if v['grad_ckpt'] else 'nockpt'} mb{v['micro_batch']} s{v['seq_len']}"


def baseline_key(v: dict[str, Any]) -> tuple[Any, ...]:
    """Setups that share one baseline run: the baseline has no ZeRO stage and always runs sdpa."""
    return (v["method"], bool(v["grad_ckpt"]), v["micro_batch"], v["seq_len"])


def baseline_setups(setups: list[Setup]) -> list[Setup]:
    """The first runnable setup of each baseline key, on one device (the baseline is one process)."""
    from launcher.plan.plan import make_plan

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
    from launcher.config.spec import deep_merge, validate

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
    from launcher.config.spec import deep_merge, validate

    total = warmup + steps + 1
    return validate(deep_merge(spec.to_dict(), {
        "name": f"bench-{index}",
        # the learning-rate warm-up does not change a step's cost; kept below the step count it must be under
        "optim": {"max_steps": total, "warmup_steps": min(spec.optim.warmup_steps, total - 1)},
        "data": {"eval_fraction": 0.0},
        "output": {"dir": str(out_dir), "save_every": 0, "log_every": 1, "resume": "never", "tensorboard": False},
    }))


# =========================================================================== arithmetic

def usd_per_mtok(usd_per_device_hour: float | None, devices: int, tokens_per_s: float | None) -> float | None:
    """$ per 1M tokens = price x devices / 3600 / tokens_per_s x 1e6."""
    if usd_per_device_hour is None or not tokens_per_s:
        return None
    return usd_per_device_hour * devices / 3600 / tokens_per_s * 1e6


def utilization(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float | None) -> tuple[float, float | None]:
    """(TFLOP/s per device, share of the device's peak or None without a peak)."""
    tflops = flops_per_token * tokens_per_s_per_device / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def timed_window(t_begin: float, step_ends: list[float], warmup: int, steps: int) -> float:
    """Seconds of the `steps` optimizer steps after the first `warmup` (synchronized step ends)."""
    if len(step_ends) < warmup + steps:
        raise ValueError(f"{len(step_ends)} steps ran, the window needs {warmup + steps}")
    start = step_ends[warmup - 1] if warmup > 0 else t_begin
    return step_ends[warmup + steps - 1] - start


def device_key(name: str | None) -> str | None:
    """The estimator's device-table key for a torch device name ('NVIDIA H100 80GB HBM3' -> H100-80GB)."""
    from launcher.plan.estimate import DEVICES

    if not name:
        return None
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100-80GB"
    if "A100" in n:
        return "A100-40GB" if "40GB" in n else "A100-80GB"
    for key in ("L40S", "A10G"):
        if key in n:
            return key
    if "L4" in n.split() or n.endswith(" L4"):
        return "L4"
    return name if name in DEVICES else None


def peak_tflops(spec: RunSpec, device: str | None, override: float | None) -> float | None:
    """Dense peak per device for the training precision: --device-tflops, else the known GPU table."""
    from launcher.plan.estimate import DEVICES

    if override:
        return override
    dev = DEVICES.get(device) if device else None
    if dev is None:
        return None
    return dev.tflops_32bit if spec.precision.dtype == "fp32" else dev.tflops_16bit


def flops_note(spec: RunSpec) -> str:
    s = ("model FLOPs/token = 6 x matmul weights (LM head in, embedding lookup out) + attention "
         "12 x layers x d x seq / 2 (causal)")
    if spec.method.name != "full":
        s += "; frozen base weights count 4 (forward + input gradient, no weight gradient), adapters 6"
    if spec.model.grad_ckpt:
        s += "; HFU adds the recomputed forward (2 x weights + attention / 3)"
    return s


# =========================================================================== options, rows

@dataclass(frozen=True)
class Options:
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    usd_per_device_hour: float | None = None
    device_tflops: float | None = None
    gpu: str | None = None  # device-table key that overrides the detected one
    baseline: bool = False
    bench: str = "bench"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _max(values: Iterable[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def measured_columns(records: list[dict[str, Any]], tokens_per_step: int, warmup: int, steps: int) -> dict[str, Any]:
    """Throughput and memory from the ranks' records (rank 0's clock; memory: the largest rank)."""
    if not records:
        return {"error": "no measurement was written (the ranks did not start; see the setup's logs/bench.log)"}
    errors = [r["error"] for r in records if r.get("error")]
    first = min(records, key=lambda r: r.get("rank", 0))
    devices = int(first.get("world_size", 1))
    cols: dict[str, Any] = {
        "device": first.get("device"), "devices": devices, "tokens_per_step": tokens_per_step,
        "peak_mem_reserved_bytes": _max(r.get("cuda_peak_reserved") for r in records),
        "rss_peak_bytes": _max(r.get("rss_peak_bytes") for r in records),
        "engine_tensor_bytes": _max((r.get("tensor_bytes") or {}).get("total") for r in records),
    }
    cuda = _max(r.get("cuda_peak_allocated") for r in records)
    cols["peak_mem_bytes"] = cuda if cuda is not None else cols["rss_peak_bytes"]
    if errors:
        cols["error"] = errors[0]
        return cols
    try:
        seconds = timed_window(first["t_begin"], first["step_ends"], warmup, steps)
    except ValueError as exc:
        cols["error"] = str(exc)
        return cols
    tps = steps * tokens_per_step / seconds
    ends = ([first["t_begin"]] + first["step_ends"])[warmup: warmup + steps + 1]
    per_step = sorted(b - a for a, b in zip(ends, ends[1:]))
    median = (per_step[(steps - 1) // 2] + per_step[steps // 2]) / 2
    # throughput is the window's mean; the median step beside it shows how steady the machine was
    cols.update(tokens_per_s=tps, tokens_per_s_per_device=tps / devices, step_time_s=seconds / steps,
                step_time_median_s=median)
    return cols


def make_row(spec: RunSpec, values: dict[str, Any], kind: str, records: list[dict[str, Any]], opts: Options,
             *, error: str | None = None) -> dict[str, Any]:
    """One result row: what was measured, what follows from it (MFU, $), and the estimate beside it."""
    from launcher.plan import estimate as est
    from launcher.plan.plan import make_plan

    plan = make_plan(spec)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(bench=opts.bench, kind=kind, setup=setup_label(values), **values, precision=spec.precision.dtype,
               devices=plan.world_size, steps=opts.steps, warmup=opts.warmup, tokens_per_step=plan.tokens_per_step,
               usd_per_device_hour=opts.usd_per_device_hour, flops_note=flops_note(spec))
    if kind == "baseline":
        row.update(setup=baseline_label(values), zero=None, attn="sdpa")  # no DeepSpeed; sdpa as the docs say
    if error is None:
        row.update(measured_columns(records, plan.tokens_per_step, opts.warmup, opts.steps))
    else:
        row["error"] = error
    on_gpu = plan.device == "cuda"
    dev = opts.gpu or (device_key(row["device"]) if on_gpu else None)
    try:
        e = est.estimate(spec, plan, device=dev if dev in est.DEVICES else None,
                         usd_per_device_hour=opts.usd_per_device_hour)
    except UserError as exc:  # an architecture the estimator does not count: the row stands without it
        row["flops_note"] = f"no estimate: {exc}"
        e = None
    if e is not None and kind == "baseline":  # the estimate is of our DeepSpeed setup: FLOPs only
        row.update(model_flops_per_token=e.model_flops_per_token, hardware_flops_per_token=e.hardware_flops_per_token,
                   measured_mem_bytes=row["peak_mem_bytes"] if on_gpu else row["engine_tensor_bytes"])
    elif e is not None:
        row.update(model_flops_per_token=e.model_flops_per_token, hardware_flops_per_token=e.hardware_flops_per_token,
                   est_peak_bytes=e.peak_bytes_per_gpu, est_model_states_bytes=e.model_states_bytes_per_gpu,
                   est_tokens_per_s=e.tokens_per_s)
        # What the estimate is checked against: CUDA's peak on a GPU; on CPU (no allocator peak
        # apart from the process's RSS) the tensors the engine holds against the model states.
        if on_gpu:
            row.update(est_mem_basis="peak vs CUDA max allocated", est_mem_bytes=e.peak_bytes_per_gpu,
                       measured_mem_bytes=row["peak_mem_bytes"])
        else:
            row.update(est_mem_basis="model states vs engine tensor bytes", est_mem_bytes=e.model_states_bytes_per_gpu,
                       measured_mem_bytes=row["engine_tensor_bytes"])
        if row["measured_mem_bytes"]:
            row["mem_error"] = row["est_mem_bytes"] / row["measured_mem_bytes"] - 1
    tps = row.get("tokens_per_s")
    if tps:
        peak = peak_tflops(spec, dev, opts.device_tflops)
        row["peak_tflops_per_device"] = peak
        if row["model_flops_per_token"] is not None:
            row["model_tflops_per_device"], row["mfu"] = utilization(row["model_flops_per_token"],
                                                                     row["tokens_per_s_per_device"], peak)
            row["hardware_tflops_per_device"], row["hfu"] = utilization(row["hardware_flops_per_token"],
                                                                        row["tokens_per_s_per_device"], peak)
        row["usd_per_mtok"] = usd_per_mtok(opts.usd_per_device_hour, row["devices"], tps)
        if row.get("est_tokens_per_s"):
            row["tokens_per_s_error"] = row["est_tokens_per_s"] / tps - 1
    return row


def attach_baseline(rows: list[dict[str, Any]]) -> None:
    """Our/baseline ratios on each launcher row with a baseline row of the same method, checkpointing,
    batch, sequence length and precision in the same bench."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["bench"], r.get("precision"), r.get("devices"), *baseline_key(r))

    base = {key(r): r for r in rows if r["kind"] == "baseline" and not r.get("error")}
    for r in rows:
        b = base.get(key(r))
        if r["kind"] != "launcher" or b is None:
            continue
        r["baseline_tokens_per_s"] = b.get("tokens_per_s")
        if r.get("tokens_per_s") and b.get("tokens_per_s"):
            r["speedup_vs_baseline"] = r["tokens_per_s"] / b["tokens_per_s"]
        r["baseline_mem_bytes"] = b.get("measured_mem_bytes")
        if r.get("measured_mem_bytes") and b.get("measured_mem_bytes"):
            r["mem_vs_baseline"] = r["measured_mem_bytes"] / b["measured_mem_bytes"]


# =========================================================================== output

def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / RESULTS_JSONL).open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with (out / RESULTS_CSV).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.1%}" if signed else f"{x:.1%}")


def table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    several = len({r.get("bench") for r in rows}) > 1
    t = Table(title="launcher bench", show_lines=False)
    if several:
        t.add_column("bench")
    for name, justify in (("setup", "left"), ("kind", "left"), ("dev", "right"), ("tokens/s", "right"),
                          ("tok/s/dev", "right"), ("step s", "right"), ("TFLOP/s/dev", "right"), ("MFU", "right"),
                          ("HFU", "right"), ("peak mem", "right"), ("est. mem (err)", "right"), ("$/1M tok", "right"),
                          ("vs baseline", "right"), ("error", "left")):
        t.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        est = "-" if r.get("est_mem_bytes") is None else f"{_gib(r['est_mem_bytes'])} ({_pct(r.get('mem_error'), True)})"
        vs = "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x"
        t.add_row(
            *([str(r.get("bench"))] if several else []), r["setup"], r["kind"], str(r.get("devices") or "-"),
            "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            "-" if r.get("tokens_per_s_per_device") is None else f"{r['tokens_per_s_per_device']:,.0f}",
            "-" if r.get("step_time_s") is None else f"{r['step_time_s']:.3f}",
            "-" if r.get("model_tflops_per_device") is None else f"{r['model_tflops_per_device']:.3g}",
            _pct(r.get("mfu")), _pct(r.get("hfu")), _gib(r.get("peak_mem_bytes")), est,
            "-" if r.get("usd_per_mtok") is None else f"{r['usd_per_mtok']:.4g}",
            vs, (r.get("error") or "")[:120],
        )
    return t


def plot(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """tokens_per_s.png and usd_per_mtok.png (a bar per row, ours and the baseline's in two colours)
    and memory.png (estimated vs measured per launcher row). Rows with an error have no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r.get("bench") for r in rows}) > 1
    labels = [f"{r['bench']}: {r['setup']}" if several else r["setup"] for r in rows]
    colours = {"launcher": "tab:blue", "baseline": "tab:orange"}
    height = max(2.5, 0.35 * len(rows) + 1.4)
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    def bars(key: str, title: str, xlabel: str, fname: str, note: str) -> None:
        fig, ax = plt.subplots(figsize=(9, height))
        xs = [r.get(key) if not r.get("error") else None for r in rows]
        b = ax.barh(range(len(rows)), [x or 0 for x in xs], color=[colours.get(r["kind"], "gray") for r in rows])
        for rect, x in zip(b, xs):
            if x is not None:
                ax.annotate(f"{x:,.0f}" if x >= 100 else f"{x:.3g}", (rect.get_width(), rect.get_y() + rect.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title, loc="left")
        kinds = [k for k in colours if any(r["kind"] == k for r in rows)]
        ax.legend([plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds],
                  ["launcher (DeepSpeed)" if k == "launcher" else "HF baseline" for k in kinds], fontsize=8,
                  loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
        if all(x is None for x in xs):
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")
        save(fig, fname)

    bars("tokens_per_s", "Training throughput (warm-up left out)", "tokens/s (all devices)", PLOTS[0],
         "no setup completed")
    bars("usd_per_mtok", "Cost per 1M trained tokens", "$ per 1M tokens", PLOTS[1],
         "no price: pass --usd-per-device-hour")

    mem = [(lab, r) for lab, r in zip(labels, rows) if r["kind"] == "launcher"
           and r.get("est_mem_bytes") is not None and r.get("measured_mem_bytes")]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.5 * len(mem) + 1.4)))
    ys = list(range(len(mem)))
    ax.barh([y - 0.2 for y in ys], [r["est_mem_bytes"] / 2**20 for _, r in mem], height=0.4, label="estimated")
    ax.barh([y + 0.2 for y in ys], [r["measured_mem_bytes"] / 2**20 for _, r in mem], height=0.4, label="measured")
    for y, (_, r) in zip(ys, mem):
        ax.annotate(f"{r['mem_error']:+.1%}", (max(r["est_mem_bytes"], r["measured_mem_bytes"]) / 2**20, y),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(ys, [lab for lab, _ in mem], fontsize=8)
    ax.invert_yaxis()
    bases = sorted({r["est_mem_basis"] for _, r in mem})
    ax.set_xlabel("MiB per device" + (f" ({'; '.join(bases)})" if bases else ""))
    ax.set_title("Memory: estimator vs measured (label: estimate error)")
    if mem:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no setup with both numbers", transform=ax.transAxes, ha="center", va="center")
    save(fig, PLOTS[2])
    return paths


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (results.md), for a README."""
    head = ["setup", "kind", "dev", "tokens/s", "step s", "TFLOP/s/dev", "MFU", "HFU", "peak mem", "est. mem",
            "mem err", "$/1M tok", "vs baseline", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["setup"], r["kind"], str(r.get("devices") or "-"),
            "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            "-" if r.get("step_time_s") is None else f"{r['step_time_s']:.3f}",
            "-" if r.get("model_tflops_per_device") is None else f"{r['model_tflops_per_device']:.3g}",
            _pct(r.get("mfu")), _pct(r.get("hfu")), _gib(r.get("peak_mem_bytes")),
            "-" if r.get("est_mem_bytes") is None else f"{_gib(r['est_mem_bytes'])} vs {_gib(r.get('measured_mem_bytes'))}",
            _pct(r.get("mem_error"), True),
            "-" if r.get("usd_per_mtok") is None else f"{r['usd_per_mtok']:.4g}",
            "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x",
            (r.get("error") or "").replace("|", "/")[:80],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finish(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Ratios, results.jsonl/csv/md and the plots."""
    attach_baseline(rows)
    write_results(out, rows)
    (out / "results.md").write_text(markdown(rows))
    return plot(out, rows)


# =========================================================================== running a setup here

def write_task(run_dir: Path, kind: str, values: dict[str, Any], opts: Options) -> None:
    (run_dir / TASK_FILE).write_text(json.dumps({"kind": kind, "values": values, **opts.to_dict()}, indent=2) + "\n")


def read_task(run_dir: Path) -> dict[str, Any]:
    p = run_dir / TASK_FILE
    if not p.is_file():
        raise UserError(f"{run_dir} has no {TASK_FILE}: not a bench setup (made by `launcher bench`)")
    return json.loads(p.read_text())


def task_options(task: dict[str, Any]) -> Options:
    return Options(**{k: task[k] for k in Options.__dataclass_fields__ if k in task})


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The ranks' records (RUN_DIR/bench/rank<R>.json), or the baseline's (its row's raw record)."""
    d = run_dir / "bench"
    if kind == "baseline":
        p = d / "baseline.json"
        if not p.is_file():
            return []
        data = json.loads(p.read_text())
        return [data.get("record", data)]
    return [json.loads(p.read_text()) for p in sorted(d.glob("rank*.json"))] if d.is_dir() else []


def rank_command(run_dir: Path, plan: Any) -> tuple[list[str], dict[str, str]]:
    """`launcher run`'s launch (deepspeed launcher, same environment), the ranks running the bench entry."""
    from launcher.submit.local import free_port, launch_command

    argv, env = launch_command(run_dir, plan, plan.nproc_per_node, master_port=free_port(), quiet=True)
    i = argv.index("--module")
    if argv[i + 1: i + 3] != ["launcher", "train"]:
        raise RuntimeError(f"launch_command changed shape: {argv}")
    return argv[: i + 1] + ["launcher.bench.run", "rank", str(run_dir / "spec.yaml")], env


def baseline_command(spec: RunSpec, plan: Any, run_dir: Path, opts: Options) -> list[str]:
    """argv of benchmarks/baseline_hf.py for this setup: same model, data, batch, precision, steps."""
    from launcher.data.build import data_files, datasets_builder
    from launcher.model.load import model_source

    if not BASELINE_SCRIPT.is_file():
        raise UserError(f"--baseline runs {BASELINE_SCRIPT}, which this installation lacks; run the bench from "
                        f"the source tree")
    fmt, files = data_files(spec)
    lo, q = spec.method.lora, spec.method.quant
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    argv = [sys.executable, str(BASELINE_SCRIPT),
            "--model", model_source(spec), "--out", str(run_dir / "bench" / "baseline.json"),
            "--output-dir", str(run_dir / "baseline"),
            "--data-format", "hub" if fmt == "hub" else str(datasets_builder(fmt)),
            "--text-field", spec.data.text_field, "--seq-len", str(plan.seq_len),
            "--micro-batch", str(plan.micro_batch), "--grad-accum", str(plan.grad_accum),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--method", spec.method.name,
            "--precision", spec.precision.dtype, "--attn", "sdpa",
            "--grad-ckpt" if spec.model.grad_ckpt else "--no-grad-ckpt",
            "--lr", str(spec.optim.lr), "--weight-decay", str(spec.optim.weight_decay),
            "--max-grad-norm", str(spec.optim.grad_clip), "--seed", str(spec.optim.seed),
            "--lora-r", str(lo.r), "--lora-alpha", str(lo.alpha), "--lora-dropout", str(lo.dropout),
            "--lora-targets", targets, "--quant-type", q.quant_type,
            "--double-quant" if q.double_quant else "--no-double-quant"]
    for f in ([spec.data.path] if fmt == "hub" else [str(x) for x in files]):
        argv += ["--data", str(f)]
    return argv


def baseline_env(plan: Any) -> dict[str, str]:
    """The ranks' environment minus the process-group variables: the baseline is one plain process."""
    from launcher.submit.local import launch_command

    _, env = launch_command("/nonexistent", plan, 1, quiet=True)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "LAUNCHER_RUN_DIR"):
        env.pop(k, None)
    return env


def _run_logged(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run argv in its own session with its output in `log`; INT/TERM reach its whole process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        except BaseException:  # the whole launch tree goes, not only the launcher
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def run_baseline(spec: RunSpec, plan: Any, run_dir: Path, opts: Options) -> int:
    if plan.world_size != 1:
        (run_dir / "bench").mkdir(parents=True, exist_ok=True)
        (run_dir / "bench" / "baseline.json").write_text(json.dumps(
            {"rank": 0, "world_size": plan.world_size, "error": "the baseline runs on one device; this setup has "
             f"{plan.world_size} ranks"}))
        return 2
    (run_dir / "bench").mkdir(parents=True, exist_ok=True)
    return _run_logged(baseline_command(spec, plan, run_dir, opts), baseline_env(plan), run_dir / "logs" / "baseline.log")


def _failure(run_dir: Path, code: int, log: Path) -> str:
    tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
    hint = next((x.strip() for x in reversed(tail) if "Error" in x or "error:" in x), "")
    return f"exit {code}{': ' + hint[:300] if hint else ''} (log: {log})"


def run_setup(setup: Setup, out: Path, opts: Options, *, with_baseline: bool = False,
              on_phase: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run one setup here (then the baseline, when asked); its rows. Failures become rows with the error."""
    from launcher.submit import local as launch

    d = out / "setups" / f"{setup.index:03d}"
    rows: list[dict[str, Any]] = []
    if setup.spec is None:
        return [_error_row(setup, opts, setup.error or "refused")]
    on_phase(f"{setup.label}: prepare")
    try:
        rd, spec, plan, _ = launch.prepare_run(bench_spec(setup.spec, d, opts.steps, opts.warmup, setup.index),
                                               d, force=True)
    except (UserError, SpecError) as exc:
        return [_error_row(setup, opts, str(exc))]
    write_task(rd.path, "launcher", setup.values, opts)
    on_phase(f"{setup.label}: launcher")
    argv, env = rank_command(rd.path, plan)
    log = rd.logs / "bench.log"
    code = _run_logged(argv, env, log)
    records = read_records(rd.path, "launcher")
    rows.append(make_row(spec, setup.values, "launcher", records, opts,
                         error=None if code == 0 or any(r.get("error") for r in records) else _failure(rd.path, code, log)))
    if with_baseline:
        on_phase(baseline_label(setup.values))
        code = run_baseline(spec, plan, rd.path, opts)
        records = read_records(rd.path, "baseline")
        blog = rd.logs / "baseline.log"
        rows.append(make_row(spec, setup.values, "baseline", records, opts,
                             error=None if code == 0 or any(r.get("error") for r in records) else _failure(rd.path, code, blog)))
    for sub in ("final", "base", "baseline", "checkpoints"):  # trained weights are not the result; logs stay
        shutil.rmtree(rd.path / sub, ignore_errors=True)
    return rows


def _error_row(setup: Setup, opts: Options, error: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(bench=opts.bench, kind="launcher", setup=setup.label, **setup.values, steps=opts.steps,
               warmup=opts.warmup, usd_per_device_hour=opts.usd_per_device_hour, error=error)
    if setup.spec is not None:
        row["precision"] = setup.spec.precision.dtype
    return row


def run_all(setups: list[Setup], out: Path, opts: Options, console: Any = None) -> list[dict[str, Any]]:
    """Every setup in turn with a progress bar; results.jsonl grows after each one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    partial = out / RESULTS_JSONL
    partial.write_text("")
    baselines = {s.index for s in baseline_setups(setups)} if opts.baseline else set()
    if opts.baseline and len(baselines) < len({baseline_key(s.values) for s in setups if s.spec is not None}):
        (console or Console(stderr=True)).print("note: the baseline runs on one device only; setups with more "
                                                "ranks get no baseline")
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task("", total=len(setups) + len(baselines))
        for s in setups:
            new = run_setup(s, out, opts, with_baseline=s.index in baselines,
                            on_phase=lambda text: progress.update(task, description=text))
            rows += new
            with partial.open("a") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
            progress.advance(task, 1 + (s.index in baselines))
            for r in new:
                progress.console.print(f"  {r['setup']}: " + (f"error: {r['error']}" if r.get("error") else
                                       f"{r['tokens_per_s']:,.0f} tokens/s"))
    return rows


def write_meta(out: Path, rows: list[dict[str, Any]], argv: list[str]) -> None:
    """OUT/meta.json: what measured these rows (device, library versions, commit, threads, load)."""
    import platform
    import time as _time

    commit = None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    meta = {
        "created": _time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["launcher", *argv]),
        "commit": commit, "devices": sorted({str(r["device"]) for r in rows if r.get("device")}),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "versions": versions(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# =========================================================================== Slurm

def rank_entry_script(script: str, array_tasks: int) -> str:
    """The sweep script with each task's ranks running the bench entry instead of `launcher train`."""
    old, new = '-m launcher train "$SPEC"', '-m launcher.bench.run rank "$SPEC"'
    if script.count(old) != 1 or array_tasks < 1:
        raise RuntimeError("the Slurm template no longer runs `-m launcher train \"$SPEC\"` once; "
                           "update launcher.bench.run.rank_entry_script")
    return script.replace(old, new)


def render_slurm(setups: list[Setup], out: Path, opts: Options, *, force: bool) -> tuple[Path, list[dict[str, Any]]]:
    """OUT/job.sbatch: one array task per setup (and per baseline), task i in OUT/tasks/<i>/."""
    from launcher.rundir import layout as rundir
    from launcher.plan.plan import make_plan
    from launcher.render.slurm import render_sbatch
    from launcher.data.build import check_data

    bad = [f"setup {s.index} ({s.label}): {s.error}" for s in setups if s.spec is None]
    if bad:
        raise SpecError(bad)
    tasks: list[tuple[str, Setup]] = [("launcher", s) for s in setups]
    if opts.baseline:
        tasks += [("baseline", s) for s in baseline_setups(setups)]
    out = Path(out).expanduser().resolve()
    specs = [bench_spec(s.spec, out / "tasks" / str(i), opts.steps, opts.warmup, s.index)  # type: ignore[arg-type]
             for i, (_, s) in enumerate(tasks)]
    first = specs[0]
    plan = make_plan(first)
    for sp in specs:
        check_data(sp)
    render_sbatch(first, plan, out, python=sys.executable, array_specs=specs)  # every check before writing
    rd, base, plan = rundir.create(out, first, force=force)
    created = []
    listing = []
    for i, ((kind, s), sp) in enumerate(zip(tasks, specs)):
        trd, tspec, _ = rundir.create(out / "tasks" / str(i), sp, force=force)
        write_task(trd.path, kind, s.values, opts)
        created.append(tspec)
        listing.append({"index": i, "dir": f"tasks/{i}", "kind": kind,
                        "setup": baseline_label(s.values) if kind == "baseline" else s.label, "values": s.values})
    script = rank_entry_script(render_sbatch(base, plan, rd.path, python=sys.executable, array_specs=created),
                               len(created))
    job = rd.path / "job.sbatch"
    job.write_text(script)
    job.chmod(0o700)
    (rd.path / SETTINGS_FILE).write_text(json.dumps({"options": opts.to_dict(), "tasks": listing}, indent=2) + "\n")
    return job, listing


# =========================================================================== collect

def rows_of(d: Path) -> list[dict[str, Any]]:
    """The rows a bench dir holds: its results.jsonl, or (a --slurm dir) rows made from its tasks."""
    from launcher.config.spec import resolve

    d = Path(d).expanduser().resolve()
    settings = d / SETTINGS_FILE
    if settings.is_file():
        info = json.loads(settings.read_text())
        opts = Options(**info["options"])
        rows = []
        for t in info["tasks"]:
            td = d / t["dir"]
            spec = resolve(td / "spec.yaml")
            records = read_records(td, t["kind"])
            err = None if records else "no measurement yet (task not run, still running, or it failed before training)"
            rows.append(make_row(spec, t["values"], t["kind"], records, opts, error=err))
        return rows
    if (d / RESULTS_JSONL).is_file():
        return read_results(d / RESULTS_JSONL)
    raise UserError(f"{d} holds no bench results ({RESULTS_JSONL}) and is not a `launcher bench --slurm` dir "
                    f"({SETTINGS_FILE})")


# =========================================================================== on the ranks

def tensor_bytes(module: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of the distinct tensor storages the model and its optimizer hold: parameters (ZeRO-3
    partitions, 4-bit quantization state included), gradients, buffers, and whatever the optimizer
    object graph keeps (fp32 master partitions, Adam moments, gradient partitions and buckets)."""
    import torch

    seen: set[tuple[str, int]] = set()
    visited: set[int] = set()

    def add(t: Any) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return 0
        key = (str(st.device), st.data_ptr())
        if st.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return int(st.nbytes())

    def walk(obj: Any, depth: int = 0) -> int:
        if depth > 10 or id(obj) in visited or len(visited) > 500_000:
            return 0
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            return add(obj) + add(getattr(obj, "ds_tensor", None)) + add(getattr(obj, "grad", None))
        if isinstance(obj, torch.nn.Module):
            return 0  # its parameters are counted from the module itself
        if isinstance(obj, dict):
            return sum(walk(k, depth + 1) + walk(v, depth + 1) for k, v in list(obj.items()))
        if isinstance(obj, (list, tuple, set, frozenset)):
            return sum(walk(v, depth + 1) for v in list(obj))
        top = type(obj).__module__.split(".")[0]
        if top in ("deepspeed", "torch", "accelerate", "transformers", "bitsandbytes", "peft") and hasattr(obj, "__dict__"):
            return walk(vars(obj), depth + 1)
        return 0

    weights = grads = 0
    for p in module.parameters():
        visited.add(id(p))
        weights += add(getattr(p, "ds_tensor", None)) + add(p.data)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            weights += walk(qs)
        grads += add(p.grad)
    for b in module.buffers():
        weights += add(b)
    opt = walk(optimizer) if optimizer is not None else 0
    return {"weights": weights, "gradients": grads, "optimizer": opt, "total": weights + grads + opt}


def make_probe() -> Any:
    """A TrainerCallback that times optimizer steps (device synchronized at each step's end), and at
    the end of training reads peak memory and the tensor bytes of the model + optimizer it trained."""
    import resource

    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    class StepProbe(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None
            self.t_begin = 0.0
            self.step_ends: list[float] = []
            self.end: dict[str, Any] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()  # the training peak, not the loading one
            sync()
            self.t_begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.step_ends.append(time.perf_counter())

        def _held(self) -> dict[str, int] | None:
            tr = self.trainer
            if tr is None:
                return None
            engine = getattr(tr, "deepspeed", None)
            module = engine.module if engine is not None else tr.model
            return tensor_bytes(module, engine.optimizer if engine is not None else tr.optimizer)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # The last step (after the timed window): gradients, master weights and the optimizer's
            # moments all exist just before the optimizer steps, which is what the model states
            # count. DeepSpeed steps inside the backward pass (accelerate), before any callback,
            # so the optimizer's own step is wrapped, once.
            tr = self.trainer
            if state.global_step != state.max_steps - 1 or tr is None:
                return
            engine = getattr(tr, "deepspeed", None)
            opt = engine.optimizer if engine is not None else tr.optimizer
            original = opt.step

            def step(*a: Any, **kw: Any) -> Any:
                opt.step = original
                self.end["tensor_bytes_before_step"] = self._held()
                return original(*a, **kw)

            opt.step = step

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            after = self._held()
            before = self.end.get("tensor_bytes_before_step")
            self.end.update(
                cuda_peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                cuda_peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                tensor_bytes_after_step=after,
                tensor_bytes=max((x for x in (before, after) if x), key=lambda x: x["total"], default=None),
            )

        def record(self) -> dict[str, Any]:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            return {
                "rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                "t_begin": self.t_begin, "step_ends": self.step_ends,
                "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
                "versions": versions(), **self.end,
            }

    return StepProbe()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def rank_main(spec_path: str) -> int:
    """`python -m launcher.bench.run rank SPEC`: on each rank, train SPEC's run dir through the launcher's
    loop with the probe, and write RUN_DIR/bench/rank<R>.json (or run the baseline for a baseline task)."""
    from launcher.plan.plan import make_plan
    from launcher.config.spec import resolve

    spec = resolve(spec_path)
    run_dir = Path(spec.output.dir)
    task = read_task(run_dir)
    opts = task_options(task)
    rank = int(os.environ.get("RANK", "0"))
    (run_dir / "bench").mkdir(parents=True, exist_ok=True)
    if task["kind"] == "baseline":  # a --slurm baseline task: one plain process, no DeepSpeed
        return run_baseline(spec, make_plan(spec), run_dir, opts) if rank == 0 else 0
    from launcher.rank.loop import train

    probe = make_probe()
    out = run_dir / "bench" / f"rank{rank}.json"
    try:
        train(spec, callbacks=[probe])
    except BaseException as exc:
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError)
        record = {**probe.record(), "error": ("out of memory: " if oom else f"{type(exc).__name__}: ") + str(exc)[:500],
                  "oom": oom}
        out.write_text(json.dumps(record) + "\n")
        raise
    out.write_text(json.dumps({**probe.record(), "error": None}) + "\n")
    from launcher.rank.entry import leave_process_group

    leave_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "rank":
        sys.exit("usage: python -m launcher.bench.run rank RUN_DIR/spec.yaml  (started by `launcher bench`)")
    try:
        sys.exit(rank_main(sys.argv[2]))
    except UserError as exc:  # written into the rank's record already; the exit code says what kind
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
