"""The training loop on every rank: DeepSpeed through transformers' Trainer.

The Trainer's arguments are built from the Plan and the very DeepSpeed dict in the run dir's
ds_config.json (`training_arguments_kwargs`, pure), so the two cannot disagree: transformers itself
refuses a mismatch in micro batch, accumulation, precision, lr, betas, eps, weight decay, clipping and
schedule length. Heavy imports live inside the functions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from launcher import identity, requirements
from launcher.config.spec import MERGEABLE_METHODS, PEFT_METHODS, PREFERENCE_TASKS, RunSpec
from launcher.data.build import load_prepared
from launcher.data.cache import require_prepared
from launcher.data.collate import make_collator
from launcher.data.mixture import Schedule, open_mixture, resume_batch_problem
from launcher.errors import UserError
from launcher.model import load as model_mod
from launcher.model.load import choose_attn
from launcher.model.loss import apply_loss
from launcher.plan.plan import Plan, make_plan, settled, unsupported_precision
from launcher.rank import checkpoint, preference, watchdog
from launcher.rank.records import Attempt
from launcher.rank.stop import STOP, finish_stop, stop_callback
from launcher.rank.trackers import Trackers, keep_mlflow_out
from launcher.rundir import checkpoints, markers, metrics
from launcher.rundir import manifest as manifest_file
from launcher.rundir.layout import RunDir

# What each peft method's output is called (spec.MERGEABLE_METHODS: which of them `launcher merge` folds in).
ADAPTER_NAMES = {"lora": "LoRA", "qlora": "QLoRA (LoRA on the 4-bit base)", "dora": "DoRA", "ia3": "IA3",
                 "prefix": "prefix-tuning", "prompt": "prompt-tuning"}

# Every test-only variable (fault injection, weight dumps) starts with this. Only when one is set does the
# rank import launcher.testing.faults, which names, reads and acts on them.
TEST_ONLY_PREFIX = "LAUNCHER_TEST_"


# --------------------------------------------------------------------------- pure parts

def training_arguments_kwargs(spec: RunSpec, plan: Plan, ds_config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of transformers.TrainingArguments for this run. Pure.

    Batch numbers come from the Plan (as in the DeepSpeed JSON); optimizer and schedule numbers
    are read from `ds_config` itself, so a hand-edited ds_config.json is followed, not contradicted.
    """
    o, out = spec.optim, spec.output
    opt = ds_config.get("optimizer", {}).get("params", {})
    ds_sched = ds_config.get("scheduler")  # none as rendered: the schedule is transformers' own (below)
    sched = (ds_sched or {}).get("params", {})
    betas = opt.get("betas", list(o.betas))
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
    evaluate = spec.data.eval_fraction > 0 and out.eval_every > 0
    run_dir = Path(out.dir)
    kw: dict[str, Any] = dict(
        output_dir=str(RunDir(run_dir).checkpoints),
        run_name=spec.name,
        # batch: one source of truth (the Plan), the same numbers the DeepSpeed JSON carries
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        max_steps=plan.max_steps,
        # optimizer: DeepSpeed's runs; these only have to agree with it
        learning_rate=opt.get("lr", o.lr),
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_epsilon=opt.get("eps", o.eps),
        weight_decay=opt.get("weight_decay", o.weight_decay),
        max_grad_norm=ds_config.get("gradient_clipping", o.grad_clip),
        warmup_steps=sched.get("warmup_num_steps", o.warmup_steps),
        # precision as the DeepSpeed JSON says (fp32 when neither is enabled)
        bf16=bf16,
        fp16=fp16,
        seed=o.seed,
        data_seed=o.seed,
        deepspeed=ds_config,
        use_cpu=plan.device == "cpu",
        ddp_timeout=spec.cluster.nccl.timeout_s,
        # logging: our callback prints the lines; TensorBoard dir comes from TENSORBOARD_LOGGING_DIR
        logging_strategy="steps",
        logging_steps=out.log_every,
        logging_first_step=True,
        # TensorBoard through transformers; wandb and mlflow through launcher's own adapters (rank/trackers.py),
        # which keep one tracker run across attempts
        report_to=["tensorboard"] if "tensorboard" in out.active_trackers() else "none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        # checkpoints
        save_strategy="steps" if out.save_every > 0 else "no",
        save_steps=out.save_every if out.save_every > 0 else 500,
        save_total_limit=out.keep_last,
        # evaluation (perplexity) during training when asked; a final one runs whenever there is an eval split
        eval_strategy="steps" if evaluate else "no",
        eval_steps=out.eval_every if evaluate else None,
        # data: rows are already tokenized; the collator builds the batch
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
    )
    if spec.data.sources:
        # a mixture's dataset is the run's sample sequence itself: sample n is step n // G's; in order, every
        # rank reads its own indices, and a resume skips exactly the samples already trained
        kw["train_sampling_strategy"] = "sequential"
    if not ds_sched:
        # The schedule is transformers' get_scheduler, built by the Trainer on DeepSpeed's optimizer and stepped
        # by the engine once per optimizer step (saved and restored with its checkpoints). DeepSpeed's own
        # WarmupLR / WarmupDecayLR / WarmupCosineLR lag it by one step (step 2 also runs at lr 0 after a warmup)
        # and cannot express its cosine at all. A "scheduler" section in ds_config.json (zero.extra, or added
        # by hand) makes DeepSpeed's own run instead, and the arguments above then agree with it.
        kw["lr_scheduler_type"] = HF_SCHEDULERS[o.scheduler]
        if o.scheduler == "cosine":
            kw["lr_scheduler_kwargs"] = {"min_lr_rate": o.min_lr_ratio}
    return kw


# optim.scheduler -> transformers' scheduler name (linear warmup from 0 over optim.warmup_steps, then ...)
HF_SCHEDULERS = {"linear": "linear",  # ... linear decay to 0 at max_steps
                 "cosine": "cosine_with_min_lr",  # ... half a cosine down to min_lr_ratio x lr at max_steps
                 "constant": "constant_with_warmup"}  # ... constant


def resume_point(spec: RunSpec) -> Path | None:
    return checkpoints.resume_point(spec.output.resume, RunDir(Path(spec.output.dir)).checkpoints)


def check_world_size(plan: Plan, env: dict[str, str] | None = None) -> None:
    env = dict(os.environ) if env is None else env
    actual = int(env.get("WORLD_SIZE", "1"))
    if actual != plan.world_size:
        raise UserError(
            f"this job runs {actual} rank(s) (WORLD_SIZE={actual}) but the plan is for {plan.world_size} "
            f"({plan.nodes} node(s) x {plan.nproc_per_node} rank(s)); the batch arithmetic (micro batch x "
            f"accumulation x world size = {plan.global_batch}) depends on it. Launch {plan.world_size} ranks, "
            f"or set --nodes/--nproc-per-node to what runs and regenerate the run dir")


def check_environment(spec: RunSpec, plan: Plan) -> None:
    """What this machine must offer the plan: GPUs when it is for GPUs, a precision the device runs,
    the attention kernel asked for. Runs in the launching process and again on every rank."""
    import torch

    spec = settled(spec, plan)
    old = requirements.version_problems(requirements.installed_versions())  # this node's (or container's) packages
    if old:
        raise UserError("; ".join(old), field="dependencies")
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise UserError("the plan is for GPUs (cluster.gpus_per_node > 0) but this machine has no CUDA device; "
                        "run with --gpus-per-node 0 for CPU ranks over gloo")
    if plan.device == "cuda" and torch.cuda.device_count() < plan.nproc_per_node:
        bound = (" (this process sees only the GPUs Slurm bound to its task: the ranks address cuda:LOCAL_RANK "
                 "among all of the node's, so the step needs --gpu-bind=none, as `launcher slurm` renders it; "
                 "unset SLURM_GPU_BIND / --gpus-per-task)") if os.environ.get("SLURM_STEP_ID") is not None else ""
        raise UserError(f"the plan runs {plan.nproc_per_node} rank(s) per node, one per GPU, but this machine "
                        f"shows {torch.cuda.device_count()} GPU(s){bound}; lower --nproc-per-node")
    refusal = unsupported_precision(spec, plan)
    if refusal:
        raise UserError(refusal)
    choose_attn(spec)


# --------------------------------------------------------------------------- callback

def _make_log_callback(plan: Plan, log_file: Path | None, trackers: Trackers | None = None,
                       mixture: Schedule | None = None, preference_task: bool = False) -> Any:
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """One line per logging interval on rank 0: step N/M, loss, lr, tokens/s.

        tokens/s = the plan's tokens per optimizer step x steps since the last line / wall time since
        it. The time is taken in on_log, which runs after the Trainer's all-gather of the loss (every
        rank has finished the step), after a device synchronize on GPU. For SFT without packing the
        rows are padded only to the longest in the batch, so this counts the seq_len slots, an upper bound.
        """

        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.step_last = 0

        def _emit(self, state: Any, line: str, record: dict[str, Any]) -> None:
            if not state.is_world_process_zero:
                return
            print(line, flush=True)
            if log_file is not None:
                metrics.append(log_file, record)
            if trackers is not None:
                trackers.log(record)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t_last = time.perf_counter()
            self.step_last = state.global_step
            self.lr_used: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # The lr this optimizer step runs at. The Trainer's own "learning_rate" is read after the
            # scheduler has stepped: the next step's lr, one step ahead of the loss it is logged with.
            sched, opt = kw.get("lr_scheduler"), kw.get("optimizer")
            try:
                self.lr_used = float(sched.get_last_lr()[0]) if sched is not None else float(opt.param_groups[0]["lr"])
            except (AttributeError, IndexError, KeyError, TypeError):
                self.lr_used = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                _synchronize()
                now = time.perf_counter()
                steps = state.global_step - self.step_last
                tps = steps * plan.tokens_per_step / max(now - self.t_last, 1e-9)
                self.t_last, self.step_last = now, state.global_step
                lr = self.lr_used if self.lr_used is not None else float(logs.get("learning_rate", 0.0))
                loss = float(logs["loss"])
                rec = metrics.step_record(state.global_step, loss, lr, tps, _num(logs.get("grad_norm")), time.time())
                if mixture is not None:  # realized tokens per source over steps [0, step): a function of the step
                    rec["tokens_by_source"] = mixture.tokens_by_source(state.global_step, plan.seq_len)
                self._emit(state, metrics.format_step(state.global_step, state.max_steps, loss, lr, tps), rec)
            elif "eval_loss" in logs:
                loss = float(logs["eval_loss"])
                ppl, extra = metrics.eval_numbers(logs, preference_task)
                self._emit(state, metrics.format_eval(state.global_step, state.max_steps, loss, ppl, extra),
                           metrics.eval_record(state.global_step, loss, ppl, time.time(), extra))
                self.t_last = time.perf_counter()  # evaluation time is not training throughput
            elif mixture is not None and any(f"eval_{n}_loss" in logs for n in mixture.names):
                by = {n: float(logs[f"eval_{n}_loss"]) for n in mixture.names if f"eval_{n}_loss" in logs}
                self._emit(state, "\n".join(metrics.format_eval_source(state.global_step, state.max_steps, n, v)
                                            for n, v in by.items()),
                           metrics.eval_source_record(state.global_step, by, time.time()))
                self.t_last = time.perf_counter()

    return StepLog()


def _engine_callback() -> Any:
    """Tunes DeepSpeed's engine at the first step, once the Trainer has made it (launcher.rank.engine)."""
    from transformers import TrainerCallback

    class TuneEngine(TrainerCallback):
        trainer: Any = None
        done = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # the engine exists from the first step on (the Trainer makes it after on_train_begin)
            engine = getattr(self.trainer, "model_wrapped", None)
            if self.done or engine is None or not hasattr(engine, "zero_optimization_stage"):
                return
            self.done = True
            from launcher.rank.engine import tune

            done = tune(engine)
            if done:
                say("engine       " + "; ".join(done))

    return TuneEngine()


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from /dev/shm.

    With CPU ranks that all share one node, DeepSpeed's shm op creates a 66 MB shared-memory file per
    rank (deepspeed_allreduce_buffer_UID_MASTERADDR_MASTERPORT_RANK, see its csrc/cpu/comm/shm.cpp) and
    never removes it: every run leaves them behind until /dev/shm, that is RAM, is full. Once every rank
    has opened every other's (the group's set-up does that before returning), the names are no longer
    needed; the mappings stay valid until the processes end, and then the memory is freed."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{identity.rank()}"
    try:
        path.unlink()
    except OSError:  # not created (GPU ranks, ranks on several nodes) or already gone
        pass


def _num(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the run

def say(msg: str) -> None:
    if identity.rank() == 0:
        print(msg, flush=True)


def _quiet_libraries() -> None:
    import logging

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every rank
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # TRL's trainers tokenize preference rows on the rank through datasets' map
    except Exception:  # pragma: no cover
        pass
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - deepspeed is a dependency; stay quiet if its layout changes
        pass


def _testing() -> Any:
    """launcher.testing.faults when a test-only variable (TEST_ONLY_PREFIX) is set, else None."""
    if not any(k.startswith(TEST_ONLY_PREFIX) and v for k, v in os.environ.items()):
        return None
    from launcher.testing import faults

    return faults


@dataclass(frozen=True)
class TrainResult:
    """How this rank's training ended: with the final model, or stopped on a signal at `stopped_at`
    after a complete checkpoint (exit 3: requeue me)."""

    final: Path | None = None
    stopped_at: int | None = None
    checkpoint: Path | None = None


def collective_timeout_s(spec: RunSpec) -> int:
    """The batch script exports LAUNCHER_COLLECTIVE_TIMEOUT_S (from cluster.nccl.timeout_s); the spec's
    value otherwise."""
    raw = os.environ.get("LAUNCHER_COLLECTIVE_TIMEOUT_S", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else spec.cluster.nccl.timeout_s


class _NoRecord:
    """The attempt record of a job that trains nothing (the reference job): nothing goes into the manifest."""

    trainer: Any = None

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def train(spec: RunSpec, callbacks: Sequence[Any] = (), *, ref_only: bool = False) -> TrainResult:
    """Train on this rank. Every rank calls it. Returns the final output folder, or the step it stopped
    at after a signal (the checkpoint is complete and the requeue marker written). Global rank 0 records
    this attempt in manifest.json: at its start, and at its end however it ends (but SIGKILL).

    `callbacks`: extra transformers TrainerCallbacks (`launcher bench` measures through one); a callback
    with a `trainer` attribute is given the Trainer once it exists.

    `ref_only`: the reference job of full DPO (`launcher train --ref`): build the trainer, which computes the
    reference log-probs of every row into the cache (rank/preference.py), and stop before the first step."""
    if ref_only:
        return _train(spec, _NoRecord(), ref_only=True)
    plan = make_plan(spec)
    record = Attempt(Path(spec.output.dir), tokens_per_step=plan.tokens_per_step, world_size=plan.world_size,
                     max_steps=plan.max_steps, device=plan.device, preference=spec.task in PREFERENCE_TASKS)
    trackers = Trackers(Path(spec.output.dir))
    try:
        result = _train(spec, record, callbacks, trackers)
    except BaseException as exc:
        record.end(markers.exit_reason(exc), message=f"{type(exc).__name__}: {exc}")
        trackers.finish(markers.exit_reason(exc))
        raise
    reason = markers.COMPLETED if result.final is not None else markers.REQUEUED
    record.end(reason)
    trackers.finish(reason)  # after the attempt's end record: the cost reads the manifest and metrics
    return result


def _train(spec: RunSpec, record: Any, callbacks: Sequence[Any] = (), trackers: Trackers | None = None, *,
           ref_only: bool = False) -> TrainResult:
    model_mod.keep_bitsandbytes_out(spec.method.name)  # before transformers (and through it peft) is imported
    keep_mlflow_out(spec)  # before deepspeed is imported
    run_dir = RunDir(Path(spec.output.dir))
    plan = make_plan(spec)
    if not run_dir.ds_config_path.is_file():
        raise UserError(f"{run_dir.path} has no ds_config.json; create the run dir with `launcher run --out` or "
                        f"`launcher slurm --out` and train from its spec.yaml")
    ds_config = json.loads(run_dir.ds_config_path.read_text())
    # The run dir's ds_config.json holds the stage and precision decided where it was made; the spec's
    # `auto`s become those choices for everything below (model dtype, attention, quantization, loss).
    plan = plan.following(ds_config)
    spec = settled(spec, plan)
    check_world_size(plan)
    # Ranks only read the tokenized data (`launcher run` or the Slurm prep job made it): a missing cache
    # ends every rank here with exit 2, before the heavy imports and the process group.
    require_prepared(spec)
    resume = None if ref_only else resume_point(spec)
    if resume is not None and spec.data.sources:
        # attempts that ended (this one has not): every rank reads the same, before any collective
        problem = resume_batch_problem(manifest_file.attempt_entries(manifest_file.read_manifest(run_dir.path)),
                                       plan.global_batch, spec.data.seq_len)
        if problem:
            raise UserError(problem, field="optim.global_batch")
    record.start(resume, checkpoints.checkpoint_step(resume) if resume is not None else None)
    # A checkpoint written by another number of ranks (the run dir re-rendered for another size):
    # converted to DeepSpeed's universal checkpoint, or refused with the way to do it by hand.
    universal_note = checkpoint.prepare_resume(resume, ds_config) if resume is not None else None
    run_dir.logs.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.tensorboard)
    os.environ.setdefault("DS_ACCELERATOR", plan.device)  # the launchers set it; ranks started otherwise too
    # NCCL's async error handling: a failed or timed-out collective aborts the rank instead of hanging it.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1" if spec.cluster.nccl.async_error_handling else "0")
    _quiet_libraries()

    check_environment(spec, plan)
    if trackers is not None:
        trackers.start(spec, plan)  # global rank 0 opens (or reopens) the tracker runs

    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    kwargs = training_arguments_kwargs(spec, plan, ds_config)
    kwargs["ddp_timeout"] = collective_timeout_s(spec)
    os.environ["LAUNCHER_COLLECTIVE_TIMEOUT_S"] = str(kwargs["ddp_timeout"])  # named when a collective fails
    # Join the process group first, with the collective timeout: a rank that died or hangs makes the
    # others fail within it (accelerate passes no timeout for CPU ranks, whose gloo default is 30 min).
    # zero.Init (ZeRO-3 loading) also needs the group: it takes a world of 1 before the group exists.
    # Then TrainingArguments, before the model: it registers the DeepSpeed config, so that under ZeRO-3
    # the model is loaded straight into partitions (deepspeed.zero.Init) instead of whole on every rank.
    from datetime import timedelta

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if plan.device == "cuda" else "gloo",
                               timeout=timedelta(seconds=kwargs["ddp_timeout"]))
    pref = spec.task in PREFERENCE_TASKS
    # preference tasks: TRL's config of the task, a TrainingArguments with the same keywords and the task's own
    args = preference.training_arguments(spec, kwargs) if pref else TrainingArguments(**kwargs)
    _ = args.device  # accelerate's state over the group joined above
    record.devices()  # every rank's node and device, into the manifest (a collective)
    _unlink_shm_buffer()  # after that collective every rank has mapped every other's buffer
    tokenizer = model_mod.load_tokenizer(spec)
    schedule = None
    eval_ds: Any
    if spec.data.sources:  # memory-mapped shards; held-out loss per source
        train_ds, per_source = open_mixture(spec, plan.global_batch, plan.max_steps)
        schedule, eval_ds = train_ds.schedule, per_source or None
        record.mixture = schedule
    else:
        train_ds = load_prepared(spec)
        eval_ds = load_prepared(spec, split="eval") if spec.data.eval_fraction > 0 else None
    # Seeded before the model is built: LoRA's A matrices (and anything else initialised at random) must be
    # the same in every run of this spec, or two runs, and a run and its reference, start apart.
    from transformers import set_seed

    set_seed(spec.optim.seed)
    model = model_mod.load_model(spec, ds_config=ds_config, device=plan.device)
    loss_note = (f"TRL's {spec.task} loss; reference: {preference.reference_mode(spec)}" if pref else
                 apply_loss(model, plan.loss, chunk_tokens=spec.optim.loss_chunk_tokens))

    testing = _testing()
    if testing:
        train_ds = testing.logged_samples(train_ds)
    stop = stop_callback()
    # the hang watchdog after the stop callback, so that it sees a save the stop asks for
    step_callbacks = [_make_log_callback(plan, run_dir.metrics_path, trackers, schedule, pref),
                      *(testing.step_callbacks() if testing else []), stop,
                      watchdog.watchdog_callback(spec.cluster.hang_timeout_s, run_dir.path,
                                                 on_fire=lambda why: record.end(markers.HANG, message=why))]
    if pref:
        # TRL's trainer takes the unwrapped model and the peft config, and wraps it itself
        trainer = preference.make_trainer(spec, args, model, tokenizer, train_ds, eval_ds, step_callbacks,
                                          model_mod.peft_config(spec) if spec.method.name in PEFT_METHODS else None)
        model = trainer.model
    else:
        trainer = checkpoint.trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=make_collator(spec, tokenizer),
            processing_class=tokenizer,
            callbacks=step_callbacks,
        )
    say(f"model        {spec.model.name} ({spec.method.name}): {model_mod.describe(model)}; "
        f"attention {getattr(model.config, '_attn_implementation', '?')}; precision {plan.precision}; "
        f"ZeRO-{plan.zero_stage}; optimizer {plan.optimizer}" + ("; compiled blocks" if spec.model.compile else ""))
    say(f"loss         {loss_note}")
    n_eval = sum(map(len, eval_ds.values())) if isinstance(eval_ds, dict) else len(eval_ds) if eval_ds is not None else 0
    say(f"data         {len(train_ds):,} training rows" + (f", {n_eval:,} eval rows" if eval_ds is not None else ""))
    if pref and preference.reference_mode(spec) == "precomputed":
        what = ("computed here, before the first step, into" if getattr(trainer, "launcher_reference_computed", False)
                else "read from")
        say(f"reference    log-probs {what} {preference.reference_path(spec)}")
    if ref_only:
        sys.stdout.flush()
        return TrainResult()
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    tune_engine = _engine_callback()  # what it changes is for ZeRO stage 0 only (engine.tune decides)
    tune_engine.trainer = trainer
    trainer.add_callback(tune_engine)
    trainer.launcher_keep_last = spec.output.keep_last
    stop.trainer = trainer
    for cb in callbacks:
        trainer.add_callback(cb)
        if hasattr(cb, "trainer"):
            cb.trainer = trainer
    record.trainer = trainer  # the end record reads its step and logged metrics
    if testing:
        trainer.launcher_after_save = testing.after_save()
        for cb in testing.start_callbacks():
            trainer.add_callback(cb)

    if identity.rank() == 0:
        for note in checkpoint.resume_notes(run_dir.checkpoints):
            print(note, flush=True)
        checkpoint.prune(run_dir.checkpoints, spec.output.keep_last)  # staging folders of a cut-off save
    if resume is not None:
        say(f"resuming from {resume}" + (f": {universal_note}" if universal_note else ""))
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

    if stop.stopped_at is not None:
        step = stop.stopped_at
        ckpt = run_dir.checkpoints / checkpoints.checkpoint_name(step)
        finish_stop(run_dir.path, step, ckpt if checkpoints.is_complete(ckpt) else None)
        say(f"stopped      at step {step}/{plan.max_steps} on {STOP.signal_name or 'a signal'}; "
            f"checkpoint {ckpt}; exit 3 (requeue me): the next start resumes from it")
        sys.stdout.flush()
        return TrainResult(stopped_at=step, checkpoint=ckpt)

    evaluated_last = any(h.get("step") == trainer.state.global_step and any(k.startswith("eval_") for k in h)
                         for h in trainer.state.log_history)
    if eval_ds is not None and not evaluated_last:
        trainer.evaluate()

    if testing:
        testing.at_end(trainer.model)

    # Full weights are gathered from all ranks under ZeRO-3 (stage3_gather_16bit_weights_on_model_save);
    # for a PeftModel only the adapter is written.
    final = run_dir.final
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
    trainer.accelerator.wait_for_everyone()
    head = "SequenceClassification" if spec.task == "rm" else "CausalLM"  # a reward model: the score head
    if hasattr(model, "peft_config"):
        merge = (f"`launcher merge {run_dir.path} --out DIR` writes a merged model" if spec.method.name in MERGEABLE_METHODS
                 else "virtual tokens, not weights: it cannot be merged into the model")
        say(f"output       {ADAPTER_NAMES[spec.method.name]} adapter + tokenizer in {final} "
            f"(peft.AutoPeftModelFor{head}.from_pretrained; {merge})")
    else:
        say(f"output       model + tokenizer in {final} (AutoModelFor{head}.from_pretrained)")
    sys.stdout.flush()
    return TrainResult(final=final)
