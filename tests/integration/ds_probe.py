"""Runs launcher-rendered DeepSpeed configs through DeepSpeed itself, in one process.

    python tests/integration/ds_probe.py accept   -> every stage x offload x precision x world size
                                                     parsed by DeepSpeedConfig at its world size
    python tests/integration/ds_probe.py steps    -> for each stage x offload x precision, one real
                                                     deepspeed.initialize and optimizer steps on CPU
    python tests/integration/ds_probe.py steps K/N -> every N-th of those from the K-th (N processes share them)

Prints one JSON line per case. A separate process, because deepspeed.comm keeps a process group.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

from launcher.config.resolve import resolve  # noqa: E402
from launcher.plan.plan import make_plan  # noqa: E402
from launcher.render.deepspeed import render  # noqa: E402

STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "cpu", "nvme")
PRECISIONS = ("bf16", "fp16", "fp32")
WORLDS = (1, 2, 8, 64)


def valid_combos():
    for stage, oo, op, prec in itertools.product(STAGES, OFFLOADS, OFFLOADS, PRECISIONS):
        if op != "none" and stage != 3:
            continue
        if oo != "none" and stage == 0:
            continue
        yield stage, oo, op, prec


def build(stage, oo, op, prec, world, nvme_path="/local_nvme"):
    sets = [f"zero.stage={stage}", f"zero.offload_optimizer={oo}", f"zero.offload_param={op}",
            f"precision={prec}", f"cluster.nproc_per_node={world}", "optim.micro_batch=2",
            f"optim.global_batch={2 * 3 * world}", "data.seq_len=64"]
    if "nvme" in (oo, op):
        sets.append(f"zero.nvme_path={nvme_path}")
    spec = resolve(sets=sets)
    plan = make_plan(spec)
    return spec, plan, render(spec, plan)


class DataParallel:
    """The mpu interface DeepSpeedConfig asks for its data-parallel world size."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self):
        return self.world

    def get_data_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


def accept():
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    deepspeed.init_distributed("gloo")
    for (stage, oo, op, prec), world in itertools.product(valid_combos(), WORLDS):
        _, plan, cfg = build(stage, oo, op, prec, world)
        case = {"stage": stage, "offload_optimizer": oo, "offload_param": op, "precision": prec, "world": world}
        try:
            ds = DeepSpeedConfig(cfg, mpu=DataParallel(world))
            case.update(ok=True, world_seen=ds.world_size, train_batch_size=ds.train_batch_size,
                        micro=ds.train_micro_batch_size_per_gpu, accum=ds.gradient_accumulation_steps,
                        plan_global=plan.global_batch, zero_stage=ds.zero_optimization_stage,
                        bf16=ds.bfloat16_config.enabled, fp16=ds.float16_config.enabled)
        except Exception as exc:  # reported, asserted by the test
            case.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(case), flush=True)
    from launcher.render import presets

    for name, world in itertools.product(presets.PRESETS, (1, 8)):
        cfg = presets.render_preset(name)
        ds = DeepSpeedConfig(cfg, mpu=DataParallel(world))
        print(json.dumps({"preset": name, "world": world, "world_seen": ds.world_size,
                          "train_batch_size": ds.train_batch_size, "micro": ds.train_micro_batch_size_per_gpu,
                          "accum": ds.gradient_accumulation_steps}), flush=True)


def steps(share: str = "0/1"):
    import deepspeed
    import torch

    deepspeed.init_distributed("gloo")
    nvme = tempfile.mkdtemp(prefix="nvme-")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    k, n = map(int, share.split("/"))
    for stage, oo, op, prec in list(valid_combos())[k::n]:
        case = {"stage": stage, "offload_optimizer": oo, "offload_param": op, "precision": prec}
        try:
            torch.manual_seed(0)
            _, plan, cfg = build(stage, oo, op, prec, 1, nvme_path=nvme)
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            before = [p.detach().float().clone() for p in model.parameters()] if stage < 3 else None
            losses = []
            for _ in range(plan.grad_accum * 2):
                x = torch.randn(plan.micro_batch, 32, dtype=dtypes[prec])
                loss = (engine(x).float() - 1).pow(2).mean()
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            moved = None if before is None else any(
                not torch.equal(b, p.detach().float()) for b, p in zip(before, model.parameters()))
            case.update(ok=True, global_steps=engine.global_steps, losses=losses, weights_moved=moved,
                        optimizer=type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__)
            engine.destroy()
        except Exception as exc:  # reported, asserted by the test
            case.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        print(json.dumps(case), flush=True)


if __name__ == "__main__":
    {"accept": accept, "steps": steps}[sys.argv[1]](*sys.argv[2:])
