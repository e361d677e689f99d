"""The baseline `launcher bench --baseline` compares with: the script a user writes from the
transformers, peft and bitsandbytes docs. No DeepSpeed, no launcher code in the training part.

    python benchmarks/baseline_hf.py --model DIR --data corpus.txt --seq-len 2048 --micro-batch 1 \
        --method qlora --precision bf16 --steps 10 --warmup 3 --out row.json

What it does, as the docs do it: `load_dataset("text", sample_by="paragraph")`, tokenize, concatenate
and cut into unpadded blocks of --seq-len (run_clm's `group_texts`), `default_data_collator`;
`AutoModelForCausalLM.from_pretrained(attn_implementation="sdpa")`; LoRA with `get_peft_model`,
QLoRA with `BitsAndBytesConfig(load_in_4bit=True)` + `prepare_model_for_kbit_training`; `Trainer` with
`bf16=True` (mixed precision: fp32 weights under autocast for full fine-tuning, the frozen base in bf16
for LoRA), the Trainer's default optimizer (transformers 5.23: `adamw_torch_fused`, on GPU and CPU alike),
the same gradient-checkpointing setting.

`--task dpo` is the script a user writes from TRL's docs instead: `load_dataset("json")` of {prompt, chosen,
rejected} records, `DPOConfig` (the same batch, precision, lr, steps, beta, `max_length` = --seq-len) and
`DPOTrainer` on the model, LoRA through `peft_config` (the reference is the adapter-disabled base) and, for
full fine-tuning, TRL's default reference: a frozen copy of the model in memory.

The measuring part at the end (marked) is launcher's own probe, the very callback its ranks use,
so both sides are timed alike: device synchronized at each step's end, warm-up steps left out. It
writes one JSON row with the bench's measured columns (tokens/s, step time, peak memory, ...) and
the raw record `launcher bench` completes into a full row (MFU, $ per 1M tokens, estimate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (config, weights, tokenizer)")
    ap.add_argument("--data", action="append", required=True, help="data file(s), or a datasets hub name")
    ap.add_argument("--data-format", default="text", help="datasets builder: text, json, parquet, csv, or hub")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed ones")
    ap.add_argument("--task", choices=["lm", "dpo"], default="lm",
                    help="lm: causal language modelling (the Trainer); dpo: TRL's DPOTrainer on preference pairs")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo: DPO's beta")
    ap.add_argument("--pair-fields", default="prompt,chosen,rejected",
                    help="dpo: the records' prompt, chosen and rejected field names")
    ap.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list of module names")
    ap.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    ap.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--output-dir", default="baseline-out")
    ap.add_argument("--out", help="write the JSON row here as well as printing it")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- the user's script

def load_model(a: argparse.Namespace):
    """The model as the docs load it: sdpa; fp32 weights for full fine-tuning (mixed precision autocasts),
    the frozen base in the compute dtype for LoRA, 4-bit for QLoRA (prepared for k-bit training)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]
    kwargs = dict(attn_implementation=a.attn)
    if a.method == "full":
        kwargs["dtype"] = torch.float32  # mixed precision keeps fp32 weights; autocast computes in bf16
    else:
        kwargs["dtype"] = compute  # the frozen base in the compute dtype
    if a.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=a.quant_type, bnb_4bit_use_double_quant=a.double_quant,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": 0} if on_gpu else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    model.config.use_cache = False
    if a.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=a.grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(a: argparse.Namespace):
    from peft import LoraConfig

    targets = a.lora_targets if a.lora_targets == "all-linear" else a.lora_targets.split(",")
    return LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def common_arguments(a: argparse.Namespace, names: set[str]) -> dict:
    """The Trainer's arguments both scripts set alike; `names`: the config class's fields."""
    import torch

    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        output_dir=a.output_dir,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.warmup + a.steps + 1,
        learning_rate=a.lr,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        bf16=a.precision == "bf16",
        fp16=a.precision == "fp16",
        # no `optim`: the Trainer's default, what a user gets (adamw_torch_fused in transformers 5.23, CPU too;
        # torch's foreach AdamW, which older baselines named on CPU, is ~60x slower there per step)
        use_cpu=not torch.cuda.is_available(),
        seed=a.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{ckpt: a.grad_ckpt, f"{ckpt}_kwargs": {"use_reentrant": False}},
    )


def build_trainer(a: argparse.Namespace):
    if a.task == "dpo":
        return build_dpo_trainer(a)
    from datasets import load_dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if a.data_format == "hub":
        raw = load_dataset(a.data[0], split="train")
    elif a.data_format == "text":
        raw = load_dataset("text", data_files=a.data, split="train", sample_by="paragraph")
    else:
        raw = load_dataset(a.data_format, data_files=a.data, split="train")

    def tokenize(batch):
        ids = tokenizer([t.strip() for t in batch[a.text_field] if t.strip()])["input_ids"]
        return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids]}

    def group_texts(batch):  # run_clm: concatenate, drop the remainder, cut into blocks
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // a.seq_len * a.seq_len
        blocks = [flat[i: i + a.seq_len] for i in range(0, n, a.seq_len)]
        return {"input_ids": blocks, "labels": [b[:] for b in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    train_ds = tokenized.map(group_texts, batched=True, batch_size=len(tokenized))

    model = load_model(a)
    if a.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(a))
    args = TrainingArguments(**common_arguments(a, {f.name for f in dataclasses.fields(TrainingArguments)}))
    return Trainer(model=model, args=args, train_dataset=train_ds, data_collator=default_data_collator)


def build_dpo_trainer(a: argparse.Namespace):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    fmt = "json" if a.data_format == "text" else a.data_format
    raw = load_dataset(a.data[0], split="train") if fmt == "hub" else load_dataset(fmt, data_files=a.data, split="train")
    names = dict(zip(a.pair_fields.split(","), ("prompt", "chosen", "rejected")))
    raw = raw.rename_columns({k: v for k, v in names.items() if k != v})
    # TRL's configs turn gradient checkpointing on by default: the same setting as launcher's run instead
    args = DPOConfig(**common_arguments(a, {f.name for f in dataclasses.fields(DPOConfig)}), beta=a.beta,
                     max_length=a.seq_len, gradient_checkpointing=a.grad_ckpt)
    return DPOTrainer(model=load_model(a), args=args, train_dataset=raw, processing_class=tokenizer,
                      peft_config=lora_config(a) if a.method in ("lora", "qlora") else None)


# --------------------------------------------------------------------------- measuring (not the user's)

def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # launcher's probe, from this tree
    from launcher.bench.probe import make_probe
    from launcher.bench.report import measured_columns

    record: dict = {"rank": 0, "world_size": 1, "error": None}
    try:
        trainer = build_trainer(a)
        probe = make_probe()
        probe.trainer = trainer
        trainer.add_callback(probe)
        trainer.train()
        record = {**probe.record(), "error": None}
    except Exception as exc:  # an OOM or a refusal is this setup's result, written as a row
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError)
        record["error"] = ("out of memory: " if oom else f"{type(exc).__name__}: ") + str(exc)[:500]
        record["oom"] = oom
    # a pair is two sequences (chosen, rejected), as launcher's plan counts them
    tokens_per_step = a.micro_batch * a.grad_accum * a.seq_len * (2 if a.task == "dpo" else 1)
    row = {"kind": "baseline", "task": a.task, "method": a.method, "precision": a.precision, "grad_ckpt": a.grad_ckpt,
           "attn": a.attn, "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup,
           **measured_columns([record], tokens_per_step, a.warmup, a.steps), "record": record}
    text = json.dumps(row)
    print(text, flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0 if row.get("error") is None else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
