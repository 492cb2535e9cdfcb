"""The runner: a typed config in, a fine-tuned adapter and its metrics out.

Stages run top to bottom in dependency order; each is one explicit builder.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from gemma_ft.compile_cache import holds_compiled_kernels, import_unsloth_with_persistent_compile_cache
from gemma_ft.cpu_share import sleep_while_waiting
from gemma_ft.config import Config, to_typed
from gemma_ft.console import open_run_logs, quiet_libraries
from gemma_ft.data.conversations import (
    BUILTIN_PREFIX,
    Split,
    apply_control_token_policy,
    load_conversations,
    split_conversations,
)
from gemma_ft.distributed import (
    check_every_rank_read_the_same_rows,
    is_main_process,
    keep_unsloth_checkpointing_under_ddp,
    load_adapters_on_own_gpu,
    use_local_gpu,
    wait_for_everyone,
)
from gemma_ft.errors import DataError, UserError
from gemma_ft.plots import plot_run_losses
from gemma_ft.resume_check import (
    check_resume_inputs,
    keep_settings_before_resume,
    training_inputs,
    write_training_inputs,
)
from gemma_ft.run_dir import (
    RUN_CONFIG,
    RunPlan,
    acquire_run_lock,
    atomic_write_text,
    check_writable,
    checkpoint_dir,
    complete_checkpoints,
    plan_run,
    release_run_lock,
    replace_earlier_run,
    start_work_dir,
    write_records,
)
from gemma_ft.validation import validate

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything training needs, built in dependency order by `prepare`."""

    cfg: Config
    run_dir: Path
    split: Split
    tokenizer: Any
    model: Any
    trainer: Any
    rows_dropped_too_long: dict
    stop_on_signal: Any  # gemma_ft.callbacks.StopOnSignal
    train_rows: Any  # gemma_ft.data.encoding.EncodedRows: the training rows before batching
    batch_plan: Any  # gemma_ft.batching.BatchPlan
    stop_on_divergence: Any  # gemma_ft.callbacks.StopOnDivergence
    replies_cut_off: dict  # per split: assistant turns of kept rows that max_seq_length cut off entirely
    schedule: Any  # gemma_ft.training.Schedule: optimizer steps and the epochs of the data they cover
    plan: RunPlan  # where the run writes (its staging folder when it replaces an earlier run) and resumes from
    speed: Any  # gemma_ft.speed.SpeedMonitor: tokens/s, step shapes and compiles, measured during training
    startup: Any  # gemma_ft.startup.StartupClock: where the time to the first step went
    batch_plan_steps_down: list  # the batch plans refused on the way to batch_plan, one line each
    batch_plans_left: list  # what to step down to if the first step runs out of GPU memory, best first
    build_for_plan: Any  # BatchPlan -> (model, trainer): the model loaded again with that plan's LoRA and trainer
    step_memory: Any  # gemma_ft.memory_probe.StepMemoryCache on a GPU (None on a CPU): first steps measured here


class RunDiverged(UserError):
    """The loss or its gradients became NaN/inf: training stopped before that step was applied."""


class SaveFailed(UserError):
    """The disk filled up while a checkpoint or the finished run was being saved; the complete checkpoints are
    intact, and the same command resumes from the last of them."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class RunInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


def prepare(cfg: Any, run_dir: str | Path | None = None, cleanup: ExitStack | None = None,
            records: Mapping[str, Any] | None = None) -> Prepared:
    """Stages up to a ready trainer: config and data checks -> run dir checks -> tokenizer -> chat template ->
    control tokens -> response-only labels -> the run dir's record -> model -> batch plan -> LoRA -> SFTTrainer
    (padded or packed batches).

    Nothing is written into the run directory before every check has passed (see claim_run_dir)."""
    from gemma_ft.startup import StartupClock

    startup = StartupClock()
    cfg: Config = to_typed(cfg)
    # Cheap checks first: a bad value or a bad CSV must cost seconds, not a model load.
    validate(cfg)
    conversations = load_conversations(cfg.data)
    split = split_conversations(conversations, cfg.data.val_size, cfg.data.split_seed)
    log.info("Data: %d rows -> %d train, %d validation", len(conversations), len(split.train), len(split.validation))
    run_dir = Path(run_dir or cfg.run.dir or f"outputs/{cfg.run.name or 'run'}").resolve()
    check_writable(run_dir, needed_bytes=0)  # writable now; room is checked once the model's size is known
    inputs = training_inputs(cfg, split)
    # The run dir's checks run before its lock is taken, so that a refused command does not even clean up a lock
    # left by a killed run; under the lock they run again (and say what they found), on what no other run can
    # change any more.
    with logs_suppressed():
        plan_and_check_resume(cfg, run_dir, inputs)
    if is_main_process():  # with several GPUs every rank runs this; rank 0 owns and writes the run dir
        lock = acquire_run_lock(run_dir)
        if cleanup is not None:
            cleanup.callback(release_run_lock, lock)
    plan, resumed_with_changes = plan_and_check_resume(cfg, run_dir, inputs)
    startup.mark("config and data checks")
    startup.compile_cache_was_warm = holds_compiled_kernels()
    use_local_gpu()
    quiet_libraries(cfg.debug.verbose)
    sleep_while_waiting()  # before torch loads (gemma_ft.cpu_share)
    import_unsloth_with_persistent_compile_cache()
    if keep_unsloth_checkpointing_under_ddp():
        log.info("Several GPUs: unsloth's offloaded gradient checkpointing kept (its DDP default is slower)")

    release_accelerator_memory()  # a sweep's earlier job in this process must not count against this one

    import datasets

    from gemma_ft.cpu_share import manages_threads, seats_dir
    from gemma_ft.speed import SpeedMonitor
    from gemma_ft.callbacks import (
        CurrentCadenceOnResume,
        ShareCpuCores,
        LogEveryFinalStep,
        MarkCheckpointComplete,
        ReportStartupAtFirstStep,
        StopOnDivergence,
        StopOnSignal,
    )
    from gemma_ft.chat_template import apply_gemma3_template
    from gemma_ft.data.encoding import encode_conversations
    from gemma_ft.models.loading import check_target_modules, load_tokenizer, resolve_model_path

    from gemma_ft.console import quiet_library_progress
    from gemma_ft.training import training_schedule

    quiet_library_progress(cfg.debug.verbose)
    startup.mark("imports")
    model_path = resolve_model_path(cfg.model.name_or_path)
    check_writable(run_dir, needed_bytes=checkpoint_size_estimate(cfg, model_path))
    check_target_modules(model_path, cfg.lora)
    # The template is set and checked before anything renders text, so a wrong template cannot train silently.
    tokenizer = apply_gemma3_template(load_tokenizer(model_path))
    log.info("Chat template: Gemma 3, checked on a probe conversation (turn markers are single tokens, one BOS)")
    # The control tokens are the tokenizer's own, so the check comes once it is loaded (before the model).
    conversations = apply_control_token_policy(conversations, tokenizer, cfg.data.control_tokens, cfg.data.path)
    # Split again: escaping or stripping changes the rows' text, not their number, so the seed holds out the rows
    # the early split checked.
    split = split_conversations(conversations, cfg.data.val_size, cfg.data.split_seed)
    # Labels before the model: a file whose every reply is cut off fails in seconds.
    train_rows = encode_conversations(tokenizer, split.train, cfg.train.max_seq_length)
    eval_rows = encode_conversations(tokenizer, split.validation, cfg.train.max_seq_length)
    dropped = report_rows_dropped_too_long(train_rows, eval_rows, cfg.train.max_seq_length)
    startup.mark("tokenizer and labels")
    if is_main_process():
        claim_run_dir(plan, cfg, inputs, resumed_with_changes, records or {})
    wait_for_everyone()  # the other ranks' trainers write into the folder rank 0 has just made
    # The data lives in memory; caching it on disk would only cost time.
    datasets.disable_caching()
    stop_on_signal = StopOnSignal()
    stop_on_divergence = StopOnDivergence()
    speed = SpeedMonitor(tokenizer.pad_token_id)
    callbacks = [MarkCheckpointComplete(), LogEveryFinalStep(), stop_on_signal, stop_on_divergence,
                 ReportStartupAtFirstStep(startup), CurrentCadenceOnResume()]
    if manages_threads():  # on a CPU: concurrent trainings share the cores
        callbacks.append(ShareCpuCores(seats_dir()))
    model, trainer, batch_plan, plans_left, build_for_plan, steps_down, step_memory = build_model_and_trainer(
        cfg, model_path, tokenizer, train_rows.dataset(), eval_rows.dataset(), plan, callbacks, speed, startup)
    log.info(batch_plan.describe())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: r=%d on %s%s; %s trainable parameters", cfg.lora.r, ", ".join(cfg.lora.target_modules),
             " and the output head" if cfg.lora.train_lm_head else "", f"{trainable:,}")
    startup.mark("LoRA, trainer and batch plan")
    check_every_rank_read_the_same_rows(cfg.data.path, split)  # the Trainer has started the ranks' process group
    schedule = training_schedule(trainer)
    log.info(schedule.describe())
    if schedule.epochs < 1 and not cfg.data.path.startswith(BUILTIN_PREFIX):
        log.warning("This run sees only %.0f%% of the training rows of %s: train.max_steps=%d; set "
                    "train.max_steps=-1 to train for train.num_train_epochs (now %g) instead",
                    100 * schedule.epochs, cfg.data.path, cfg.train.max_steps, cfg.train.num_train_epochs)
    return Prepared(cfg, run_dir, split, tokenizer, model, trainer, dropped, stop_on_signal,
                    train_rows, batch_plan, stop_on_divergence,
                    {"train": train_rows.replies_cut_off, "eval": eval_rows.replies_cut_off}, schedule, plan,
                    speed, startup, steps_down, plans_left, build_for_plan, step_memory)


def build_model_and_trainer(cfg: Config, model_path: str, tokenizer, train_dataset, eval_dataset, run_plan: RunPlan,
                            callbacks: list, speed, startup):
    """Model -> LoRA -> trainer for the first batch plan worth trying (gemma_ft.batching). Returns (model, trainer,
    plan, the plans left to step down to, a function that builds them, the step-downs so far, the cache of
    first-step measurements or None on a CPU).

    A step down loads the model again: LoRA (and the checkpointing it sets up) is applied to the loaded model in
    place."""
    import torch

    from gemma_ft.batching import batch_candidates, skip_known_misfits
    from gemma_ft.console import progress_callback
    from gemma_ft.memory_probe import FirstStepMemory, StepMemoryCache, step_memory_scope
    from gemma_ft.models.builtin import cache_dir
    from gemma_ft.models.loading import add_lora_adapters, load_model
    from gemma_ft.training import build_trainer, pad_short_batches_for_flex_attention
    from transformers.trainer_callback import ProgressCallback

    base = {"model": load_model(cfg.model, model_path, cfg.train.max_seq_length)}
    log.info("Model: %s, %s parameters, %s", model_path, f"{base['model'].num_parameters():,}", base["model"].dtype)
    startup.mark("model load")
    on_gpu = torch.cuda.is_available()
    step_memory = StepMemoryCache(cache_dir() / "compile" / "step_memory.json",
                                  step_memory_scope(model_path, cfg.model, cfg.lora, cfg.train.max_seq_length)) \
        if on_gpu else None

    def build(plan):
        release_accelerator_memory()  # what an earlier candidate left
        model = base.pop("model") if base else load_model(cfg.model, model_path, cfg.train.max_seq_length)
        model = add_lora_adapters(model, cfg.lora, cfg.train.seed, plan.gradient_checkpointing)
        if run_plan.resume_from is not None:
            load_adapters_on_own_gpu(model)
        first_step = [FirstStepMemory(plan, step_memory)] if on_gpu else []
        trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, cfg, plan,
                                checkpoint_dir(run_plan.work_dir), callbacks + first_step, speed)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_callback(cfg.debug.verbose))
        if not plan.packed:  # packed batches have one fixed shape of their own
            pad_short_batches_for_flex_attention(trainer, model, tokenizer)
        return model, trainer

    candidates = batch_candidates(cfg.train, cfg.lora.use_gradient_checkpointing, on_gpu=on_gpu)
    candidates, steps_down = skip_known_misfits(candidates, step_memory.get if on_gpu else lambda plan: None)
    for line in steps_down:
        log.warning("Batch plan %s", line)
    model, trainer = build(candidates[0])
    return model, trainer, candidates[0], candidates[1:], build, steps_down, step_memory


def plan_and_check_resume(cfg: Config, run_dir: Path, inputs: dict) -> tuple[RunPlan, Path | None]:
    """Where the run writes and resumes from; with the run whose settings it resumes with changes, if it does."""
    plan = plan_run(cfg.run, run_dir)
    if plan.resume_from is None:
        return plan, None
    log.info("Resuming from %s", plan.resume_from)
    return plan, check_resume_inputs(plan.resume_from, inputs, cfg.run.resume_changed)


@contextmanager
def logs_suppressed():
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def claim_run_dir(plan: RunPlan, cfg: Config, inputs: dict, resumed_with_changes: Path | None,
                  records: Mapping[str, Any]) -> None:
    """Every check has passed: the run's record goes into the folder it writes (its staging folder when it replaces
    an earlier run), and its log file opens."""
    start_work_dir(plan)
    if resumed_with_changes is not None:
        keep_settings_before_resume(resumed_with_changes, plan.work_dir)
    # The typed config this run trains with: what generate/evaluate/export read back.
    OmegaConf.save(OmegaConf.structured(cfg), plan.work_dir / RUN_CONFIG)
    write_training_inputs(plan.work_dir, inputs)
    write_records(plan.work_dir, records)
    open_run_logs()
    if plan.replaces_earlier_run:
        log.info("Replacing the run in %s: its results stay until this run has finished (staged in %s)",
                 plan.run_dir, plan.work_dir)


def run(cfg: Any, run_dir: str | Path | None = None, records: Mapping[str, Any] | None = None) -> dict:
    """Fine-tune as `cfg` says; writes the adapter, metrics.json and samples into `run_dir`; returns the metrics.

    `records`: more files for the run's record (name in the run dir -> OmegaConf content), written with its
    config.yaml once every check has passed: the CLI's Hydra record (.hydra/)."""
    with ExitStack() as cleanup:  # the run dir's lock is released however the run ends
        return _run(cfg, run_dir, records, cleanup)


def _run(cfg: Any, run_dir: str | Path | None, records: Mapping[str, Any] | None, cleanup: ExitStack) -> dict:
    started_at = time.perf_counter()
    p = prepare(cfg, run_dir, cleanup, records)
    from gemma_ft.callbacks import SignalAfterTraining  # after prepare's checks: it loads transformers and torch

    cleanup.callback(p.stop_on_signal.restore_handlers)
    try:
        return _train_and_report(p, started_at)
    except SignalAfterTraining:
        # Training had finished: the trained weights are kept as a checkpoint, and the same command only evaluates,
        # generates and saves (a resumed run trains no step past max_steps).
        return stop_with_a_checkpoint(p)


def stop_with_a_checkpoint(p: Prepared):
    """End the run on a signal, with the step it reached saved as a complete checkpoint."""
    wait_for_everyone()
    save_checkpoint_now(p.trainer)
    raise RunInterrupted(
        f"{p.stop_on_signal.received}: stopped at step {p.trainer.state.global_step} with a checkpoint saved in "
        f"{checkpoint_dir(p.plan.work_dir)}; resume by running the same command with run.dir={p.run_dir}",
        p.stop_on_signal.received or "SIGTERM",
    )


def save_checkpoint_now(trainer) -> None:
    """A complete checkpoint of the trainer's current step, unless it has one already (rank 0 marks it)."""
    from gemma_ft.run_dir import COMPLETE_MARKER

    step = trainer.state.global_step
    folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if step == 0 or (folder / COMPLETE_MARKER).exists():
        return
    trainer._save_checkpoint(trainer.model, trial=None)
    wait_for_everyone()
    if is_main_process() and folder.is_dir():
        (folder / COMPLETE_MARKER).write_text(f"{step}\n")


def _train_and_report(p: Prepared, started_at: float) -> dict:
    from gemma_ft.callbacks import EvaluationInterrupted

    cfg = p.cfg
    cfg, model, tokenizer, trainer = p.cfg, p.model, p.tokenizer, p.trainer

    from gemma_ft.run_report import MemoryStats, show_example
    from gemma_ft.replies import base_model_replies, exact_match, generate_replies

    main = is_main_process()  # with several GPUs: rank 0 shows, generates and saves; every rank trains and evaluates
    if cfg.debug.show_examples and main:
        show_example(p.train_rows, tokenizer, p.split.train, cfg.debug.example_index)

    em_rows = p.split.validation[: cfg.train.exact_match_rows] if main else []
    # With LoRA the untrained model's replies are generated after training, with the adapters switched off (see
    # base_model_replies); full fine-tuning changes the weights themselves, so only it generates them first.
    em_started = time.perf_counter()
    replies_before = generate_replies(model, tokenizer, em_rows, cfg.train.max_new_tokens,
                                      progress="Exact match, before training") if cfg.model.full_finetuning else None
    em_seconds = time.perf_counter() - em_started

    memory = MemoryStats(cfg.debug.verbose)
    memory.start()
    try:
        p = train_stepping_down(p)
        model, trainer = p.model, p.trainer
    except EvaluationInterrupted:
        return stop_with_a_checkpoint(p)
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        half_written = remove_incomplete_checkpoint(checkpoint_dir(p.plan.work_dir), p.trainer.state.global_step)
        raise SaveFailed(
            f"the disk filled up while writing a checkpoint in {checkpoint_dir(p.plan.work_dir)} "
            f"({getattr(exc, 'strerror', None) or 'file write failed'})"
            + (f"; the half-written {half_written.name} was removed" if half_written else "")
            + "; free some space and run the same command again: it resumes from its last complete checkpoint"
        ) from None
    resources = memory.finish()
    if p.stop_on_signal.received:
        # A rank that exits first makes torchrun kill the others: none leaves before every rank has saved. (On two
        # H100s rank 1 exited first and torchrun ended rank 0 with SIGTERM; it had finished saving, by luck.)
        wait_for_everyone()
        save_checkpoint_now(p.trainer)  # a signal during the evaluation after the last step: that step's weights
        raise RunInterrupted(
            f"{p.stop_on_signal.received}: stopped at step {trainer.state.global_step} with a checkpoint saved in "
            f"{checkpoint_dir(p.plan.work_dir)}; resume by running the same command with run.dir={p.run_dir}",
            p.stop_on_signal.received,
        )
    if p.stop_on_divergence.diverged_at_step is not None:
        wait_for_everyone()
        kept = [c.name for c in checkpoint_dir(p.plan.work_dir).glob("checkpoint-*")]
        raise RunDiverged(
            f"training diverged at step {p.stop_on_divergence.diverged_at_step}: the loss or its gradients became "
            f"NaN/inf, so the run stopped before applying that step and saved no adapter or metrics; "
            + (f"its last good checkpoint stays in {checkpoint_dir(p.plan.work_dir)}; " if kept else "")
            + ("the run it was to replace is unchanged; " if p.plan.replaces_earlier_run else "")
            + f"lower optim.lr (now {cfg.optim.lr}), keep optim.max_grad_norm > 0, or check the data, then run again"
        )
    eval_loss = final_eval_loss(trainer)
    if not math.isfinite(eval_loss):
        # The gradients of the last step were finite, but the weights it produced are not usable.
        wait_for_everyone()
        raise RunDiverged(
            f"the eval loss after step {trainer.state.global_step} is {eval_loss}: the last update broke the weights, "
            "so the run saved no adapter or metrics"
            + (f"; its checkpoints stay in {checkpoint_dir(p.plan.work_dir)}" if complete_checkpoints(p.plan.work_dir)
               else "")
            + ("; the run it was to replace is unchanged" if p.plan.replaces_earlier_run else "")
            + f"; lower optim.lr (now {cfg.optim.lr}) or keep optim.max_grad_norm > 0, and start a new run (another "
            "run.name, or run.overwrite=true)")

    em_started = time.perf_counter()
    replies_after = generate_replies(model, tokenizer, em_rows, cfg.train.max_new_tokens,
                                     progress="Exact match, fine-tuned")
    if replies_before is None:
        replies_before = base_model_replies(model, tokenizer, em_rows, cfg.train.max_new_tokens,
                                            progress="Exact match, base model")
    em_seconds += time.perf_counter() - em_started
    if em_rows:
        log.info("Exact match: %d held-out rows answered before and after training in %.1f s", len(em_rows),
                 em_seconds)
    metrics = {
        "train_loss": mean_training_loss(trainer.state.log_history),
        "eval_loss": eval_loss,
        "weight_decay": cfg.optim.weight_decay,
        "learning_rate": cfg.optim.lr,
        "max_steps": cfg.train.max_steps,
        "global_step": trainer.state.global_step,
        **resources,
        "exact_match_before": exact_match(replies_before, em_rows),
        "exact_match_after": exact_match(replies_after, em_rows),
        "exact_match_rows": len(em_rows),
        "train_rows": len(p.train_rows.input_ids),
        "eval_rows": eval_rows_count(p),
        "batching": "packed" if p.batch_plan.packed else "padded",
        "tokens_per_step": p.batch_plan.tokens_per_step,
        "rows_dropped_too_long": p.rows_dropped_too_long,
        "replies_cut_off": p.replies_cut_off,
        "epochs": p.schedule.epochs,
        **speed_metrics(p),
        # The whole job, from its config to its saved outputs (model load, compilation, evaluation and exact
        # match included); train_runtime_s is the training loop alone.
        "runtime_s": time.perf_counter() - started_at,
    }
    if main:
        save_outputs(p.plan.work_dir, model, tokenizer, metrics, trainer.state.log_history, em_rows,
                     replies_before, replies_after)
        if p.plan.replaces_earlier_run:
            replace_earlier_run(p.plan)
    wait_for_everyone()  # no rank reports done before the adapter is saved
    log.info("Done in %.0f s (training %.0f s): train_loss=%.4f, eval_loss=%.4f, exact match %.3f -> %.3f on %d "
             "held-out rows; outputs in %s", metrics["runtime_s"], metrics["train_runtime_s"], metrics["train_loss"],
             metrics["eval_loss"], metrics["exact_match_before"], metrics["exact_match_after"], len(em_rows),
             p.run_dir)
    return metrics


def train_stepping_down(p: Prepared) -> Prepared:
    """Train; if the first step of a GPU batch plan runs out of memory, load the model again with the next plan
    (gemma_ft.batching: smaller step, or offloaded checkpointing), say so, and start over. Nothing was applied or
    saved before the first step ended, so the new start is the run's start. Returns what trained."""
    from gemma_ft.batching import Measurement, StepDoesNotFit
    from gemma_ft.training import training_schedule

    while True:
        try:
            p.trainer.train(resume_from_checkpoint=str(p.plan.resume_from) if p.plan.resume_from else None)
            return p
        except RuntimeError as exc:  # torch.OutOfMemoryError is one; compiled kernels and cuBLAS raise others
            if not is_out_of_memory(exc):
                raise
            if p.trainer.state.global_step > 0:
                raise StepDoesNotFit(
                    f"ran out of GPU memory at step {p.trainer.state.global_step + 1} with {p.batch_plan.describe()} "
                    "after the first step fitted (another process took GPU memory?); run the same command again: "
                    "it resumes from the last checkpoint") from None
            if not p.batch_plans_left:
                raise StepDoesNotFit(
                    f"no batch plan fits this GPU: the first step of the smallest, {p.batch_plan.key()}, ran out of "
                    "memory; lower train.tokens_per_step or train.max_seq_length, set "
                    "lora.use_gradient_checkpointing=unsloth, or load the model in 4-bit (model.load_in_4bit=true)"
                ) from None
        failed, plan = p.batch_plan, p.batch_plans_left[0]
        if p.step_memory is not None:  # the next run on this GPU skips it
            p.step_memory.put(failed, Measurement(None, 0))
        line = f"{failed.key()}: its first step ran out of GPU memory; stepping down to {plan.key()}"
        log.warning("Batch plan %s", line)
        p.model = p.trainer = None
        # In place: whoever holds `p` (the runner's signal and error handling) sees the trainer that runs now.
        p.model, p.trainer = p.build_for_plan(plan)
        p.batch_plan, p.batch_plans_left = plan, p.batch_plans_left[1:]
        p.batch_plan_steps_down = [*p.batch_plan_steps_down, line]
        p.schedule = training_schedule(p.trainer)
        log.info(plan.describe())


def is_disk_full(exc: BaseException) -> bool:
    """A full disk (or quota), as the OS reports it or as torch.save does: a RuntimeError from its zip writer."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    message = str(exc)
    return "No space left on device" in message or "file write failed" in message or "Disk quota exceeded" in message


def remove_incomplete_checkpoint(folder: Path, step: int) -> Path | None:
    """The checkpoint of `step` if this run was writing it and it is not complete: removed (it would fill the disk
    and is never resumed from); returns it."""
    from gemma_ft.run_dir import COMPLETE_MARKER

    checkpoint = folder / f"checkpoint-{step}"
    if checkpoint.is_dir() and not (checkpoint / COMPLETE_MARKER).exists():
        shutil.rmtree(checkpoint, ignore_errors=True)
        return checkpoint
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    message = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message or "CUBLAS_STATUS_ALLOC_FAILED" in message


def speed_metrics(p: Prepared) -> dict:
    """How fast this run trained and how its batches were chosen (gemma_ft.speed, gemma_ft.batching)."""
    n_params = sum(parameter.numel() for parameter in p.model.parameters())
    lengths = [len(ids) for ids in p.train_rows.input_ids]
    startup = p.startup
    return {
        **p.speed.report(p.model.config.get_text_config(), n_params, sum(lengths) / len(lengths)),
        "gradient_checkpointing": p.batch_plan.gradient_checkpointing,
        "first_step_peak_gib": p.speed.first_step_peak_gib,
        "batch_plan_steps_down": p.batch_plan_steps_down,
        "time_to_first_step_s": startup.total() if "first step" in startup.phases else None,
        "startup_s": dict(startup.phases),
        "compile_cache_was_warm": startup.compile_cache_was_warm,
    }


def eval_rows_count(p: Prepared) -> int:
    return len(p.split.validation) - p.rows_dropped_too_long["eval"]


def report_rows_dropped_too_long(train_rows, eval_rows, max_seq_length: int) -> dict[str, int]:
    """Rows whose whole reply max_seq_length cuts off: logged and counted; a split left empty is a DataError."""
    dropped = {"train": train_rows.dropped_too_long, "eval": eval_rows.dropped_too_long}
    for split, count in dropped.items():
        if count:
            log.warning("%d %s row(s) dropped: max_seq_length=%d cuts off the whole reply "
                        "(raise train.max_seq_length to keep them)", count, split, max_seq_length)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows.replies_cut_off:
            log.warning("%d %s repl(ies) of multi-turn rows not trained: max_seq_length=%d cuts them off entirely "
                        "(their earlier turns still train)", rows.replies_cut_off, split, max_seq_length)
    for split, rows in (("training", train_rows), ("validation", eval_rows)):
        if not rows.input_ids:
            raise DataError(f"every {split} row was dropped: train.max_seq_length={max_seq_length} cuts off every "
                            "reply; raise train.max_seq_length")
    return dropped


def release_accelerator_memory() -> None:
    """Free what earlier runs in this process left on the GPU and restart its peak-memory count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def final_eval_loss(trainer) -> float:
    """The eval loss of the final weights: the one logged at the last step if there is one, else a new evaluation."""
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1]["step"] == trainer.state.global_step:
        return last[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def mean_training_loss(log_history: list[dict]) -> float:
    """The mean loss over every step of the run, from the logged windows (which a resumed run carries over).

    The trainer's own train_loss after a resume divides the loss of the resumed steps by all steps.
    """
    total, previous_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous_step)
            previous_step = entry["step"]
    return total / previous_step if previous_step else float("nan")


def checkpoint_size_estimate(cfg: Config, model_path: str) -> int:
    """Rough bytes of one checkpoint: adapter plus optimizer state, or whole weights when they train."""
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else 0
    if cfg.model.full_finetuning:
        factor = 6.0  # fp32 weights + two Adam moments, from bf16 files
    elif cfg.lora.train_lm_head or cfg.lora.train_embeddings:
        factor = 4.0
    else:
        factor = 0.1
    return int(weights * factor) + 64 * 2**20


def save_outputs(run_dir: Path, model, tokenizer, metrics: dict, log_history: list[dict], rows, replies_before,
                 replies_after) -> None:
    """Adapter, samples and metrics; each written beside its final name and renamed, so none is half-written."""
    staging = run_dir / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    except BaseException as exc:
        # A full disk (or a kill) mid-save: the half-written adapter must neither count nor fill the disk.
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise SaveFailed(
                f"could not save the adapter in {run_dir}: {exc.strerror}; free some space and run the same "
                "command again: it resumes from its last checkpoint"
            ) from None
        raise
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    staging.rename(run_dir / "adapter")
    samples = [
        {"row": c.row, "system": c.system, "prompt": c.user, "expected": c.assistant,
         "generated_before": before, "generated_after": after}
        for c, before, after in zip(rows, replies_before, replies_after)
    ]
    _write_json(run_dir / "samples.json", samples)
    _write_json(run_dir / "history.json", log_history)
    plot_run_losses(log_history, run_dir / "loss.png")
    # Last: metrics.json (with the adapter) is what marks a run as finished.
    _write_json(run_dir / "metrics.json", metrics)


def _write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
