"""Evaluation: loss and perplexity of a tuned model beside its base, so that improvement and
forgetting are numbers.

Sets evaluated, each for the tuned model and for the base model:
- in-distribution: the run's held-out split (data.eval_fraction > 0), tokenized exactly as for
  training; without one, a slice of the training data, marked as seen in training;
- reference sets (out-of-distribution): files given with --data, else the embedded corpus; each is
  tokenized with the run's tokenizer and seq_len (plain text as pretraining blocks, prompt/response or
  chat records as SFT examples).

loss = mean cross-entropy per predicted token over the whole set (token-weighted across batches),
perplexity = exp(loss). delta = tuned - base: below 0 the tuned model is better there; above 0 on a
reference set it has forgotten some of what the base knew. For SFT-shaped sets, exact match of the
greedy completion of a sample of prompts with their reference responses.

Preference sets (a preference run's held-out split, a --data file of {prompt, chosen, rejected} records): for
each model, the log-probability it gives each response after its prompt (summed over the response's tokens).
A response's log-ratio is log p_model - log p_base, DPO's implicit reward over beta. pref_accuracy = the share
of pairs whose chosen log-ratio beats the rejected one; reward_margin = the mean of beta x (chosen log-ratio -
rejected log-ratio), beta the run's pref.beta (TRL's rewards/accuracies and rewards/margins). For the base
itself both log-ratios are 0: pref_accuracy 0 and reward_margin 0 by definition. What each model prefers on
its own: logp_accuracy = the share of pairs whose chosen response gets the higher log-probability,
logp_margin = the mean of log p(chosen) - log p(rejected), nats. A reward model (task rm) scores each pair with its
reward head: pref_accuracy = the share of pairs whose chosen response gets the higher reward, reward_margin = the
mean reward difference; it has no base column (the base has no trained reward head) and no reference-corpus loss.

Runs in one process on CPU or one GPU; no DeepSpeed. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import assets, outpaths
from launcher.config import spec as spec_mod
from launcher.config.resolve import with_overrides
from launcher.config.spec import PREFERENCE_TASKS, RunSpec
from launcher.data import build as data_mod
from launcher.data import shardprep
from launcher.data.mixture import eval_blocks_of, source_rows
from launcher.data.check import sample_records, sft_shape
from launcher.data.collate import make_collator
from launcher.data.source import data_files
from launcher.errors import UserError
from launcher.model import load as model_mod
from launcher.model.load import ADAPTER_CONFIG, has_weights, read_adapter_config
from launcher.plan.modelinfo import read_config
from launcher.plan.plan import settled
from launcher.rank.trackers import log_eval_job
from launcher.rundir import metrics
from launcher.rundir.layout import RunDir, open_run_dir

FORGETTING_TOLERANCE = 0.01  # nats per token: a reference-set loss rise above this counts as forgetting


@dataclass
class EvalSet:
    name: str
    kind: str  # "in-distribution" or "reference"
    source: str
    spec: RunSpec  # the data section says how it was tokenized
    held_out: bool = True
    note: str = ""
    rows: Any = None  # a datasets.Dataset once loaded
    mixture_source: int | None = None  # data.sources index: rows are that source's blocks


@dataclass
class Target:
    """What is evaluated: the tuned model (a full model or a peft adapter) and the base beside it."""

    tuned: Path
    base: str | None
    spec: RunSpec
    run_dir: Path | None = None
    adapter: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what to evaluate

def _newest_checkpoint_with_weights(run_dir: Path) -> Path | None:
    ckpts = []
    for p in RunDir(run_dir).checkpoints.glob("checkpoint-*"):
        if p.name.split("-")[-1].isdigit() and has_weights(p, adapter=True):
            ckpts.append((int(p.name.split("-")[-1]), p))
    return max(ckpts)[1] if ckpts else None


def resolve_target(target: str | Path, *, base: str | None = None, seq_len: int | None = None) -> Target:
    """RUN_DIR (its final model, else its newest checkpoint; base: the model it started from) or a
    model directory (full model or peft adapter; base: --base, else the adapter's own base)."""

    try:
        path = Path(target).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.resolve's "Symlink loop from ..."
        raise UserError(f"{target}: cannot be opened ({exc}); give a run dir or a model directory") from None
    if not path.is_dir():
        raise UserError(f"{target}: not a directory; give a run dir (made by `launcher run --out`) or a model "
                        f"directory (save_pretrained output or a peft adapter)")
    if RunDir(path).spec_path.is_file():
        rd = open_run_dir(path)
        spec = rd.load_spec()
        if seq_len:
            spec = with_overrides(spec, {"data": {"seq_len": seq_len}})
        notes = []
        if spec.task == "rm":
            notes.append("a reward model: each pair is scored by its reward head; the base has no trained reward head "
                         "(no base column) and the model no language-model head (no reference-corpus loss)")
        tuned = rd.final
        if not has_weights(tuned, adapter=True):
            ck = _newest_checkpoint_with_weights(rd.path)
            if ck is None:
                raise UserError(f"{rd.path} holds no trained model yet (no final/ and no checkpoint with weights); "
                                f"train it first (`launcher run`)")
            tuned = ck
            notes.append(f"no final model: evaluating the newest checkpoint {ck.name}")
        if base is None:
            base = model_mod.model_source(spec)
            if spec.model.name == model_mod.TINY:
                base = str(rd.base)
        return Target(tuned=tuned, base=base, spec=spec, run_dir=rd.path,
                      adapter=(tuned / ADAPTER_CONFIG).is_file(), notes=notes)
    adapter = (path / ADAPTER_CONFIG).is_file()
    if not adapter and not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a run dir (spec.yaml), a model (config.json) nor a peft adapter "
                        f"(adapter_config.json)")
    if not adapter:
        read_config(path / "config.json")  # a config.json that is not a JSON object: exit 2 naming it
    if adapter and base is None:
        base = read_adapter_config(path).get("base_model_name_or_path")
        if not base or not isinstance(base, str):
            raise UserError(f"{path}/adapter_config.json names no base model; give --base MODEL")
    model_name = base if adapter else str(path)
    tree: dict[str, Any] = {"model": {"name": model_name}, "data": {"seq_len": seq_len or 256},
                            "precision": {"dtype": "fp32"}}
    if adapter:
        method = read_adapter_config(path).get("peft_type", "LORA")
        tree["method"] = {"name": {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix",
                                   "PROMPT_TUNING": "prompt"}.get(str(method), "lora")}
    spec = spec_mod.validate(tree)
    return Target(tuned=path, base=base, spec=spec, adapter=adapter)


def _reference_spec(spec: RunSpec, file: Path) -> RunSpec:
    """The run's spec reading `file` instead: same tokenizer and seq_len, no split, no packing."""
    if not file.exists():
        raise UserError(f"--data {file}: no such file or folder")
    probe = with_overrides(spec, {"task": "pretrain", "data": {"path": str(file), "eval_fraction": 0.0,
                                                               "packing": False, "format": "auto",
                                                               "sources": [], "stages": [], "doc_mask": False}})
    fmt, files = data_files(probe)
    task = "pretrain"
    if fmt != "txt":
        for _, record in sample_records(files[0], fmt, probe):
            if isinstance(record, dict) and probe.data.chosen_field in record and probe.data.rejected_field in record:
                task = "dpo"  # preference pairs: pref_accuracy and reward_margin, not a loss
            elif isinstance(record, dict) and sft_shape(record, probe) is not None \
                    and probe.data.text_field not in record:
                task = "sft"
            break
    return with_overrides(probe, {"task": task})


def eval_sets(t: Target, data: list[str] | tuple[str, ...] = ()) -> list[EvalSet]:
    sets: list[EvalSet] = []
    spec = t.spec
    if t.run_dir is not None and spec.data.sources:  # a mixture: each source's held-out blocks, one set each
        for k, source in enumerate(spec.data.sources):
            if eval_blocks_of(spec, k):
                sets.append(EvalSet(f"held-out {source.name}", "in-distribution", source.path, spec, mixture_source=k))
            else:
                sets.append(EvalSet(f"source {source.name}", "in-distribution", source.path, spec, held_out=False,
                                    mixture_source=k, note="seen in training (no held-out blocks: set its eval_fraction)"))
    elif t.run_dir is not None:
        src = spec.data.path or f"embedded {data_files(spec)[1][0].name}"
        if spec.data.eval_fraction > 0:
            sets.append(EvalSet("held-out split", "in-distribution", src, spec))
        else:
            sets.append(EvalSet("training data", "in-distribution", src, spec, held_out=False,
                                note="seen in training (the run has no held-out split: set data.eval_fraction)"))
    refs = [Path(d).expanduser() for d in data] or ([] if spec.task == "rm" else [assets.tiny_dir() / "corpus.txt"])
    for f in refs:
        name = "embedded corpus" if not data else f.name
        sets.append(EvalSet(name, "reference", str(f), _reference_spec(spec, f.resolve())))
    return sets


def load_rows(s: EvalSet, max_rows: int) -> None:
    """Tokenize (through the data cache) and pick at most max_rows rows, evenly spread over the set."""
    if s.mixture_source is not None:
        shardprep.prepare(s.spec)  # a no-op when the shards are complete
        ds = source_rows(s.spec, s.mixture_source, held_out=s.held_out)
        picks = range(len(ds)) if len(ds) <= max_rows else [int(k * len(ds) / max_rows) for k in range(max_rows)]
        s.rows = [ds[j] for j in picks]
        return
    data_mod.prepare(s.spec)  # checks the data first; a no-op when the run's own data is cached
    split = "eval" if (s.kind == "in-distribution" and s.held_out) else "train"
    ds = data_mod.load_prepared(s.spec, split=split)
    if len(ds) > max_rows:
        step = len(ds) / max_rows
        ds = ds.select([int(k * step) for k in range(max_rows)])
    s.rows = ds


# --------------------------------------------------------------------------- models

def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    return device


def eval_dtype(spec: RunSpec, device: str) -> str:
    spec = settled(spec)
    if spec.method.name == "qlora":
        return spec.precision.dtype if spec.precision.dtype != "fp32" else "bf16"
    return spec.precision.dtype if device == "cuda" else "fp32"  # CPU: fp32 (no fp16 kernels, exact numbers)


def load_model(t: Target, which: str, device: str) -> Any:
    """The tuned model (`which="tuned"`) or the base model, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = settled(t.spec)
    dtype = eval_dtype(spec, device)
    kwargs: dict[str, Any] = {"dtype": model_mod.torch_dtype(dtype), "trust_remote_code": spec.model.trust_remote_code}
    qlora = spec.method.name == "qlora"
    if qlora:
        kwargs["quantization_config"] = model_mod.quantization_config(spec)
        kwargs["device_map"] = {"": "cuda:0" if device == "cuda" else "cpu"}
    src = str(t.tuned) if which == "tuned" and not t.adapter else t.base
    if src is None:
        raise UserError("no base model to compare with; give --base MODEL")
    auto: Any = AutoModelForCausalLM
    if spec.task == "rm":  # a reward model: one score per sequence (rank/loop.py loads it so)
        from transformers import AutoModelForSequenceClassification

        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    try:
        model = auto.from_pretrained(src, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load model {src} ({exc})") from None
    if qlora:
        model_mod.fix_bnb_cpu_inference(model)
    if which == "tuned" and t.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(t.tuned))
    if not qlora:
        model = model.to(device)
    model.eval()
    return model


# --------------------------------------------------------------------------- measuring

def loss_on(model: Any, s: EvalSet, tokenizer: Any, batch_size: int, device: str) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over the set: sum over batches of (the model's mean loss x
    its predicted tokens) / all predicted tokens. Predicted tokens: labels != -100 after the shift."""
    import torch

    collate = make_collator(s.spec, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(s.rows), batch_size):
            batch = collate([s.rows[j] for j in range(k, min(k + batch_size, len(s.rows)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            batch = {key: v.to(device) for key, v in batch.items()}
            out = model(**batch, use_cache=False)
            loss = float(out.loss)
            total += loss * n
            count += n
    if count == 0:
        raise UserError(f"{s.name} ({s.source}): no tokens to predict")
    mean = total / count
    return {"loss": mean, "perplexity": metrics.perplexity(mean), "tokens": count}


def _response_ids(tokenizer: Any, prompt: Any, response: Any, seq_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + response (chat messages through the chat template; a text response ends in EOS, as
    TRL's trainers train it) cut to seq_len, and where the response starts: where the prompt's own tokens and
    the whole's part (as TRL finds the completion)."""
    if isinstance(prompt, list):
        p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        f_text = tokenizer.apply_chat_template(prompt + list(response), tokenize=False)
        p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(f_text, add_special_tokens=False)["input_ids"]
    else:
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    start = next((k for k, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return full[:seq_len], start


def preference_on(model: Any, s: EvalSet, tokenizer: Any, device: str) -> dict[str, Any]:
    """logp_accuracy and logp_margin of `model` on a set of {prompt, chosen, rejected} rows, and each pair's
    log-probabilities (chosen, rejected), from which preference_scores takes the log-ratios (module docstring)."""
    import torch

    if "chosen" not in s.rows.column_names:
        raise UserError(f"{s.name} ({s.source}): no chosen/rejected pairs to compare (a kto run's held-out split is "
                        f"unpaired); give a paired set with --data", field="data.path")

    def logp(ids: list[int], start: int) -> float:
        if start >= len(ids):
            return 0.0  # the response was cut away entirely by seq_len
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits.float()[0, :-1]
        lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
        return float(lp[start - 1:].sum()) if start > 0 else float(lp.sum())

    logps = []
    for row in s.rows:
        c = logp(*_response_ids(tokenizer, row["prompt"], row["chosen"], s.spec.data.seq_len))
        r = logp(*_response_ids(tokenizer, row["prompt"], row["rejected"], s.spec.data.seq_len))
        logps.append((c, r))
    if not logps:
        raise UserError(f"{s.name} ({s.source}): no pairs to evaluate")
    return {"logp_accuracy": sum(c > r for c, r in logps) / len(logps),
            "logp_margin": sum(c - r for c, r in logps) / len(logps), "pairs": len(logps), "logps": logps}


def preference_scores(tuned: list[tuple[float, float]], base: list[tuple[float, float]] | None,
                      beta: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """pref_accuracy and reward_margin of the tuned model and of the base (module docstring), from each pair's
    (chosen, rejected) log-probabilities under each. Without a base there is no log-ratio: None."""
    if base is None:
        return {"pref_accuracy": None, "reward_margin": None}, {}
    ratios = [(tc - bc) - (tr - br) for (tc, tr), (bc, br) in zip(tuned, base)]
    return ({"pref_accuracy": sum(m > 0 for m in ratios) / len(ratios),
             "reward_margin": beta * sum(ratios) / len(ratios)},
            {"pref_accuracy": 0.0, "reward_margin": 0.0})


def rewards_on(model: Any, s: EvalSet, tokenizer: Any, device: str) -> dict[str, Any]:
    """A reward model on a set of pairs: pref_accuracy = the share of pairs whose chosen response (after its
    prompt) gets the higher reward, reward_margin = the mean of reward(chosen) - reward(rejected)."""
    import torch

    def reward(ids: list[int]) -> float:
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids], device=device)).logits.float()[0, 0])

    pairs = [(reward(_response_ids(tokenizer, row["prompt"], row["chosen"], s.spec.data.seq_len)[0]),
              reward(_response_ids(tokenizer, row["prompt"], row["rejected"], s.spec.data.seq_len)[0])) for row in s.rows]
    if not pairs:
        raise UserError(f"{s.name} ({s.source}): no pairs to evaluate")
    return {"pref_accuracy": sum(c > r for c, r in pairs) / len(pairs),
            "reward_margin": sum(c - r for c, r in pairs) / len(pairs), "pairs": len(pairs)}


def sft_samples(s: EvalSet, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference response ids) of up to n examples: each row's first response span."""
    out = []
    for row in s.rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if "position_ids" in row:  # a packed row: its first example only
            pos = list(row["position_ids"])
            end = next((j for j in range(1, len(pos)) if pos[j] == 0), len(pos))
            ids, labels = ids[:end], labels[:end]
        start = next((j for j, x in enumerate(labels) if x != -100), None)
        if not start:
            continue
        stop = next((j for j in range(start, len(labels)) if labels[j] == -100), len(labels))
        out.append((ids[:start], ids[start:stop]))
        if len(out) >= n:
            break
    return out


def exact_match(model: Any, tokenizer: Any, samples: list[tuple[list[int], list[int]]], device: str,
                max_new_tokens: int) -> float:
    """Share of samples whose greedy completion equals the reference response (decoded, special
    tokens dropped, outer whitespace stripped)."""
    import torch

    hits = 0
    for prompt, ref in samples:
        want = tokenizer.decode(ref, skip_special_tokens=True).strip()
        x = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=min(max_new_tokens, len(ref) + 1), use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
        hits += got == want
    return hits / len(samples) if samples else float("nan")


# --------------------------------------------------------------------------- the whole evaluation

def evaluate(target: str | Path, *, data: list[str] | tuple[str, ...] = (), base: str | None = None,
             max_rows: int = 200, batch_size: int = 8, samples: int = 16, max_new_tokens: int = 64,
             device: str = "auto", seq_len: int | None = None,
             tolerance: float = FORGETTING_TOLERANCE) -> dict[str, Any]:
    import gc

    t0 = time.time()
    t = resolve_target(target, base=base, seq_len=seq_len)  # bad input fails here, before heavy imports
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    dev = pick_device(device)
    sets = eval_sets(t, data)
    for s in sets:
        load_rows(s, max_rows)
    tokenizer = model_mod.load_tokenizer(t.spec) if t.run_dir is not None else model_mod.load_tokenizer_from(
        t.tuned if (t.tuned / "tokenizer_config.json").is_file() else t.base)
    sft = {s.name: sft_samples(s, samples) for s in sets if s.spec.task == "sft"}

    results: dict[str, dict[str, Any]] = {s.name: {} for s in sets}
    reward_model = t.spec.task == "rm"
    for which in ("tuned", "base"):
        if which == "base" and (t.base is None or reward_model):
            continue
        model = load_model(t, which, dev)
        for s in sets:
            if reward_model:
                results[s.name][which] = rewards_on(model, s, tokenizer, dev)
                continue
            if s.spec.task in PREFERENCE_TASKS:
                results[s.name][which] = preference_on(model, s, tokenizer, dev)
                continue
            r = loss_on(model, s, tokenizer, batch_size, dev)
            results[s.name][which] = r
            if sft.get(s.name):
                results[s.name].setdefault("exact_match", {"samples": len(sft[s.name])})[which] = \
                    exact_match(model, tokenizer, sft[s.name], dev, max_new_tokens)
        del model
        gc.collect()

    out_sets = []
    for s in sets:
        r = results[s.name]
        tuned, based = r["tuned"], r.get("base")
        if reward_model:
            out_sets.append({"name": s.name, "kind": s.kind, "source": s.source, "task": "rm", "held_out": s.held_out,
                             "rows": tuned["pairs"], "tokens": None, "tuned": tuned, "base": None, "delta_loss": None,
                             **({"note": s.note} if s.note else {})})
            continue
        if s.spec.task in PREFERENCE_TASKS:
            tl, bl = tuned.pop("logps"), based.pop("logps") if based else None
            t_scores, b_scores = preference_scores(tl, bl, s.spec.pref.beta)
            out_sets.append({"name": s.name, "kind": s.kind, "source": s.source, "task": s.spec.task,
                             "held_out": s.held_out, "rows": tuned["pairs"], "tokens": None, "beta": s.spec.pref.beta,
                             "tuned": {**t_scores, **tuned}, "base": {**b_scores, **based} if based else None,
                             "delta_loss": None, **({"note": s.note} if s.note else {})})
            continue
        entry: dict[str, Any] = {
            "name": s.name, "kind": s.kind, "source": s.source, "task": s.spec.task, "held_out": s.held_out,
            "rows": len(s.rows), "tokens": tuned["tokens"],
            "tuned": {"loss": tuned["loss"], "perplexity": tuned["perplexity"]},
            "base": {"loss": based["loss"], "perplexity": based["perplexity"]} if based else None,
            "delta_loss": tuned["loss"] - based["loss"] if based else None,
        }
        if s.note:
            entry["note"] = s.note
        if "exact_match" in r:
            entry["exact_match"] = r["exact_match"]
        out_sets.append(entry)
    refs = [e for e in out_sets if e["kind"] == "reference" and e["delta_loss"] is not None]
    ind = [e for e in out_sets if e["kind"] == "in-distribution" and e["delta_loss"] is not None]
    return {
        "target": str(Path(target).expanduser().resolve()),
        "run_dir": str(t.run_dir) if t.run_dir else None,
        "tuned": str(t.tuned), "base": t.base, "adapter": t.adapter, "method": t.spec.method.name,
        "device": dev, "dtype": eval_dtype(t.spec, dev), "seq_len": t.spec.data.seq_len,
        "sets": out_sets,
        "in_distribution_delta": ind[0]["delta_loss"] if ind else None,
        "reference_delta": max(e["delta_loss"] for e in refs) if refs else None,
        "forgetting_tolerance": tolerance,
        "forgetting_detected": any(e["delta_loss"] > tolerance for e in refs) if refs else None,
        "notes": t.notes,
        "seconds": round(time.time() - t0, 1),
    }


def evaluate_and_write(target: str | Path, *, out: str | None = None, plot: str | None = None, force: bool = False,
                       **kw: Any) -> tuple[dict[str, Any], list[Path]]:
    """`launcher eval`: evaluate, then write the results as JSON into RUN_DIR/eval.json (a run dir) and
    `out`, and with `plot` the run's loss curves; the results and the files written. An existing `out` or
    `plot` file is refused before anything is evaluated, unless `force`."""
    if plot and not RunDir(Path(target)).spec_path.is_file():
        raise UserError("--plot reads RUN_DIR/logs/metrics.jsonl; give a run dir")
    for flag, path in (("--out", out), ("--plot", plot)):
        if path:
            resolved = outpaths.resolve(path, flag)
            if resolved.is_dir():
                raise UserError(f"{flag} {path} is a folder; give a file path", field=flag)
            if resolved.exists() and not force:
                raise UserError(f"{flag} {path} exists; choose another path or pass --force to replace it",
                                field=flag)
    res = evaluate(target, **kw)
    text = json.dumps(res, indent=2) + "\n"
    written = []
    if res["run_dir"]:
        p = RunDir(Path(res["run_dir"])).eval_path
        p.write_text(text)
        written.append(p)
        log_eval_job(Path(res["run_dir"]), res)  # into the run's one tracker run (wandb, mlflow), when it has one
    if out:
        dest = Path(out).expanduser()
        with outpaths.writing(dest, "--out"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        written.append(dest)
    if plot:
        written.append(plot_losses(target, plot))
    return res, written


def format_table(res: dict[str, Any]) -> str:
    def f(x: Any, spec: str = ".4f") -> str:
        return "-" if x is None else format(x, spec)

    head = ("set", "kind", "rows", "tokens", "tuned loss", "tuned ppl", "base loss", "base ppl", "delta")
    rows = [head]
    for e in res["sets"]:
        b = e["base"] or {}
        if "pref_accuracy" in e["tuned"]:
            continue  # preference sets: their own lines below
        rows.append((e["name"] + ("" if e["held_out"] else " (seen)"), e["kind"], str(e["rows"]), str(e["tokens"]),
                     f(e["tuned"]["loss"]), f(e["tuned"]["perplexity"], ".2f"), f(b.get("loss")),
                     f(b.get("perplexity"), ".2f"), f(e["delta_loss"], "+.4f")))
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for e in res["sets"]:
        if e["task"] == "rm":
            lines.append(f"reward model on {e['name']} ({e['rows']} pairs): pref_accuracy "
                         f"{f(e['tuned']['pref_accuracy'], '.3f')} (reward(chosen) > reward(rejected)), reward_margin "
                         f"{f(e['tuned']['reward_margin'], '+.3f')} (mean reward difference)")
        elif "pref_accuracy" in e["tuned"]:
            b = e["base"] or {}
            lines.append(f"preference on {e['name']} ({e['rows']} pairs): pref_accuracy tuned "
                         f"{f(e['tuned']['pref_accuracy'], '.3f')}, base {f(b.get('pref_accuracy'), '.3f')} (chosen's "
                         f"log-ratio to the base beats rejected's); reward_margin tuned "
                         f"{f(e['tuned']['reward_margin'], '+.3f')}, base {f(b.get('reward_margin'), '+.3f')} (beta "
                         f"{e['beta']:g} x the log-ratio margin); logp_accuracy tuned "
                         f"{f(e['tuned']['logp_accuracy'], '.3f')}, base {f(b.get('logp_accuracy'), '.3f')} (log "
                         f"p(chosen) > log p(rejected))")
        em = e.get("exact_match")
        if em:
            lines.append(f"exact match on {e['name']} ({em['samples']} greedy completions): "
                         f"tuned {f(em.get('tuned'), '.2f')}, base {f(em.get('base'), '.2f')}")
        if e.get("note"):
            lines.append(f"note: {e['name']}: {e['note']}")
    lines.append(f"tuned {res['tuned']}" + (" (adapter)" if res["adapter"] else ""))
    lines.append(f"base  {res['base'] or '(none: give --base MODEL to compare)'}")
    if res["forgetting_detected"] is not None:
        verdict = "FORGETTING: the tuned model is worse than its base on a reference set" \
            if res["forgetting_detected"] else "no forgetting above the tolerance"
        lines.append(f"{verdict} (largest reference delta {res['reference_delta']:+.4f} nats/token, "
                     f"tolerance {res['forgetting_tolerance']})")
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def plot_losses(run_dir: str | Path, png: str | Path) -> Path:
    """PNG of training loss (and eval loss, when the run evaluated) over steps, from the run's metrics
    file (RunDir.metrics_path)."""
    path = RunDir(Path(run_dir)).metrics_path
    if not path.is_file():
        raise UserError(f"{path} does not exist: --plot needs a run dir whose training wrote its metrics")
    train, ev = metrics.loss_points(metrics.read_records(run_dir))
    if not train and not ev:
        raise UserError(f"{path} holds no loss records yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*sorted(train)), label="train loss", lw=1.2)
    if ev:
        ax.plot(*zip(*sorted(ev)), "o-", label="eval loss (held-out split)", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(png).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
