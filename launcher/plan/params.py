"""Trainable and frozen parameter counts per method, from config.json alone: exact LoRA/DoRA/IA3/
prefix/prompt sizes as peft builds them, and the names method freeze selects. The plan, the
estimator, pre-flight and the model builder all count here."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.plan.modelinfo import ModelInfo


@dataclass(frozen=True)
class Params:
    total: int
    trainable: int
    frozen_quantized: int  # QLoRA: weights stored in 4 bit
    frozen_dense: int  # frozen weights kept in the compute dtype
    largest_layer: int
    matmul: int  # every matmul weight incl. the LM head (MFU)
    matmul_trainable: int


def _unknown_targets(m: ModelInfo, field: str, names: list[str], shapes: dict[str, tuple[int, int]]) -> None:
    unknown = [t for t in names if t not in shapes]
    if unknown:
        raise UserError(f"{field}: {unknown} are not linear layers of a {m.model_type} block; "
                        f"choose from {sorted(shapes)}" + (" or 'all-linear'" if "lora" in field else ""), field=field)


def lora_params(m: ModelInfo, spec: RunSpec) -> tuple[int, list[str]]:
    """Exact LoRA parameter count: r x (in + out) per adapted linear, per layer; DoRA adds one
    magnitude per output feature of each adapted linear."""
    lora = spec.method.lora
    shapes = m.linear_shapes()
    if lora.target_modules == "all-linear":
        targets = list(shapes)  # peft's all-linear: every linear but the output layer
    else:
        _unknown_targets(m, "method.lora.target_modules", list(lora.target_modules), shapes)
        targets = list(lora.target_modules)
    n = m.num_layers * sum(lora.r * (shapes[t][0] + shapes[t][1]) for t in targets)
    if spec.method.name == "dora":
        n += dora_magnitudes(m, targets)
    for name in lora.modules_to_save:  # full copies of these modules train
        if name in ("lm_head",):
            n += m.vocab_size * m.hidden_size
        elif name in ("embed_tokens",):
            n += m.vocab_size * m.hidden_size
    return n, targets


def dora_magnitudes(m: ModelInfo, targets: list[str]) -> int:
    shapes = m.linear_shapes()
    return m.num_layers * sum(shapes[t][1] for t in targets)


def ia3_params(m: ModelInfo, spec: RunSpec) -> int:
    """IA3: one learned scale per output feature of each target, per input feature for feed-forward ones."""
    ia = spec.method.ia3
    shapes = m.linear_shapes()
    _unknown_targets(m, "method.ia3.target_modules", list(ia.target_modules), shapes)
    return m.num_layers * sum(shapes[t][0] if t in ia.feedforward_modules else shapes[t][1] for t in ia.target_modules)


def prefix_params(m: ModelInfo, spec: RunSpec) -> int:
    """Prefix tuning as peft builds it: a key and a value vector per virtual token and layer, each
    key/value heads x head dim wide (grouped-query attention); with projection, an embedding of that
    width and a 2-layer MLP (width -> hidden -> layers x 2 x width) produce them."""
    pf = spec.method.prefix
    width = m.num_kv_heads * m.head_dim
    out = m.num_layers * 2 * width
    if not pf.projection:
        return pf.num_virtual_tokens * out
    hid = pf.projection_hidden or width
    return pf.num_virtual_tokens * width + (width * hid + hid) + (hid * out + out)


def prompt_params(m: ModelInfo, spec: RunSpec) -> int:
    """Prompt tuning: one embedding row per virtual token."""
    return spec.method.prompt.num_virtual_tokens * m.hidden_size


def param_names(m: ModelInfo) -> list[tuple[str, int, str]]:
    """(name, size, tensor) of every parameter as transformers names it for the Llama family, the
    tied LM head listed too (tensor: the name of the tensor it shares). Sizes add up to total_params()."""
    h = m.hidden_size
    shapes = m.linear_shapes()
    out: list[tuple[str, int, str]] = [("model.embed_tokens.weight", m.embedding_params(), "model.embed_tokens.weight")]
    for layer in range(m.num_layers):
        pre = f"model.layers.{layer}."
        for t, (a, b) in shapes.items():
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((f"{pre}{part}.{t}.weight", a * b, f"{pre}{part}.{t}.weight"))
            bias = (m.attention_bias and part == "self_attn" and not (t == "o_proj" and m.model_type == "qwen2")) \
                or (m.mlp_bias and part == "mlp")
            if bias:
                out.append((f"{pre}{part}.{t}.bias", b, f"{pre}{part}.{t}.bias"))
        if m.model_type == "qwen3":
            for t in ("q_norm", "k_norm"):
                out.append((f"{pre}self_attn.{t}.weight", m.head_dim, f"{pre}self_attn.{t}.weight"))
        for t in m.norms:
            out.append((f"{pre}{t}.weight", h, f"{pre}{t}.weight"))
    out.append(("model.norm.weight", h, "model.norm.weight"))
    out.append(("lm_head.weight", m.vocab_size * h,
                "model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight"))
    return out


def _name_matches(name: str, pattern: str) -> bool:
    """`pattern`'s dotted parts equal a run of `name`'s parts, each part with * / ? wildcards:
    'norm' is model.norm (not input_layernorm), 'mlp' every MLP, 'layers.3' the fourth layer."""
    parts, pat = name.split("."), pattern.split(".")
    return any(all(fnmatch.fnmatchcase(parts[k + j], pat[j]) for j in range(len(pat)))
               for k in range(len(parts) - len(pat) + 1))


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def freeze_selection(names: list[str], freeze: Any, num_layers: int) -> set[str]:
    """The parameter names that train under method freeze: those method.freeze.train_modules match,
    and those of the last method.freeze.top_layers decoder layers. UserError for a name that matches
    nothing or more layers than the model has. Shared by the counts here (names from config.json) and
    the model builder (names from the instantiated model)."""
    if freeze.top_layers > num_layers:
        raise UserError(f"method.freeze.top_layers={freeze.top_layers} but the model has {num_layers} layers; "
                        f"use at most {num_layers}", field="method.freeze.top_layers")
    chosen: set[str] = set()
    for pat in freeze.train_modules:
        hit = {n for n in names if _name_matches(n, pat)}
        if not hit:
            examples = ", ".join(n for n in names if _layer_index(n) in (None, 0))
            raise UserError(f"method.freeze.train_modules: {pat!r} matches no parameter of this model; names are "
                            f"dotted parts of: {examples} (layers 1.. alike)", field="method.freeze.train_modules")
        chosen |= hit
    first = num_layers - freeze.top_layers
    chosen |= {n for n in names if (_layer_index(n) is not None and _layer_index(n) >= first)}  # type: ignore[operator]
    return chosen


def freeze_params(m: ModelInfo, spec: RunSpec) -> tuple[int, int]:
    """(trainable, trainable matmul weights) under method freeze, each shared tensor counted once."""
    table = param_names(m)
    chosen = freeze_selection([n for n, _, _ in table], spec.method.freeze, m.num_layers)
    tensors = {t: size for n, size, t in table if n in chosen}
    head = {n for n, _, t in table if n == "lm_head.weight" and (n in chosen or t in tensors)}
    matmul = sum(size for n, size, _ in table if n.endswith("_proj.weight") and n in chosen)
    matmul += m.vocab_size * m.hidden_size if head else 0  # the LM head's matmul trains (tied: with the embedding)
    return sum(tensors.values()), matmul


def count_params(m: ModelInfo, spec: RunSpec) -> Params:
    """Total, trainable and frozen parameters of spec.method on model m (UserError for an architecture
    config.json alone cannot count, or target modules the model lacks)."""
    if not m.counted:
        raise UserError(f"model type {m.model_type!r} ({m.source}): the estimator counts the Llama/Mistral/Qwen "
                        f"family from config.json; estimate this architecture on a GPU with `launcher bench`",
                        field="model.name")
    total = m.total_params()
    linear = m.num_layers * sum(a * b for a, b in m.linear_shapes().values())
    largest = max(m.vocab_size * m.hidden_size, max(a * b for a, b in m.linear_shapes().values()))
    method = spec.method.name
    matmul = m.matmul_params()
    if method == "full":
        return Params(total, total, 0, 0, largest, matmul, matmul)
    if method == "freeze":
        n, n_matmul = freeze_params(m, spec)
        return Params(total, n, 0, total - n, largest, matmul, n_matmul)
    if method in ("ia3", "prefix", "prompt"):  # scales or virtual tokens: no trainable matmul per token
        n = {"ia3": ia3_params, "prefix": prefix_params, "prompt": prompt_params}[method](m, spec)
        return Params(total + n, n, 0, total, largest, matmul, 0)
    lora, targets = lora_params(m, spec)
    lora_matmul = lora - (dora_magnitudes(m, targets) if method == "dora" else 0)
    quantized = linear if method == "qlora" else 0
    return Params(total + lora, lora, quantized, total - quantized, largest, matmul + lora_matmul, lora_matmul)
