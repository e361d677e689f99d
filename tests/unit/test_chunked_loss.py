"""The chunked linear cross-entropy (launcher/model/loss.py) against transformers' own loss, in one process.

A tiny Llama (vocab 1000, small chunks so that a batch spans many of them) in fp32: the loss and every
parameter's gradient after chunked and standard forward+backward of the same batch agree within 1e-5
relative (max |difference| over max |gradient| per parameter; measured 6e-7 to 1.1e-6: the chunked sum
adds per-chunk partial sums and applies 1/N after the matmuls, the standard loss the other way round).
SFT labels carry -100 prompt masks in every case. Memory: at vocab 32k the chunked loss's peak stays
far under the whole logits' size (torch.profiler's record of every tensor allocation and free).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launcher.errors import UserError  # noqa: E402
from launcher.model import loss as loss_mod  # noqa: E402
from launcher.model.loss import apply_loss, liger_importable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ, CHUNK = 1000, 24, 7  # 3 x 24 tokens: ~10 chunks of 7 rows, the last one short
TOL = 1e-5


def tiny(tied: bool, seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      attention_dropout=dropout, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def batch(seed: int = 1, rows: int = 3, prompt: tuple[int, ...] = (5, 9, 0)):
    """Token ids and SFT labels: each row's first `prompt[i]` labels masked with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    for i in range(rows):
        labels[i, : prompt[i % len(prompt)]] = -100
    return ids, labels


def pair(model):
    """(standard, chunked) copies of one model."""
    chunked = copy.deepcopy(model)
    line = apply_loss(chunked, "chunked", chunk_tokens=CHUNK)
    assert line.startswith(f"chunked cross-entropy, {CHUNK}-token chunks")
    return model, chunked


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_same_grads(std, chk, tol=TOL) -> float:
    named = dict(chk.named_parameters())
    worst, n = 0.0, 0
    for name, p in std.named_parameters():
        q = named[name]
        if not p.requires_grad:
            continue
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().max() > 0, f"{name}: zero gradient, nothing compared"
        r = rel(q.grad, p.grad)
        assert r <= tol, f"{name}: relative difference {r:.2e}"
        worst, n = max(worst, r), n + 1
    assert n > 0
    print(f"{n} gradients compared, worst relative difference {worst:.1e}")
    return worst


def nonzero_lora_b(model):
    """LoRA's B starts at zero (so A's gradient is zero): move it, so that every adapter weight is compared."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def step(model, ids, labels, **kw):
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_equals_standard_loss_and_every_gradient(tied):
    std, chk = pair(tiny(tied))
    assert (chk.lm_head.weight is chk.model.embed_tokens.weight) is tied
    ids, labels = batch()
    a, b = step(std, ids, labels), step(chk, ids, labels)
    assert b.logits is None  # the whole logits are never made
    assert abs(float(b.loss.detach()) - float(a.loss.detach())) <= TOL * abs(float(a.loss.detach()))
    assert_same_grads(std, chk)


def test_lora_on_the_head_with_dropout_equals_standard():
    """LoRA on every linear layer and the head (peft lora.Linear as lm_head), dropout 0.1: the adapter's
    dropout is drawn once over the same tensor as peft draws it, so the masks match."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    std = nonzero_lora_b(get_peft_model(tiny(tied=False), cfg))
    chk = copy.deepcopy(std)
    assert "one gather" in apply_loss(chk, "chunked", chunk_tokens=CHUNK)  # the fast path takes the LoRA head
    assert type(chk.base_model.model.lm_head).__name__ == "Linear" and hasattr(chk.base_model.model.lm_head, "lora_A")
    ids, labels = batch()
    std.train(), chk.train()
    torch.manual_seed(3)
    a = step(std, ids, labels)
    torch.manual_seed(3)
    b = step(chk, ids, labels)
    assert abs(float(b.loss.detach()) - float(a.loss.detach())) <= TOL * abs(float(a.loss.detach()))
    worst = assert_same_grads(std, chk)
    assert worst < TOL
    assert chk.base_model.model.lm_head.lora_B.default.weight.grad.abs().sum() > 0


def test_other_head_adapters_take_the_per_chunk_module_path():
    """DoRA on the head is not a plain LoRA: the head module runs per chunk under checkpointing; same numbers."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["q_proj", "lm_head"],
                     task_type="CAUSAL_LM")
    std = nonzero_lora_b(get_peft_model(tiny(tied=False), cfg))
    chk = copy.deepcopy(std)
    assert "head module called per chunk" in apply_loss(chk, "chunked", chunk_tokens=CHUNK)
    ids, labels = batch()
    a, b = step(std, ids, labels), step(chk, ids, labels)
    assert abs(float(b.loss.detach()) - float(a.loss.detach())) <= TOL * abs(float(a.loss.detach()))
    assert_same_grads(std, chk)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gradient_accumulation_with_num_items_in_batch_equals_standard(tied):
    """As the Trainer runs 4 micro batches of one step: each forward gets num_items_in_batch (the count of
    shifted labels that are not -100 over all 4) and returns sum / that count; the gradients add up."""
    std, chk = pair(tiny(tied))
    micro = [batch(seed=10 + k, rows=2, prompt=(k * 3, 17 - k)) for k in range(4)]
    n_items = sum(int((lab[:, 1:] != -100).sum()) for _, lab in micro)
    losses = {}
    for name, m in (("std", std), ("chk", chk)):
        losses[name] = [float(step(m, ids, lab, num_items_in_batch=torch.tensor(n_items)).loss) for ids, lab in micro]
    for x, y in zip(losses["std"], losses["chk"]):
        assert abs(x - y) <= TOL * abs(x)
    assert_same_grads(std, chk)
    # and the step's loss is the mean over all counted tokens, as one batch of the 4 gives it
    ids, lab = (torch.cat(t) for t in zip(*micro))
    whole = copy.deepcopy(chk)
    whole.zero_grad()
    assert sum(losses["chk"]) == pytest.approx(float(whole(input_ids=ids, labels=lab).loss), rel=1e-6)


def test_gradient_accumulation_with_an_int_count_and_mean_reduction():
    std, chk = pair(tiny(False))
    ids, lab = batch(seed=4)
    a, b = step(std, ids, lab, num_items_in_batch=123), step(chk, ids, lab, num_items_in_batch=123)
    assert float(b.loss) == pytest.approx(float(a.loss), rel=TOL)
    assert_same_grads(std, chk)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_equal_standard(method):
    """Prompt tuning: peft prepends virtual tokens through inputs_embeds and pads the labels with -100.
    Prefix tuning: peft passes the prefix as past_key_values; the patched forward hands both to the decoder."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = {"prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[method]
    std = get_peft_model(tiny(False), config(task_type="CAUSAL_LM", num_virtual_tokens=5))
    chk = copy.deepcopy(std)
    apply_loss(chk, "chunked", chunk_tokens=CHUNK)
    ids, lab = batch()
    mask = torch.ones_like(ids)
    a, b = step(std, ids, lab, attention_mask=mask), step(chk, ids, lab, attention_mask=mask)
    assert float(b.loss) == pytest.approx(float(a.loss), rel=TOL)
    assert_same_grads(std, chk)


def test_eval_without_grad_gives_the_standard_loss_and_no_logits():
    std, chk = pair(tiny(True))
    std.eval(), chk.eval()
    ids, lab = batch()
    with torch.no_grad():
        a, b = std(input_ids=ids, labels=lab), chk(input_ids=ids, labels=lab)
    assert b.logits is None and not b.loss.requires_grad
    assert float(b.loss) == pytest.approx(float(a.loss), rel=TOL)
    # shift_labels given (as a padding-free collator passes them) instead of labels
    shifted = torch.nn.functional.pad(lab, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        c = chk(input_ids=ids, shift_labels=shifted)
    assert float(c.loss) == pytest.approx(float(a.loss), rel=TOL)


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_targets_whose_probability_underflows_still_get_the_exact_loss(bias):
    """The chunked loss reads each row's loss off its softmax (-log p[target]); where that probability is
    under 1e-30 (a loss over 69) it recomputes the row's logits and takes logsumexp(z) - z[target]. Here
    most targets sit far under their row's top logit, every third is the top: loss and gradients equal
    the standard fp32 cross-entropy, and a batch with no target at all gives 0, not -0."""
    from launcher.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    vocab, hidden = 300, 16
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.mul_(60.0)
    h0 = torch.randn(2, 40, hidden)
    labels = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        top = head(h0).argmax(-1)  # every third position: the next token is the row's top logit
    labels[:, 1::3] = top[:, 0:-1:3]
    labels[:, ::7] = -100
    ref_head = copy.deepcopy(head)

    z = ref_head(h0)[:, :-1].reshape(-1, vocab)
    t = labels[:, 1:].reshape(-1)
    keep = t != -100
    p = torch.softmax(z[keep], 1).gather(1, t[keep].unsqueeze(1))
    assert (p < 1e-30).sum() > 10 and (p > 1e-3).sum() > 0  # both paths taken

    h, hr = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    loss = linear_cross_entropy(h, head, labels, chunk_tokens=9)
    ref = torch.nn.functional.cross_entropy(ref_head(hr)[:, :-1].reshape(-1, vocab), t)
    loss.backward(), ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert rel(h.grad, hr.grad) <= TOL and rel(head.weight.grad, ref_head.weight.grad) <= TOL
    none = linear_cross_entropy(h0, head, torch.full_like(labels, -100), num_items_in_batch=torch.tensor(5))
    assert float(none) == 0.0 and not torch.signbit(none)


def test_without_labels_the_model_gives_logits_and_other_models_stay_standard():
    """No labels (generation): the class's own forward, logits included. Only the instance is patched."""
    model = tiny(False)
    other = tiny(False, seed=5)
    chk = copy.deepcopy(model)
    apply_loss(chk, "chunked")
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(chk(input_ids=ids).logits, model(input_ids=ids).logits)
    assert "forward" in vars(chk) and "forward" not in vars(other) and "forward" not in vars(model)
    with torch.no_grad():
        assert other(input_ids=ids, labels=ids).logits is not None
    out = chk.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_the_trainer_passes_num_items_in_batch_to_the_patched_model(tmp_path):
    """transformers' Trainer sees a forward with **kwargs (model_accepts_loss_kwargs) and its evaluation,
    which only needs the loss, works with logits None."""
    from transformers import Trainer, TrainingArguments

    chk = tiny(False)
    apply_loss(chk, "chunked", chunk_tokens=CHUNK)
    seen = []
    orig = chk.forward

    def spy(*a, **kw):
        seen.append(kw.get("num_items_in_batch"))
        return orig(*a, **kw)

    chk.forward = spy
    rows = [{"input_ids": ids, "labels": lab} for ids, lab in zip(*batch(rows=4))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                             remove_unused_columns=False)
    trainer = Trainer(model=chk, args=args, train_dataset=rows, eval_dataset=rows)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    assert seen and all(s is not None for s in seen)
    assert int(seen[0]) == sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    assert trainer.evaluate()["eval_loss"] > 0


# --------------------------------------------------------------------------- memory

def peak_tensor_bytes(fn) -> tuple[int, int]:
    """(peak, final) bytes of tensors allocated while fn runs and not yet freed, from torch.profiler's record of
    every CPU allocation and free (profile_memory), in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = top = 0
    for e in events:
        now += e.nbytes()
        top = max(top, now)
    return top, now


def test_chunked_peak_memory_excludes_the_logits():
    """Vocab 32,768 and 2,048 tokens: the whole fp32 logits are 2,048 x 32,768 x 4 B = 256 MiB, and the
    standard loss holds them, their log-softmax and their gradient at once (3 x 256 = 768 MiB measured).
    The chunked loss with 256-token chunks holds two fp32 [chunk x vocab] buffers at a time (logits and
    log-probabilities, 2 x 256 x 32,768 x 4 B = 64 MiB) plus the head's gradient (32,768 x 64 x 4 B =
    8 MiB): 73 MiB measured. Both end holding only the gradients (head 8 MiB + hidden states 0.5 MiB)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from launcher.model.loss import linear_cross_entropy

    vocab, tokens, hidden, chunk = 32768, 2048, 64, 256
    logits, chunk_logits, head_grad = tokens * vocab * 4, chunk * vocab * 4, vocab * hidden * 4
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    losses = {}

    def run(kind):
        head.zero_grad(set_to_none=True)
        h.grad = None

        def fn():
            loss = (ForCausalLMLoss(head(h), labels, vocab) if kind == "standard"
                    else linear_cross_entropy(h, head, labels, chunk_tokens=chunk))
            loss.backward()
            losses[kind] = float(loss.detach())
        return peak_tensor_bytes(fn)

    (std_peak, std_end), (chk_peak, chk_end) = run("standard"), run("chunked")
    assert losses["chunked"] == pytest.approx(losses["standard"], rel=1e-5)
    assert std_peak >= 2 * logits  # the measure does see the logits where they are held
    assert chk_peak <= 2 * chunk_logits + 2 * head_grad + 2**20 < logits / 2, chk_peak
    assert chk_end == std_end == head_grad + tokens * hidden * 4  # what is left: the two gradients
    print(f"peak tensor memory: standard {std_peak / 2**20:.0f} MiB, chunked {chk_peak / 2**20:.0f} MiB; "
          f"whole fp32 logits {logits / 2**20:.0f} MiB")


# --------------------------------------------------------------------------- liger and misuse

def test_liger_is_refused_here_with_the_fix():
    assert not liger_importable()  # an optional extra, never installed in CI
    with pytest.raises(UserError) as e:
        apply_loss(tiny(False), "liger")
    assert "--loss" in str(e.value) and "chunked" in str(e.value)


def test_liger_refused_without_cuda_even_when_the_package_is_there(monkeypatch):
    monkeypatch.setattr(loss_mod, "liger_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        apply_loss(tiny(False), "liger")


def test_liger_importable_does_not_import_torch():
    code = "import sys; from launcher.model.loss import liger_importable; liger_importable(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


def test_standard_leaves_the_model_alone_and_soft_capped_heads_are_refused():
    model = tiny(False)
    assert apply_loss(model, "standard").startswith("standard") and "forward" not in vars(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="final_logit_softcapping"):
        apply_loss(model, "chunked")
