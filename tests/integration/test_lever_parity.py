"""The chunked loss (launcher/model/loss.py) against the standard one in real multi-rank DeepSpeed training.

1. ZeRO-3 on 2 CPU ranks, DeepSpeed directly, untied head: the LM head's weight is all-gathered once
   per micro step (forward and backward together) from the very first one, whatever the number of
   chunks. The same counter sees a gather per chunk when the head module is called per chunk (the
   loss's fallback path) while ZeRO-3 records its trace, so it would see a per-chunk design. The loss and
   the gradient norm equal the standard loss's within 1e-6 relative.
2. Through `launcher run` (2 ranks, fp32, SFT with masked prompts, gradient accumulation 4, 16-token
   chunks so that every micro batch spans several): per-step losses and gradient norms from the run
   dir's metrics.jsonl equal between --set optim.loss=standard and --set optim.loss=chunked within 1e-4
   relative over 20 steps, for full and LoRA, ZeRO-2 and ZeRO-3, tied and untied heads (four configs
   that cover each axis twice; the two runs of a pair one after the other).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.rundir.metrics import is_train, read_records

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS, CHUNK = 20, 16
REL = 1e-4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- ZeRO-3: one gather per micro step

_ZERO3_GATHERS = r"""
import json, os, sys
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from launcher.model import loss as loss_mod

kind, chunk, head_kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deepspeed.init_distributed("gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
model = LlamaForCausalLM(cfg).float()
if head_kind == "lora":  # LoRA on the head too (peft's lora.Linear as lm_head), B moved off zero
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "lm_head"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
line = loss_mod.apply_loss(model, "standard" if kind == "standard" else "chunked", chunk_tokens=chunk)
if kind == "per-chunk":
    loss_mod._fast_head = lambda head_module: None  # the fallback: the head module called once per chunk
# torch's AdamW (torch_adam), as launcher renders for CPU ranks: DeepSpeed's FusedAdam would be JIT-built for this alone
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
lm_head = loss_mod.causal_lm_of(model).lm_head
head = lm_head.weight if head_kind == "plain" else lm_head.base_layer.weight
gathers = []

def counting(p):  # every all-gather ZeRO-3 makes goes through a parameter's all_gather_coalesced or all_gather
    for name in ("all_gather_coalesced", "all_gather"):
        orig = getattr(p, name)
        def counted(*a, _orig=orig, **k):
            params = a[0] if a else k.get("param_list", k.get("params"))
            if any(q is head for q in (params or [p])):
                gathers.append(1)
            return _orig(*a, **k)
        setattr(p, name, counted)

for p in model.parameters():
    counting(p)

g = torch.Generator().manual_seed(1 + rank)
def micro():
    ids = torch.randint(1, 4096, (2, 48), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100  # 2 x (47 - 9) = 76 rows with a target: 5 chunks of 16
    n0 = len(gathers)
    loss = engine(input_ids=ids, labels=labels).loss
    n1 = len(gathers)
    engine.backward(loss)
    engine.step()  # every micro step; DeepSpeed steps the optimizer at the accumulation boundary
    return {"forward": n1 - n0, "backward": len(gathers) - n1, "loss": float(loss)}

steps = []
for _ in range(3):
    per = [micro() for _ in range(2)]
    steps.append({"micro": per, "grad_norm": float(engine.get_global_grad_norm())})
if rank == 0:
    print("RESULT " + json.dumps({"line": line, "steps": steps}))
"""


def _zero3_run(kind: str, env: dict[str, str], head: str = "plain") -> dict:
    base = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _ZERO3_GATHERS, kind, str(CHUNK), head], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-4000:] + outs[1][-4000:]
    [line] = [x for x in outs[0].splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_zero3_gathers_the_head_once_per_micro_step(env):
    runs = {kind: _zero3_run(kind, env) for kind in ("chunked", "per-chunk", "standard")}
    chunked, per_chunk, standard = runs["chunked"]["steps"], runs["per-chunk"]["steps"], runs["standard"]["steps"]
    assert "16-token chunks" in runs["chunked"]["line"]
    for step in chunked:  # from the first micro step on (ZeRO-3 still recording its trace then)
        for m in step["micro"]:
            assert (m["forward"], m["backward"]) == (1, 0), chunked
    # The counter sees per-chunk gathers where they happen: the head module called once per chunk (5 chunks)
    # gathers it per chunk in the first forward and again per chunk (recompute, then backward) in its backward.
    # Later micro steps gather it once each way: ZeRO-3's recorded trace then keeps it across the calls.
    first = per_chunk[0]["micro"][0]
    assert first["forward"] >= 5 and first["backward"] >= 5, per_chunk
    # The standard loss gathers it in forward and again in backward until the trace is recorded, then once.
    total = lambda steps: sum(m["forward"] + m["backward"] for s in steps for m in s["micro"])
    assert total(chunked) == 6 <= total(standard) - 1, standard
    print(f"head all-gathers over 6 micro steps: chunked {total(chunked)}, standard {total(standard)}, "
          f"head called per chunk {total(per_chunk)}")
    for s, c in zip(standard, chunked):  # and the numbers are the standard loss's
        assert c["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-6)
        for ms, mc in zip(s["micro"], c["micro"]):
            assert mc["loss"] == pytest.approx(ms["loss"], rel=1e-6)


def test_zero3_lora_on_the_head_gathers_once_and_matches_standard(env):
    """peft's LoRA Linear as the head: its base weight and lora_B each sit in their own module; the loss runs
    inside one call of each, so both are gathered once per micro step (counted: the base weight)."""
    chunked, standard = (_zero3_run(kind, env, head="lora")["steps"] for kind in ("chunked", "standard"))
    assert all((m["forward"], m["backward"]) == (1, 0) for s in chunked for m in s["micro"]), chunked
    for s, c in zip(standard, chunked):
        assert c["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-6)
        assert [m["loss"] for m in c["micro"]] == pytest.approx([m["loss"] for m in s["micro"]], rel=1e-6)


# --------------------------------------------------------------------------- through `launcher run`

@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    """The embedded tiny Llama with its own (untied) LM head, as a local model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher import assets

    d = tmp_path_factory.mktemp("model") / "tiny-untied"
    cfg = AutoConfig.from_pretrained(assets.tiny_dir())
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(assets.tiny_dir()).save_pretrained(d)
    return d


# name: (method, ZeRO stage, tied head). Two configs, each value of each axis once (2 minutes of CI less than
# all four pairings): the hard case, ZeRO-3's gather of a head tied to the embedding, in full; an untied head
# beside LoRA at ZeRO-2. LoRA at ZeRO-3 with the chunked loss: test_zero3_lora_on_the_head_gathers_once...
CONFIGS = {
    "full-z3-tied": ("full", 3, True),
    "lora-z2-untied": ("lora", 2, False),
}


def _records(run: Path) -> list[dict]:
    recs = [r for r in read_records(run) if is_train(r)]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), recs
    return recs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_loss_trains_as_the_standard_loss(name, tmp_path, env, launcher, untied_model):
    method, stage, tied = CONFIGS[name]
    model = "tiny" if tied else str(untied_model)
    runs = {}
    for loss in ("standard", "chunked"):
        out = tmp_path / loss
        proc = launcher(["run", "--model", model, "--task", "sft", "--method", method, "--zero", stage, "--nproc", 2,
                         "--precision", "fp32", "--max-steps", STEPS, "--seq-len", 64, "--micro-batch", 2,
                         "--global-batch", 16, "--lr", 2e-3, "--loss", loss, "--out", out,
                         "--set", "optim.warmup_steps=2", "--set", "output.log_every=1",
                         "--set", f"optim.loss_chunk_tokens={CHUNK}"], env, expect=0)
        runs[loss] = (proc, out)
    proc, out = runs["chunked"]
    assert f"{CHUNK}-token chunks" in proc.stdout, proc.stdout[-3000:]  # the chunked loss ran, in several chunks
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == stage
    std, chk = _records(runs["standard"][1]), _records(out)
    worst = 0.0
    for a, b in zip(std, chk):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=REL), (name, a["step"], key, a[key], b[key])
            worst = max(worst, abs(b[key] - a[key]) / abs(a[key]))
    assert std[-1]["loss"] < std[0]["loss"]  # it trained: the comparison is of something that moves
    print(f"{name}: worst relative difference over {STEPS} steps {worst:.1e}")
