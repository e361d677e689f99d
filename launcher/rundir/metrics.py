"""Rank 0's numbers at each logging step: the step line it prints and the record it appends to
RUN_DIR/logs/metrics.jsonl. One format for each and one parser for each, used by the loop, status,
cost, `launcher runs` and `launcher eval --plot`.

The step line:  step N/M loss X lr Y tokens/s Z        (format_step; README shows it)
                eval step N/M loss X perplexity P      (format_eval; not a training step)
                eval step N/M loss X reward_accuracy A reward_margin M   (a preference task's evaluation)
A metrics record: {"step", "loss", "lr", "tokens_per_s", "grad_norm", "time"} for a training step,
{"step", "eval_loss", "perplexity", "time"} for an evaluation; a preference task's has perplexity null
(its loss is TRL's preference loss, not a language model's) and "reward_accuracy", "reward_margin".
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.rundir import damage
from launcher.rundir.layout import RunDir

# --------------------------------------------------------------------------- the step line


def format_step(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float) -> str:
    return f"step {step}/{max_steps} loss {loss:.4f} lr {lr:.3e} tokens/s {tokens_per_s:,.0f}"


def format_eval(step: int, max_steps: int, loss: float, perplexity: float | None,
                extra: dict[str, float] | None = None) -> str:
    line = f"eval step {step}/{max_steps} loss {loss:.4f}"
    if perplexity is not None:
        line += f" perplexity {perplexity:.2f}"
    return line + "".join(f" {k} {v:.4f}" for k, v in (extra or {}).items())


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf past a loss of 50, where exp would overflow to no use."""
    return math.exp(loss) if loss < 50 else float("inf")


# TRL's evaluation keys for how well a preference model ranks chosen over rejected: DPO, ORPO, SimPO and
# KTO log rewards/..., reward models accuracy and margin
PREFERENCE_EVAL_KEYS = {"reward_accuracy": ("eval_rewards/accuracies", "eval_accuracy"),
                        "reward_margin": ("eval_rewards/margins", "eval_margin")}


def preference_eval(logs: dict[str, Any]) -> dict[str, float]:
    """reward_accuracy and reward_margin from a preference trainer's evaluation log, those it has."""
    out = {}
    for name, keys in PREFERENCE_EVAL_KEYS.items():
        v = next((logs[k] for k in keys if _is_number(logs.get(k))), None)
        if v is not None:
            out[name] = float(v)
    return out


def eval_numbers(logs: dict[str, Any], preference: bool) -> tuple[float | None, dict[str, float]]:
    """What an evaluation log says beside its loss, by the task, not by which keys happen to be there: a
    language model's perplexity, or a preference trainer's reward accuracy and margin (a preference loss has
    no perplexity; how often chosen outranks rejected says more). The one rule of the eval line and the
    manifest's metrics."""
    if preference:
        return None, preference_eval(logs)
    return perplexity(float(logs["eval_loss"])), {}


_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
# Read tolerantly: other spacing, case, "loss=" or "loss:", words between the fields (older or foreign
# lines); "step" must not be part of a longer word or name ("max_step 3/4", "x.step 3/4").
_STEP = re.compile(rf"(?<![\w.])step\s+(\d+)\s*/\s*(\d+)\b"
                   rf"(?:.*?\bloss[\s=:]+({_NUM}))?"
                   rf"(?:.*?\blr[\s=:]+({_NUM}))?"
                   rf"(?:.*?\btokens/s[\s=:]+([\d,]+(?:\.\d+)?))?", re.I)


@dataclass(frozen=True)
class StepLine:
    step: int
    max_steps: int
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None

    def complete(self) -> bool:
        return None not in (self.loss, self.lr, self.tokens_per_s)

    def to_dict(self) -> dict[str, float]:
        return {"step": self.step, "max_steps": self.max_steps, "loss": self.loss, "lr": self.lr,
                "tokens_per_s": self.tokens_per_s}  # type: ignore[dict-item]


def parse_step(line: str) -> StepLine | None:
    """The numbers of a training step line (without rank labels), or None: an eval line, or a line that
    only mentions a step ("... step 3/10" with text before it and no loss)."""
    s = line.strip()
    if s.lower().startswith("eval"):
        return None
    m = _STEP.search(s)
    if not m or not (m.group(3) or not s[: m.start()].strip()):
        return None
    num = (lambda g: float(g) if g is not None else None)
    return StepLine(int(m.group(1)), int(m.group(2)), num(m.group(3)), num(m.group(4)),
                    float(m.group(5).replace(",", "")) if m.group(5) else None)


def parse_step_lines(text: str) -> list[dict[str, float]]:
    """Every complete step line in text (format_step's five numbers), as dicts, in order."""
    found = (parse_step(line) for line in text.splitlines())
    return [s.to_dict() for s in found if s is not None and s.complete()]


# --------------------------------------------------------------------------- metrics.jsonl

def step_record(step: int, loss: float, lr: float, tokens_per_s: float, grad_norm: float | None,
                time: float) -> dict[str, Any]:
    return {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
            "time": time}


def eval_record(step: int, loss: float, perplexity: float | None, time: float,
                extra: dict[str, float] | None = None) -> dict[str, Any]:
    return {"step": step, "eval_loss": loss, "perplexity": perplexity, **(extra or {}), "time": time}


def format_eval_source(step: int, max_steps: int, source: str, loss: float) -> str:
    return f"eval step {step}/{max_steps} source {source} loss {loss:.4f}"


def eval_source_record(step: int, losses: dict[str, float], time: float) -> dict[str, Any]:
    """Held-out loss of a mixture's sources (data.sources) at a step."""
    return {"step": step, "eval_loss_by_source": losses, "time": time}


def append(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to a metrics file (RunDir.metrics_path)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


_NUMBER_KEYS = ("loss", "lr", "tokens_per_s", "grad_norm", "time", "eval_loss", "perplexity", *PREFERENCE_EVAL_KEYS)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of the run's metrics file in order. A line that is not a record of this format (a rank
    killed mid-write leaves half a line; a file edited by hand) is said on stderr and skipped. [] when there
    is no file."""
    path = RunDir(Path(run_dir)).metrics_path
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        damage.skipped(path, damage.describe(exc))
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            damage.skipped(path, f"not a JSON line ({damage.describe(exc)})", n)
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and not isinstance(rec.get("step"), bool)
                and all(rec.get(k) is None or _is_number(rec[k]) for k in _NUMBER_KEYS)):
            damage.skipped(path, "not a metrics record (an object with a whole step and numbers)", n)
            continue
        out.append(rec)
    return out


def is_train(rec: dict[str, Any]) -> bool:
    return "loss" in rec


def is_eval(rec: dict[str, Any]) -> bool:
    return "eval_loss" in rec and "loss" not in rec


def last_train(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last training record, or {}."""
    return next((r for r in reversed(records) if is_train(r)), {})


def progress(run_dir: str | os.PathLike) -> tuple[int | None, float | None]:
    """(last step, its loss): the highest step of a training record (its last record on a tie)."""
    step = loss = None
    for rec in read_records(run_dir):
        if is_train(rec) and isinstance(rec.get("step"), int) and (step is None or rec["step"] >= step):
            step, loss = rec["step"], rec["loss"]
    return step, loss


def loss_points(records: list[dict[str, Any]]) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """(train (step, loss) points, eval (step, eval_loss) points)."""
    train = [(r["step"], r["loss"]) for r in records if is_train(r) and "step" in r]
    ev = [(r["step"], r["eval_loss"]) for r in records if is_eval(r) and "step" in r]
    return train, ev
