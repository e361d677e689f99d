"""What the planner knows about a model without importing torch: its config.json, and parameter
counts computed analytically for the Llama/Mistral/Qwen family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launcher import assets
from launcher.errors import UserError

# Architectures whose parameters this module counts exactly (decoder of q/k/v/o + gated MLP + RMSNorm).
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2"}


@dataclass(frozen=True)
class ModelInfo:
    source: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None
    tie_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def counted(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by its usual module name."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        shapes = self.linear_shapes()
        n = sum(a * b for a, b in shapes.values())
        if self.attention_bias:
            n += shapes["q_proj"][1] + shapes["k_proj"][1] + shapes["v_proj"][1] + shapes["o_proj"][1] * (self.model_type != "qwen2")
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        n += 2 * self.hidden_size  # input and post-attention RMSNorm weights
        if self.model_type == "qwen3":
            n += 2 * self.head_dim  # q_norm and k_norm
        return n

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size + self.lm_head_params()

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: every linear layer plus the LM head
        (tied or not); the embedding lookup is not a matmul."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values()) + self.vocab_size * self.hidden_size


def config_path(model_name: str) -> Path | None:
    """config.json of the embedded model or a local model directory; None for a hub id."""
    if model_name == "tiny":
        return assets.tiny_dir() / "config.json"
    p = Path(model_name).expanduser()
    if p.is_dir():
        return p / "config.json"
    if p.suffix == ".json" and p.is_file():
        return p
    return None


def load(model_name: str, *, required: bool = False) -> ModelInfo | None:
    path = config_path(model_name)
    if path is None:
        if required or Path(model_name).expanduser().is_absolute() or model_name.startswith("."):
            raise UserError(f"model.name {model_name!r}: no such local directory; give a model directory with a "
                            f"config.json, 'tiny', or a hub id", field="model.name")
        return None
    if not path.is_file():
        raise UserError(f"model.name {model_name!r}: {path} is missing; a model directory needs the config.json "
                        f"that save_pretrained writes", field="model.name")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model.name: {path} is not valid JSON ({exc}); restore the model's config.json",
                        field="model.name") from None
    return from_config(cfg, source=str(path))


def from_config(cfg: dict, source: str = "<dict>") -> ModelInfo:
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"}) \
        if "hidden_size" not in cfg else cfg
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config {source} lacks {exc}; it must be a causal LM config.json "
                        f"(hidden_size, num_attention_heads, num_hidden_layers, vocab_size)", field="model.name") from None
    return ModelInfo(
        source=source,
        model_type=str(cfg.get("model_type", "unknown")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        vocab_size=vocab,
        max_positions=cfg.get("max_position_embeddings"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )
