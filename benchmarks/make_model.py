"""Build a model folder with a published architecture and random weights, without downloads.

    python benchmarks/make_model.py llama-3.2-1b --out benchmarks/models/llama-3.2-1b
    python benchmarks/make_model.py llama-3-8b --out benchmarks/models/llama-3-8b [--config-only]

Throughput and memory do not depend on weight values, so the bench measures real architectures
built from their published hyper-parameters (random init, bf16), saved and loaded through
`save_pretrained` / `from_pretrained`: the real loading and 4-bit quantization code runs. The
tokenizer is the embedded tiny model's (4,096 ids, all valid rows of the 128,256-row embedding);
the LM head and the logits keep the real vocabulary size, which is what costs time and memory.
`--config-only` writes config.json alone, enough for `launcher estimate`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", vocab_size=128256,
               rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, initializer_range=0.02,
               bos_token_id=128000, eos_token_id=128001)
CONFIGS: dict[str, dict] = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, tied embeddings.
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True,
                         head_dim=64, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, untied head.
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
                       head_dim=128, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # The CPU matrix's mid-size shape (benchmarks/matrices/cpu_mid.yaml): a 32k vocabulary (Llama-2/Mistral's
    # size) and an untied head on 8 small layers, 58.5M parameters: the logits are a large share, as in the
    # small models people fine-tune on one GPU, and a step takes seconds on 2 CPU cores.
    "cpu-mid-58m": dict(_LLAMA3, vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8, intermediate_size=1408, tie_word_embeddings=False, head_dim=64,
                        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("--out", required=True, help="folder to create")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true", help="write config.json only (for launcher estimate)")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        print(f"{out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    cfg = dict(CONFIGS[a.name])
    out.mkdir(parents=True, exist_ok=True)
    if a.config_only:
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"wrote {out / 'config.json'}")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.monotonic()
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 8B weights is minutes on CPU, seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "launcher" / "tiny" / f, out / f)
    print(f"wrote {out}: {a.name}, {n:,} parameters, {a.dtype}, random init (seed {a.seed}), "
          f"tokenizer of the embedded tiny model; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
