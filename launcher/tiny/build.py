"""Regenerate the embedded tiny model's files: corpus, SFT set, tokenizer and config.

    python3 -m launcher.tiny.build          # from the repository root; rewrites launcher/tiny/*

Deterministic for a given Python minor version (the corpus is taken from that version's standard
library) and `tokenizers` version; the shipped files were made with Python 3.11 and tokenizers 0.23.
The outputs are committed; nothing here runs when launcher trains.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent

VOCAB_SIZE = 4096
CORPUS_BYTES = 600_000  # stop adding paragraphs past this size
SFT_EXAMPLES = 400
SEED = 0

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4 in this order

# ChatML-style: each turn `<|im_start|>role\ncontent<|im_end|>\n`; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Standard-library packages left out: tests, tooling whose docstrings are mostly code or grammar.
_SKIP = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
         "__phello__", "pydoc_data", "encodings", "tkinter", "venv")


# --------------------------------------------------------------------------- corpus

def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    # ast.walk visits the module again after listing it first; keep the first of each.
    seen: set[str] = set()
    return [d for d in out if not (d in seen or seen.add(d))]


def _prose(paragraph: str) -> str | None:
    """One paragraph reflowed to a line if it reads as English prose; None for code, tables, lists."""
    lines = [ln.strip() for ln in paragraph.splitlines()]
    if any(ln.startswith((">>>", "...", "$", "%", "|", "+-", "==", "--", "::")) for ln in lines):
        return None
    text = " ".join(lines)
    if len(text) < 60 or not text[0].isupper() or text[-1] not in ".:)":
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.85 or not text.isascii():
        return None
    return re.sub(r"\s+", " ", text)


def build_corpus() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not set(p.relative_to(stdlib).parts) & set(_SKIP))
    seen: set[str] = set()
    paragraphs: list[str] = []
    size = 0
    for path in files:
        for doc in _docstrings(path):
            for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
                text = _prose(para)
                if text is None or text in seen:
                    continue
                seen.add(text)
                paragraphs.append(text)
                size += len(text) + 2
        if size >= CORPUS_BYTES:
            break
    return "\n\n".join(paragraphs) + "\n"


# --------------------------------------------------------------------------- SFT set

_WORDS = ("apple river stone garden window yellow python simple number letter bridge orange planet "
          "silver forest castle engine market pencil rocket summer winter shadow candle travel "
          "mirror thunder violet breeze harbor puzzle signal marble lantern meadow crystal").split()


def _sft_example(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.choice(["add", "sub", "mul", "reverse", "upper", "count", "sort", "compare", "next"])
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    w = rng.choice(_WORDS)
    words = rng.sample(_WORDS, 4)
    if kind == "add":
        q, r = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    elif kind == "sub":
        q, r = f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
    elif kind == "mul":
        a, b = a % 13, b % 13
        q, r = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    elif kind == "reverse":
        q, r = f"Spell the word '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'."
    elif kind == "upper":
        q, r = f"Write '{w}' in capital letters.", f"{w.upper()}"
    elif kind == "count":
        q, r = f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."
    elif kind == "sort":
        q, r = f"Sort these words alphabetically: {', '.join(words)}.", f"{', '.join(sorted(words))}."
    elif kind == "compare":
        big = "larger" if a != b else "equal"
        ans = f"{max(a, b)} is larger." if a != b else f"They are equal: both are {a}."
        q, r = f"Which number is {big if big == 'equal' else 'larger'}: {a} or {b}?", ans
    else:
        q, r = f"What number comes after {a}?", f"{a + 1} comes after {a}."
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a concise assistant."})
    return msgs


def build_sft() -> str:
    rng = random.Random(SEED)
    return "".join(json.dumps({"messages": _sft_example(rng)}) + "\n" for _ in range(SFT_EXAMPLES))


# --------------------------------------------------------------------------- preference set

PREF_EXAMPLES = 400


def _pref_example(rng: random.Random) -> dict[str, str]:
    """One preference pair whose chosen response follows a rule the tiny model can pick up from a few hundred
    steps (capital letters, a reversed word, the next number, the sum), and whose rejected one breaks it."""
    kind = rng.choice(["upper", "reverse", "next", "add"])
    w = rng.choice(_WORDS)
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    if kind == "upper":
        q, good, bad = f"Write '{w}' in capital letters.", w.upper(), w
    elif kind == "reverse":
        q, good, bad = f"Spell the word '{w}' backwards.", w[::-1], w
    elif kind == "next":
        q, good, bad = f"What number comes after {a}?", f"{a + 1}", f"{max(a - 1, 0) if a else a + 2}"
    else:
        off = rng.choice([-2, -1, 1, 2, 10])
        q, good, bad = f"What is {a} + {b}?", f"{a + b}", f"{a + b + off}"
    return {"prompt": f"Question: {q}\nAnswer:", "chosen": f" {good}", "rejected": f" {bad}"}


def build_pref() -> str:
    """The embedded preference set (`launcher run --task dpo` with no data): {prompt, chosen, rejected} strings.
    Not part of the tokenizer's training text, so adding it left the tokenizer as it was."""
    rng = random.Random(SEED + 1)
    return "".join(json.dumps(_pref_example(rng)) + "\n" for _ in range(PREF_EXAMPLES))


# --------------------------------------------------------------------------- tokenizer and config

def build_tokenizer(corpus: str, sft: str, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    chat_text = [m["content"] for line in sft.splitlines() for m in json.loads(line)["messages"]]
    tok.train_from_iterator([*corpus.split("\n\n"), *chat_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        model_max_length=2048, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out, save_jinja_files=False)
    # "PreTrainedTokenizerFast" (an alias of the v5 backend class) also loads with transformers 4.x.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_config(vocab_size: int, ids: dict[str, int], out: Path) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02, hidden_act="silu",
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        architectures=["LlamaForCausalLM"], use_cache=True,
    )
    cfg.save_pretrained(out)


def main(out: Path = HERE) -> None:
    if sys.version_info[:2] != (3, 11):
        print(f"note: the shipped corpus was built with Python 3.11; this is {sys.version.split()[0]}, "
              f"so corpus.txt will differ", file=sys.stderr)
    corpus, sft = build_corpus(), build_sft()
    (out / "corpus.txt").write_text(corpus, encoding="utf-8")
    (out / "sft.jsonl").write_text(sft, encoding="utf-8")
    (out / "pref.jsonl").write_text(build_pref(), encoding="utf-8")
    build_tokenizer(corpus, sft, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    build_config(len(tok), ids, out)
    print(f"wrote {out}: corpus {len(corpus)} bytes, {SFT_EXAMPLES} SFT examples, vocab {len(tok)}, ids {ids}")


if __name__ == "__main__":
    main()
