"""What the planner knows about a model without importing torch: its config.json, and parameter
counts computed analytically for the Llama/Mistral/Qwen/Gemma family.

Where the config comes from, in order: 'tiny' (embedded) or a local model directory; for a hub id, its
config.json in the hub cache the jobs read (cluster.hf_home, else $HF_HOME, else ~/.cache/huggingface;
`launcher stage` fills it); else the published hyper-parameters of well-known models shipped in
known_models.json beside this file (each entry names its source). ModelInfo.origin says which."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import assets, hubcache
from launcher.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.spec import RunSpec

# Architectures whose parameters this module counts exactly (decoder of q/k/v/o + gated MLP + RMSNorm).
# Config keys that make the logits more than the LM head's linear map (the chunked loss computes only that).
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2"}
# Gemma 2 normalises before and after both attention and the MLP: four RMSNorm weights per layer.
LAYER_NORMS = {"olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
               "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm")}
DEFAULT_NORMS = ("input_layernorm", "post_attention_layernorm")
KNOWN_MODELS_FILE = Path(__file__).with_name("known_models.json")
# ModelInfo.origin
LOCAL, HUB_CACHE, KNOWN_TABLE = "local", "hub cache", "known-models table"


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
    scaled_logits: str | None = None  # the config key that caps or scales the logits (Gemma 2, Cohere), if any
    origin: str = LOCAL  # LOCAL, HUB_CACHE or KNOWN_TABLE: where the config came from

    def describe_origin(self) -> str:
        """Where the numbers come from, for a person."""
        if self.origin == KNOWN_TABLE:
            return (f"published hyper-parameters from launcher's table of known models (source: {self.source}); "
                    f"the model's own config.json is not in the hub cache (`launcher stage` puts it there)")
        if self.origin == HUB_CACHE:
            return f"config.json in the hub cache: {self.source}"
        return f"config.json: {self.source}"

    @property
    def norms(self) -> tuple[str, ...]:
        """The RMSNorm weights of one decoder block, by name."""
        return LAYER_NORMS.get(self.model_type, DEFAULT_NORMS)

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
        n += len(self.norms) * self.hidden_size  # the block's RMSNorm weights
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


def load_for(spec: "RunSpec") -> ModelInfo | None:
    """The ModelInfo of spec.model: local, else from the hub cache the spec's jobs read, else the table of known
    models; None for a hub id found in neither."""
    return load(spec.model.name, revision=spec.model.revision, hf_home=hubcache.hf_home(spec)[0])


def load(model_name: str, *, required: bool = False, revision: str | None = None,
         hf_home: Path | None = None) -> ModelInfo | None:
    path = config_path(model_name)
    if path is None:
        if required or Path(model_name).expanduser().is_absolute() or model_name.startswith("."):
            raise UserError(f"model.name {model_name!r}: no such local directory; give a model directory with a "
                            f"config.json, 'tiny', or a hub id", field="model.name")
        if not hubcache.HUB_ID.fullmatch(model_name):
            return None
        if hf_home is not None:
            snap = hubcache.cached_snapshot(hf_home, hubcache.HubItem("model", model_name, revision, "model.name"))
            if snap is not None and (snap / "config.json").is_file():
                return replace(from_config(read_config(snap / "config.json"), source=str(snap / "config.json")),
                               origin=HUB_CACHE)
        return known_model(model_name)
    if not path.is_file():
        raise UserError(f"model.name {model_name!r}: {path} is missing; a model directory needs the config.json "
                        f"that save_pretrained writes", field="model.name")
    return from_config(read_config(path), source=str(path))


def known_models() -> dict[str, dict[str, Any]]:
    """The shipped table: hub id -> {"config", "published_params", "source"}."""
    return json.loads(KNOWN_MODELS_FILE.read_text(encoding="utf-8"))["models"]


def known_model(model_name: str) -> ModelInfo | None:
    """The table's ModelInfo for a hub id (matched without regard to case, as the hub does), or None."""
    table = known_models()
    key = next((k for k in table if k.lower() == model_name.lower()), None)
    if key is None:
        return None
    return replace(from_config(table[key]["config"], source=table[key]["source"]), origin=KNOWN_TABLE)


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict; UserError naming the file when it is not a JSON object."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0][:160]
        raise UserError(f"model.name: {path} is not valid JSON ({why}); restore the model's config.json",
                        field="model.name") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model.name: {path} holds a JSON {type(cfg).__name__}, not the object a model's "
                        f"config.json is; restore the model's config.json", field="model.name")
    return cfg


def from_config(cfg: dict[str, Any], source: str = "<dict>") -> ModelInfo:
    if not isinstance(cfg, dict):
        raise UserError(f"model config {source} holds a JSON {type(cfg).__name__}, not an object", field="model.name")
    text = cfg.get("text_config")
    if "hidden_size" not in cfg and text is not None:
        if not isinstance(text, dict):
            raise UserError(f"model config {source}: text_config is a JSON {type(text).__name__}, not an object "
                            f"of the text model's sizes", field="model.name")
        cfg = dict(text, **{k: v for k, v in cfg.items() if k != "text_config"})
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UserError(f"model config {source} lacks {', '.join(missing)}; it must be a causal LM config.json "
                        f"({', '.join(_REQUIRED)})", field="model.name")

    def size(key: str, default: int | None = None, *, minimum: int = 1) -> int:
        v = cfg.get(key)
        if v is None and default is not None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise UserError(f"model config {source}: {key} is {_quote(v)}; it must be a whole number >= {minimum} "
                            f"(written without quotes)", field="model.name")
        return v

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    layers, vocab = size("num_hidden_layers"), size("vocab_size")
    kv = size("num_key_value_heads", heads)
    head_dim = size("head_dim", hidden // heads)
    if heads % kv:
        raise UserError(f"model config {source}: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv}", field="model.name")
    max_pos = cfg.get("max_position_embeddings")
    return ModelInfo(
        source=source,
        model_type=str(cfg.get("model_type", "unknown"))[:100],
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=size("intermediate_size", 4 * hidden),
        vocab_size=vocab,
        max_positions=None if max_pos is None else size("max_position_embeddings"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        scaled_logits=next((k for k in SCALED_LOGITS if cfg.get(k) not in (None, 1, 1.0)), None),
    )


_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _quote(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else f"a JSON {type(v).__name__}"
    return text if len(text) <= 60 else text[:60] + "..."
