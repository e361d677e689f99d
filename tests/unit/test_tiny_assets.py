"""The embedded tiny model: its files load offline, render chats, and make a model of a few million parameters."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

import pytest

from launcher import assets

TINY = assets.tiny_dir()


@contextlib.contextmanager
def _no_network():
    """Any connection attempt fails: what loads here loads offline."""
    def refuse(*a, **k):
        raise OSError("network access attempted while loading the embedded tiny model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    with _no_network():
        return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def config():
    from transformers import AutoConfig

    with _no_network():
        return AutoConfig.from_pretrained(TINY)


def test_tiny_folder_is_small_and_complete():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "corpus.txt", "sft.jsonl",
            "build.py", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file()) < 3 << 20
    assert 300_000 <= (TINY / "corpus.txt").stat().st_size <= 800_000


def test_config_and_tokenizer_load_offline_and_agree_on_special_tokens(tok, config):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.vocab_size == len(tok) == 4096
    assert config.tie_word_embeddings is True
    # Plain text gets no special tokens added: the data pipeline places bos/eos itself.
    ids = tok("The socket is closed.")["input_ids"]
    assert 0 not in ids and 1 not in ids and 2 not in ids
    assert tok.decode(ids) == "The socket is closed."


def test_chat_template_renders_roles_and_generation_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                    "<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3
    assert json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


def test_parameter_count_matches_the_instantiated_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    counted = sum(p.numel() for p in model.parameters())  # tied weights counted once
    c = config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size \
        + 2 * c.hidden_size
    analytic = c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    assert counted == analytic == 3_950_848
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_sft_set_is_chat_shaped():
    lines = (TINY / "sft.jsonl").read_text().splitlines()
    assert 200 <= len(lines) <= 1000
    for line in lines:
        msgs = json.loads(line)["messages"]
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant"}
        assert msgs[-1]["role"] == "assistant" and all(m["content"] for m in msgs)


@pytest.mark.integration
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the shipped corpus comes from Python 3.11's stdlib")
def test_build_script_regenerates_the_shipped_files(tmp_path: Path):
    from launcher.tiny import build

    build.main(tmp_path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "corpus.txt", "sft.jsonl"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), f"{name} differs: run build.py"


def test_tiny_base_is_made_once_per_seed_and_copied_from_the_cache_byte_for_byte(tmp_path: Path):
    """The first run dir's base is initialised from the seed (torch.manual_seed + from_config) and kept in the
    cache; the next run dir gets those very bytes without importing torch (a fresh interpreter); another seed
    is another base; without a cache nothing is kept."""
    import subprocess

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model.load import ensure_tiny_base, tiny_base_key

    cache = tmp_path / "cache"
    for run_dir in "abc":
        (tmp_path / run_dir).mkdir()
    first = ensure_tiny_base(tmp_path / "a", 7, cache=cache)
    kept = cache / f"tiny-base-{tiny_base_key(7)}"
    assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in first.iterdir())
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32)
    saved = load_file(first / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved) and saved
    code = ("import sys; from pathlib import Path; from launcher.model.load import ensure_tiny_base; "
            f"ensure_tiny_base(Path({str(tmp_path / 'b')!r}), 7, cache=Path({str(cache)!r})); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "b" / "base" / name).read_bytes() == (first / name).read_bytes()
    assert tiny_base_key(8) != tiny_base_key(7)
    ensure_tiny_base(tmp_path / "c", 7)
    assert sorted(p.name for p in cache.iterdir()) == [kept.name]
