"""`launcher train` (per-rank entry point), `run` (local launch), `quickstart` and `merge`.

Heavy libraries are imported inside the library functions these commands call.
"""

from __future__ import annotations


import click

from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.model.merge import merge_run
from launcher.rank import entry
from launcher.submit import local
from launcher.submit.quickstart import quickstart as run_quickstart


@click.command()
@spec_options(spec_required=True)
@click.option("--ref", "ref_only", is_flag=True, help="The reference job of full DPO: compute the reference "
              "log-probs of every row into the cache and stop (`launcher run` runs it before training; `launcher slurm` queues it after prep).")
def train(spec: RunSpec, ref_only: bool) -> None:
    """Train on this rank: the entry point every launcher calls (deepspeed, torchrun, srun).

    SPEC is a run dir's spec.yaml (made by `launcher run --out` or `launcher slurm --out`): the
    run dir holds the DeepSpeed config the ranks use and receives checkpoints, logs and the final model.
    Rank, world size and master address come from the launcher's environment. USR1 or TERM: the
    ranks save a checkpoint at the same optimizer step and exit 3; the next start resumes from it.
    """
    entry.finish(entry.train(spec, ref_only=ref_only))  # done (0) or stopped after a checkpoint (3); failures raise


@click.command()
@spec_options(allow_from=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run dir to create (default: the spec's output.dir; required with --from).")
@click.option("--force", is_flag=True, help="Write into a non-empty run dir (generated files are replaced).")
@click.option("--ignore-fit", is_flag=True, help="Start even when the memory estimate exceeds the GPU's memory.")
def run(spec: RunSpec, out: str | None, force: bool, ignore_fit: bool) -> None:
    """Train on this machine through the deepspeed launcher: N GPUs, or N CPU ranks over gloo.

    Pre-flight first (the spec, the model, a data sample, option clashes, the memory estimate: exit 2
    before any rank starts), then the data is tokenized, the run dir written (spec.yaml,
    ds_config.json, plan.txt) and --nproc ranks run `launcher train`. USR1 or TERM to this command:
    the ranks save a checkpoint and stop, exit 3; resume with
    `launcher run RUN_DIR/spec.yaml --out RUN_DIR --force`. `--from RUN_DIR --out NEW_DIR` runs
    RUN_DIR's resolved spec again in a new run dir (flags still apply on top).
    """
    from_run = click.get_current_context().params.get("from_run")
    if from_run and out is None:
        raise UserError("--from RUN_DIR makes a new run dir: give it with --out NEW_DIR "
                        "(to resume RUN_DIR itself: launcher run RUN_DIR/spec.yaml --out RUN_DIR --force)")
    rd = local.run(spec, out or spec.output.dir, force=force, ignore_fit=ignore_fit)
    click.echo(f"done         {rd.path}")


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False), default="./quickstart-out", show_default=True,
              help="Folder for the run (refused when not empty, unless --force).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def quickstart(out: str, force: bool) -> None:
    """Train the embedded tiny model on the embedded corpus here (CPU or GPU), in about a minute.

    Prints the plan, the loss falling, tokens/s, where the output is, and a sample from the trained model.
    """
    run_quickstart(out, force=force, say=click.echo)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder for the merged model.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def merge(run_dir: str, out: str, force: bool) -> None:
    """Merge RUN_DIR's adapter (lora, qlora, dora, ia3) into its base model; save a plain model + tokenizer to --out.

    For QLoRA the 4-bit base is dequantized to the compute dtype first (the weights the adapter was
    trained against), then the adapter is added. Prefix and prompt tuning are refused: they add virtual
    tokens in front of every input, not a change of weights, so there is nothing to merge.
    """
    path = merge_run(run_dir, out, force=force)
    click.echo(f"merged model + tokenizer in {path}")
