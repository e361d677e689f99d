"""What a bench reports: the measured columns of each setup's row, what follows from them (MFU, HFU,
$ per 1M tokens) and the estimate beside them; results.jsonl/csv/md, the table, the plots and meta.json.
Torch-free: rich and matplotlib are imported where the table and plots are drawn."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from launcher import assets
from launcher.bench.matrix import Options, Setup, baseline_key, baseline_label, setup_label
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan import estimate as est
from launcher.plan import hardware
from launcher.plan.plan import make_plan
from launcher.plan.price import usd_per_mtok_at

RESULTS_JSONL, RESULTS_CSV, RESULTS_MD = "results.jsonl", "results.csv", "results.md"
META_FILE = "meta.json"
PLOTS = ("tokens_per_s.png", "usd_per_mtok.png", "memory.png")

COLUMNS = [
    "bench", "kind", "setup", "method", "zero", "attn", "grad_ckpt", "micro_batch", "seq_len", "precision",
    "loss", "compile", "optimizer",
    "device", "devices", "steps", "warmup", "tokens_per_step",
    "tokens_per_s", "tokens_per_s_per_device", "step_time_s", "step_time_median_s", "first_step_s",
    "model_flops_per_token", "hardware_flops_per_token", "flops_note",
    "model_tflops_per_device", "hardware_tflops_per_device", "peak_tflops_per_device", "peak_basis", "mfu", "hfu",
    "peak_mem_bytes", "peak_mem_reserved_bytes", "rss_peak_bytes", "engine_tensor_bytes",
    "usd_per_device_hour", "usd_per_mtok",
    "est_peak_bytes", "est_model_states_bytes", "est_mem_basis", "est_mem_bytes", "measured_mem_bytes",
    "mem_error", "est_tokens_per_s", "tokens_per_s_error",
    "baseline_tokens_per_s", "speedup_vs_baseline", "baseline_mem_bytes", "mem_vs_baseline", "peak_vs_baseline",
    "error",
]


# =========================================================================== arithmetic

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
    """The hardware table's key for a torch device name ('NVIDIA H100 80GB HBM3' -> H100-80GB); None
    for a CPU or a GPU the table does not know."""
    dev = hardware.find(name)
    return dev.key if dev is not None else None


def peak_tflops(precision: str, device: str | None, override: float | None) -> float | None:
    """Dense peak per device for the training precision: --device-tflops, else the hardware table."""
    if override:
        return override
    dev = hardware.find(device)
    return hardware.peak_tflops(dev, precision) if dev is not None else None


def flops_note(spec: RunSpec) -> str:
    s = ("model FLOPs/token = 6 x matmul weights (LM head in, embedding lookup out) + attention "
         "12 x layers x d x seq / 2 (causal)")
    if spec.method.name != "full":
        s += "; frozen base weights count 4 (forward + input gradient, no weight gradient), adapters 6"
    if spec.model.grad_ckpt:
        s += "; HFU adds the recomputed forward (2 x weights + attention / 3)"
    return s


# =========================================================================== rows

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
    # the first step apart: it holds torch.compile's compile time (and oneDNN's first calls), never timed
    cols["first_step_s"] = first["step_ends"][0] - first["t_begin"] if first["step_ends"] else None
    median = (per_step[(steps - 1) // 2] + per_step[steps // 2]) / 2
    # throughput is the window's mean; the median step beside it shows how steady the machine was
    cols.update(tokens_per_s=tps, tokens_per_s_per_device=tps / devices, step_time_s=seconds / steps,
                step_time_median_s=median)
    return cols


def make_row(spec: RunSpec, values: dict[str, Any], kind: str, records: list[dict[str, Any]], opts: Options,
             *, error: str | None = None) -> dict[str, Any]:
    """One result row: what was measured, what follows from it (MFU, $), and the estimate beside it."""
    plan = make_plan(spec)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(values)
    # what ran: the plan's choices for the axes left auto
    row.update(bench=opts.bench, kind=kind, setup=setup_label(values), zero=plan.zero_stage, precision=plan.precision,
               loss=plan.loss, compile=spec.model.compile, optimizer=plan.optimizer, devices=plan.world_size,
               steps=opts.steps, warmup=opts.warmup, tokens_per_step=plan.tokens_per_step,
               usd_per_device_hour=opts.usd_per_device_hour, flops_note=flops_note(spec))
    if kind == "baseline":
        # no DeepSpeed; sdpa, the standard loss and torch's AdamW as the docs say
        row.update(setup=baseline_label(values), zero=None, attn="sdpa", loss="standard", compile=False,
                   optimizer="torch fused AdamW (the Trainer's default)")
    if error is None:
        row.update(measured_columns(records, plan.tokens_per_step, opts.warmup, opts.steps))
    else:
        row["error"] = error
    on_gpu = plan.device == "cuda"
    dev = opts.gpu or (device_key(row["device"]) if on_gpu else None)
    try:
        e = est.estimate(spec, plan, device=dev,
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
        # apart from the process's RSS) the tensors the engine holds inside the update against the model
        # states there: without ZeRO-3's allowance for gathered layers, which exist in forward and backward.
        if on_gpu:
            row.update(est_mem_basis="peak vs CUDA max allocated", est_mem_bytes=e.peak_bytes_per_gpu,
                       measured_mem_bytes=row["peak_mem_bytes"])
        else:
            row.update(est_mem_basis="model states vs engine tensor bytes",
                       est_mem_bytes=e.model_states_bytes_per_gpu - e.gathered_params_bytes_per_gpu,
                       measured_mem_bytes=row["engine_tensor_bytes"])
        if row["measured_mem_bytes"]:
            row["mem_error"] = row["est_mem_bytes"] / row["measured_mem_bytes"] - 1
    tps = row.get("tokens_per_s")
    if tps:
        peak = peak_tflops(plan.precision, dev, opts.device_tflops)
        if peak is None and not on_gpu:  # CPU: the bf16 matmul peak the rank measured on this machine
            peak = _max(r.get("cpu_bf16_peak_tflops") for r in records)
            row["peak_basis"] = "bf16 2048^3 matmul measured by the rank" if peak else None
        row["peak_tflops_per_device"] = peak
        if row["model_flops_per_token"] is not None:
            row["model_tflops_per_device"], row["mfu"] = utilization(row["model_flops_per_token"],
                                                                     row["tokens_per_s_per_device"], peak)
            row["hardware_tflops_per_device"], row["hfu"] = utilization(row["hardware_flops_per_token"],
                                                                        row["tokens_per_s_per_device"], peak)
        row["usd_per_mtok"] = usd_per_mtok_at(opts.usd_per_device_hour, row["devices"], tps)
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
        # the whole peak: CUDA's peak allocated on a GPU, the process's peak RSS on CPU
        if r.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
            r["peak_vs_baseline"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]


def error_row(setup: Setup, opts: Options, error: str) -> dict[str, Any]:
    """The row of a setup that never ran (refused, or its run dir could not be made)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(setup.values)
    row.update(bench=opts.bench, kind="launcher", setup=setup.label, steps=opts.steps,
               warmup=opts.warmup, usd_per_device_hour=opts.usd_per_device_hour, error=error)
    if setup.spec is not None:
        row["precision"] = make_plan(setup.spec).precision
    return row


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


def _ran_as(r: dict[str, Any]) -> str:
    """What a row ran as, the `auto`s resolved: ZeRO stage, precision, loss, compile."""
    parts = [f"z{r['zero']}" if r.get("zero") is not None else "no DeepSpeed", r.get("precision") or "",
             r.get("loss") or "", "compiled" if r.get("compile") else ""]
    return " ".join(p for p in parts if p)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (results.md), for a README."""
    head = ["setup", "kind", "ran as", "dev", "tokens/s", "step s", "first step s", "TFLOP/s/dev", "MFU", "HFU",
            "peak mem", "est. mem", "mem err", "$/1M tok", "vs baseline", "peak mem vs baseline", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["setup"], r["kind"], _ran_as(r), str(r.get("devices") or "-"),
            "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            "-" if r.get("step_time_s") is None else f"{r['step_time_s']:.3f}",
            "-" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}",
            "-" if r.get("model_tflops_per_device") is None else f"{r['model_tflops_per_device']:.3g}",
            _pct(r.get("mfu")), _pct(r.get("hfu")), _gib(r.get("peak_mem_bytes")),
            "-" if r.get("est_mem_bytes") is None else f"{_gib(r['est_mem_bytes'])} vs {_gib(r.get('measured_mem_bytes'))}",
            _pct(r.get("mem_error"), True),
            "-" if r.get("usd_per_mtok") is None else f"{r['usd_per_mtok']:.4g}",
            "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x",
            "-" if r.get("peak_vs_baseline") is None else f"{r['peak_vs_baseline']:.2f}x",
            (r.get("error") or "").replace("|", "/")[:80],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finish(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Ratios, results.jsonl/csv/md and the plots."""
    attach_baseline(rows)
    write_results(out, rows)
    (out / RESULTS_MD).write_text(markdown(rows))
    return plot(out, rows)


def versions() -> dict[str, str]:
    """Python's and the training libraries' versions, from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_meta(out: Path, rows: list[dict[str, Any]], argv: list[str]) -> None:
    """OUT/meta.json: what measured these rows (device, library versions, commit, threads, load)."""
    import platform
    import time as _time

    commit = None
    root = str(assets.PACKAGE_PARENT)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
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
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
