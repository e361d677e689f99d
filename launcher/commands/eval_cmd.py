"""`launcher eval`: loss and perplexity of a tuned model and its base, side by side."""

from __future__ import annotations

import json

import click

from launcher import evaluate as ev


@click.command("eval")
@click.argument("target", metavar="RUN_DIR|MODEL", type=click.Path(file_okay=False))
@click.option("--data", "data", multiple=True, type=click.Path(), metavar="FILE",
              help="Reference set (out-of-distribution), repeatable; default: the embedded corpus.")
@click.option("--base", help="Base model to compare with (default: the run's model, or the adapter's base).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Also write the JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing --out or --plot file.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="Write a PNG of train/eval loss over steps from RUN_DIR/logs/metrics.jsonl.")
@click.option("--max-rows", type=click.IntRange(1), default=200, show_default=True,
              help="Rows (sequences) evaluated per set, spread evenly over it.")
@click.option("--samples", type=click.IntRange(0), default=16, show_default=True,
              help="SFT sets: prompts completed greedily for exact match.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--seq-len", type=click.IntRange(8),
              help="Tokens per sequence (default: the run's data.seq_len; 256 for a MODEL).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Reference-set loss rise (nats/token) above which forgetting is reported.")
def eval_(target: str, data: tuple[str, ...], base: str | None, as_json: bool, out: str | None, plot: str | None,
          max_rows: int, samples: int, max_new_tokens: int, batch_size: int, seq_len: int | None, device: str,
          tolerance: float, force: bool) -> None:
    """Loss and perplexity on the run's held-out split (in-distribution) and on reference sets
    (out-of-distribution), for the tuned model and its base model; delta = tuned - base, so a rise
    on a reference set is forgetting, as a number. SFT sets add exact match of greedy completions.

    RUN_DIR is a run dir (its final model or newest checkpoint; results also go to RUN_DIR/eval.json);
    MODEL a model directory or a peft adapter. Runs in this process, on CPU or one GPU.
    """
    res, written = ev.evaluate_and_write(target, out=out, plot=plot, force=force, data=data, base=base, max_rows=max_rows,
                                         batch_size=batch_size, samples=samples, max_new_tokens=max_new_tokens,
                                         device=device, seq_len=seq_len, tolerance=tolerance)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(ev.format_table(res))
        for p in written:
            click.echo(f"wrote {p}")
