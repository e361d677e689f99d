"""launcher.rank.engine against DeepSpeed itself: real engines, bf16, ZeRO stage 0, CPU ranks over gloo.

1. One rank: two engines built from the same seed, one left as DeepSpeed makes it, one tuned. Each step
   starts both from the same state (weights, fp32 masters, Adam's moments; in bf16 a last-bit difference
   would otherwise grow step by step) and takes the same batch, with clipping active and with none, with
   a parameter that never gets a gradient: the gradient norms equal within 1e-6 relative (the sum of
   squares is added in another order), the fp32 masters after the step within 1e-6 (relative, per
   tensor). A step whose gradient holds an inf is skipped by both, their weights unchanged. The tuned
   engine no longer all-reduces (world size 1).
2. Two ranks, different data on each: the tuned engines keep their all-reduce, and both ranks hold the
   same weights after every step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import copy, json, os, sys
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from launcher.rank.engine import tune

mode, clip = sys.argv[1], float(sys.argv[2])
deepspeed.init_distributed("gloo")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
      "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
      "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True, "fused": True}},
      "steps_per_print": 10**9}

def engine():
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.unused = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)  # trainable, never gets a gradient
    e, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    assert type(e.optimizer) is FP16_UnfusedOptimizer, type(e.optimizer)
    return e

def masters(e):
    return [p.detach().clone() for g in e.optimizer.fp32_groups for p in g]

def one_step(e, ids, poison=False):
    loss = e(input_ids=ids, labels=ids).loss
    e.backward(loss)
    if poison:
        next(e.module.parameters()).grad.view(-1)[0] = float("inf")
    e.step()
    return float(loss), e.get_global_grad_norm()

gen = torch.Generator().manual_seed(1 + rank)
batches = [torch.randint(1, 512, (2, 32), generator=gen) for _ in range(6)]
out = {}
if mode == "pair":
    stock, fast = engine(), engine()
    out["tuned"] = tune(fast)
    out["allreduce"] = [stock.enable_backward_allreduce, fast.enable_backward_allreduce]
    rows, master_rel = [], []
    for ids in batches:  # each step from the same state: bf16 weights, fp32 masters, Adam's moments
        fast.module.load_state_dict(stock.module.state_dict())
        for a, b in zip(masters(stock), [p for g in fast.optimizer.fp32_groups for p in g]):
            b.data.copy_(a)
        fast.optimizer.optimizer.load_state_dict(copy.deepcopy(stock.optimizer.optimizer.state_dict()))  # not shared
        rows.append([one_step(stock, ids), one_step(fast, ids)])
        master_rel.append(max(float((a - b).norm() / a.norm().clamp_min(1e-30))
                              for a, b in zip(masters(stock), masters(fast))))
    out["rows"], out["master_rel"] = rows, master_rel
    before = [masters(stock), masters(fast)]
    skipped = [one_step(stock, batches[0], poison=True), one_step(fast, batches[0], poison=True)]
    out["skipped_norms"] = [s[1] for s in skipped]
    out["overflow"] = [stock.optimizer.overflow, fast.optimizer.overflow]
    out["unchanged"] = [all(torch.equal(x, y) for x, y in zip(b, masters(e))) for b, e in zip(before, (stock, fast))]
else:  # "ranks": the tuned engine on each rank, every rank's weights compared after each step
    fast = engine()
    out["tuned"] = tune(fast)
    out["allreduce"] = fast.enable_backward_allreduce
    same = []
    for ids in batches:
        one_step(fast, ids)
        flat = torch.cat([p.detach().float().reshape(-1) for p in fast.module.parameters()])
        seen = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(seen, flat)
        same.append(all(torch.equal(seen[0], s) for s in seen))
    out["same"] = same
print("RESULT " + json.dumps(out), flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(mode: str, clip: float, world: int) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, str(clip)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipping", "no-clipping"])
def test_tuned_bf16_stage0_step_equals_deepspeeds(clip):
    (r,) = _run("pair", clip, 1)
    assert r["tuned"] == ["one rank: no gradient all-reduce", "bf16 stage 0: launcher's update step"]
    assert r["allreduce"] == [True, False]
    for (loss_s, norm_s), (loss_f, norm_f) in r["rows"]:
        assert loss_s == loss_f and _rel(norm_s, norm_f) <= 1e-6, r["rows"]
    if clip:
        assert min(norm for (_, norm), _ in r["rows"]) > clip  # clipping scaled the gradients of every step
    assert max(r["master_rel"]) <= 1e-6, r["master_rel"]
    assert r["overflow"] == [True, True] and r["unchanged"] == [True, True], r
    assert all(n == float("inf") for n in r["skipped_norms"]), r


def test_two_ranks_keep_their_allreduce():
    results = _run("ranks", 1.0, 2)
    for r in results:
        assert r["tuned"] == ["bf16 stage 0: launcher's update step"]
        assert r["allreduce"] is True
        assert all(r["same"]), r
