"""Replay against forgetting, measured on the tiny model (README "Pretraining mixtures"):

1. a base that knows general text: the tiny Llama trained on the embedded corpus;
2. from it, continued pretraining on narrow text (one repeated sentence) alone, and the same with a replay
   source (the first half of the embedded corpus's paragraphs) at weight 0.2;
3. `launcher eval` of both against the held-out second half of the corpus (a reference neither saw in step 2).

  python benchmarks/replay_recipe.py --out DIR     (writes DIR/replay.json, prints the table)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
COMMON = ["--precision", "fp32", "--zero", "2", "--seq-len", "64", "--micro-batch", "8", "--lr", "3e-3",
          "--set", "output.log_every=10"]


def launcher(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cp = subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], env=env, text=True, capture_output=True)
    if cp.returncode != 0:
        raise SystemExit(f"launcher {' '.join(map(str, args[:2]))} exited {cp.returncode}\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
    return cp.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    paras = [p for p in (ROOT / "launcher" / "tiny" / "corpus.txt").read_text().split("\n\n") if p.strip()]
    half = len(paras) // 2
    (out / "replay.txt").write_text("\n\n".join(paras[:half]) + "\n")
    (out / "reference.txt").write_text("\n\n".join(paras[half:]) + "\n")
    (out / "narrow.txt").write_text("\n\n".join([SENTENCE] * 2000) + "\n")
    launcher("run", *COMMON, "--max-steps", "40", "--out", out / "base", "--force")
    base = out / "base" / "final"
    rows = {}
    for name, sources in {
        "narrow only": [{"name": "narrow", "path": str(out / "narrow.txt"), "weight": 1.0}],
        "narrow + replay 0.2": [{"name": "narrow", "path": str(out / "narrow.txt"), "weight": 0.8},
                                {"name": "replay", "path": str(out / "replay.txt"), "weight": 0.2}],
    }.items():
        spec = out / f"{name.replace(' ', '_').replace('.', '')}.yaml"
        spec.write_text(json.dumps({"data": {"sources": sources, "eval_fraction": 0.05}}))
        run = out / spec.stem
        launcher("run", spec, "--model", base, *COMMON, "--max-steps", a.steps, "--out", run, "--force")
        res = json.loads(launcher("eval", run, "--data", out / "reference.txt", "--json"))
        sets = {s["name"]: s for s in res["sets"]}
        rows[name] = {"reference_delta": res["reference_delta"],
                      "narrow_held_out": sets["held-out narrow"]["tuned"]["loss"],
                      "reference_tuned": sets["reference.txt"]["tuned"]["loss"],
                      "reference_base": sets["reference.txt"]["base"]["loss"]}
        print(f"{name:<22} reference loss {rows[name]['reference_base']:.3f} -> {rows[name]['reference_tuned']:.3f} "
              f"(delta {rows[name]['reference_delta']:+.3f}); narrow held-out {rows[name]['narrow_held_out']:.3f}",
              flush=True)
    (out / "replay.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
