"""What runs inside a bench rank: `python -m launcher.bench.probe rank RUN_DIR/spec.yaml` trains the
setup's run dir through the launcher's own loop (`launcher.rank.loop.train`) with one measuring callback
added, and writes RUN_DIR/bench/rank<R>.json. Timing: the device is synchronized at the end of every
optimizer step; the first `warmup` steps are left out; throughput is the wall time of the next `steps`
steps, everything the loop does in them included (data, logging). benchmarks/baseline_hf.py measures
the plain Trainer with the same callback. Torch is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.bench.report import versions
from launcher.bench.run import RANK_ENTRY, read_task, run_baseline, task_options
from launcher.config.resolve import resolve
from launcher.errors import UserError
from launcher.plan.plan import make_plan
from launcher.rank.entry import finish, leave_process_group
from launcher.rank.loop import train
from launcher.rundir import markers
from launcher.rundir.layout import RunDir


# =========================================================================== on the ranks

def tensor_bytes(module: Any, optimizer: Any, reference: Any = None) -> dict[str, int]:
    """Bytes of the distinct tensor storages the model and its optimizer hold: parameters (ZeRO-3
    partitions, 4-bit quantization state included), gradients, buffers, and whatever the optimizer
    object graph keeps (fp32 master partitions, Adam moments, gradient partitions and buckets); and a
    preference trainer's in-memory reference model (`reference`: its parameters and buffers)."""
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
    ref = 0
    if reference is not None:
        reference = getattr(reference, "module", reference)  # TRL wraps it in a DeepSpeed engine at ZeRO-3
        for t in [*reference.parameters(), *reference.buffers()]:
            ref += add(getattr(t, "ds_tensor", None)) + add(t.data)
    return {"weights": weights, "gradients": grads, "optimizer": opt, "reference": ref,
            "total": weights + grads + opt + ref}


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that applies the update: DeepSpeed's bf16/ZeRO wrappers and accelerate's keep the
    torch optimizer they drive in `.optimizer`."""
    for _ in range(5):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not callable(getattr(inner, "step", None)):
            break
        optimizer = inner
    return optimizer


def make_probe() -> Any:
    """A TrainerCallback that times optimizer steps (device synchronized at each step's end), and at
    the end of training reads peak memory and the tensor bytes of the model + optimizer it trained."""
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
            return tensor_bytes(module, engine.optimizer if engine is not None else tr.optimizer,
                                getattr(tr, "ref_model", None))

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # The last step (after the timed window) is counted inside the update, where the model
            # states peak: the gradients, the master weights, the optimizer's moments and the fp32
            # gradient that DeepSpeed's bf16 and ZeRO optimizers make only for the update all exist
            # at once. ZeRO 1-2 make it per parameter group from the flat 16-bit gradient partition
            # and hold both until they release the partition (`_release_preflattened_grad_buffers`),
            # then run the torch optimizer on it; each of these moments is counted and the largest
            # kept. DeepSpeed steps inside the backward pass (accelerate), before any callback, so
            # the optimizers' own methods are wrapped, for this step only.
            tr = self.trainer
            if state.global_step != state.max_steps - 1 or tr is None:
                return
            engine = getattr(tr, "deepspeed", None)
            outer = engine.optimizer if engine is not None else tr.optimizer
            for obj, name in ((outer, "_release_preflattened_grad_buffers"), (innermost_optimizer(outer), "step")):
                if callable(getattr(obj, name, None)):
                    setattr(obj, name, self._counting(getattr(obj, name)))

        def _counting(self, original: Any) -> Any:
            def counted(*a: Any, **kw: Any) -> Any:
                held, seen = self._held(), self.end.get("tensor_bytes_in_step")
                if held and (not seen or held["total"] > seen["total"]):
                    self.end["tensor_bytes_in_step"] = held
                return original(*a, **kw)
            return counted

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            after = self._held()
            during = self.end.get("tensor_bytes_in_step")
            self.end.update(
                cpu_bf16_peak_tflops=None if cuda else cpu_bf16_peak_tflops(),
                cuda_peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                cuda_peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                tensor_bytes_after_step=after,
                tensor_bytes=max((x for x in (during, after) if x), key=lambda x: x["total"], default=None),
            )

        def record(self) -> dict[str, Any]:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            who = identity.current()
            return {
                "rank": who.rank, "world_size": who.world_size,
                "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                "t_begin": self.t_begin, "step_ends": self.step_ends,
                "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
                "versions": versions(), **self.end,
            }

    return StepProbe()


def cpu_bf16_peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's bf16 matmul peak as this process runs it (its threads): the best of `repeats`
    n x n x n products, TFLOP/s. CPU rows' MFU is against it (no table has a CPU's peak)."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # oneDNN's first call picks and packs its kernel
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def rank_main(spec_path: str) -> int:
    """On each rank: train SPEC's run dir through the launcher's loop with the probe, and write
    RUN_DIR/bench/rank<R>.json (or, for a baseline task of a --slurm bench, run the baseline on rank 0).
    A rank that trained ends the process here (entry.finish), as `launcher train` does."""
    spec = resolve(spec_path)
    rd = RunDir(Path(spec.output.dir))
    task = read_task(rd.path)
    opts = task_options(task)
    rank = identity.current().rank
    rd.bench.mkdir(parents=True, exist_ok=True)
    if task["kind"] == "baseline":  # one plain process, no DeepSpeed
        return run_baseline(spec, make_plan(spec), rd.path, opts) if rank == 0 else 0
    probe = make_probe()
    out = rd.bench_rank(rank)
    try:
        train(spec, callbacks=[probe])
    except BaseException as exc:
        oom = markers.is_oom(exc)
        record = {**probe.record(), "error": ("out of memory: " if oom else f"{type(exc).__name__}: ") + str(exc)[:500],
                  "oom": oom}
        out.write_text(json.dumps(record) + "\n")
        raise
    out.write_text(json.dumps({**probe.record(), "error": None}) + "\n")
    leave_process_group()
    finish(0)


USAGE = f"usage: python -m {' '.join(RANK_ENTRY)} RUN_DIR/spec.yaml  (started by `launcher bench`)"


def main(argv: list[str]) -> int:
    """`python -m launcher.bench.probe rank RUN_DIR/spec.yaml`, as `launcher train RUN_DIR/spec.yaml`."""
    if len(argv) != 2 or argv[0] != RANK_ENTRY[1]:
        sys.exit(USAGE)
    try:
        return rank_main(argv[1])
    except UserError as exc:  # written into the rank's record already; the exit code says what kind
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
