"""The TRL SFTTrainer over labelled rows, in padded or fixed-shape packed batches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from gemma_ft.batching import BatchPlan
from gemma_ft.config import Config
from gemma_ft.data.encoding import IGNORE_INDEX

log = logging.getLogger(__name__)


def build_trainer(model, tokenizer, train_dataset, eval_dataset, cfg: Config, plan: BatchPlan, checkpoint_dir: Path,
                  callbacks=(), speed_monitor=None):
    """The SFTTrainer over datasets that already carry their labels (TRL keeps a `labels` column as it is).

    `speed_monitor` (gemma_ft.speed.SpeedMonitor) sees every training batch and is one of the callbacks."""
    from trl import SFTConfig, SFTTrainer

    t, o = cfg.train, cfg.optim
    collator = None
    if plan.packed:
        # Whole rows packed best-fit-decreasing into bins of tokens_per_step (rows are already cut to max_seq_length);
        # a batch is one bin with position_ids restarting at every row and no attention_mask, from which
        # transformers builds a mask that keeps each row to itself, in sliding-window layers too. Every bin is
        # filled to the same length: one shape, so what compiles for the first step serves the whole epoch.
        # (unsloth's own packing is bypassed: on a CPU it refuses packing without FlashAttention.)
        train_dataset = pack_rows(train_dataset, plan.tokens_per_step)
        eval_dataset = pack_rows(eval_dataset, plan.tokens_per_step)
        collator = PackedBinCollator(plan.tokens_per_step, tokenizer.pad_token_id)
        batching = dict(max_length=plan.tokens_per_step, packing=False, padding_free=False,
                        per_device_train_batch_size=1, per_device_eval_batch_size=1,
                        train_sampling_strategy="random")
    else:
        # unsloth would switch padding-free batches on by itself; padded batches run unsloth's compiled decoder
        # blocks. train.sampling=group_by_length keeps the padding small.
        batching = dict(max_length=t.max_seq_length, packing=False, padding_free=False,
                        per_device_train_batch_size=t.per_device_train_batch_size,
                        per_device_eval_batch_size=t.per_device_eval_batch_size,
                        train_sampling_strategy=t.sampling)
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        **batching,
        # The Trainer asks DDP to search for unused parameters whenever the model is a PeftModel: a walk of the
        # autograd graph every step on several GPUs. Every LoRA weight is used in every forward pass, so skip it.
        ddp_find_unused_parameters=False,
        # DDP would also broadcast the model's buffers from rank 0 before every forward pass: a collective and its
        # copies each step. Gemma 3's buffers (rotary frequencies, the embedding scale) are constants that every
        # rank computes from the config. transformers documents False as the default with gradient checkpointing
        # but passes nothing unless it is set (DDP's default is True).
        ddp_broadcast_buffers=False,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        optim=o.name,
        lr_scheduler_type=o.lr_scheduler_type,
        warmup_steps=o.warmup_steps,
        max_grad_norm=o.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        dataset_num_proc=1,
        disable_tqdm=False,
    )
    callbacks = list(callbacks) + ([speed_monitor] if speed_monitor is not None else [])
    return _gemma_ft_trainer(SFTTrainer, speed_monitor)(
        model=model,
        processing_class=tokenizer,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        args=args,
        callbacks=callbacks,
    )


class EpochSeededLengthGroupedSampler:
    """transformers' length-grouped order, drawn from a generator seeded with seed + epoch.

    transformers' own LengthGroupedSampler draws from the global torch generator when an epoch starts; a run resumed
    in a later epoch reaches that point with another generator state (none of the epochs before it ran in this
    process), so it trained on another order: killed in epoch 2 of the tiny model, steps after the checkpoint came
    out up to 0.015 apart in loss (tests/test_resume.py). The order of epoch e here depends on (seed, e) only, as
    accelerate's seedable sampler does for train.sampling=random; the Trainer calls set_epoch before each epoch,
    resumed or not, and every rank draws the same order.
    """

    def __init__(self, lengths, batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def _gemma_ft_trainer(trainer_class, speed_monitor=None):
    """trainer_class with two fixes of transformers' loop for resumed runs: the length-grouped training order is an
    EpochSeededLengthGroupedSampler, and a run resumed from its final checkpoint trains no step beyond it."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class Trainer(trainer_class):
        def training_step(self, model, inputs, *args, **kwargs):
            if speed_monitor is not None:  # gemma_ft.speed.SpeedMonitor: each batch's real tokens and shape
                speed_monitor.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(sampler.lengths, sampler.batch_size, seed)
            return sampler

        def _run_epoch(self, *args, **kwargs):
            # The loop checks max_steps only after a step: resumed from checkpoint-60 of a 60-step run (a rerun after
            # the final save failed), it trained a step 61 (tests/test_run_dir_safety.py).
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_class.__name__
    return Trainer


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps the run takes and how much of the training data they cover."""

    steps: int
    steps_per_epoch: int
    batches_per_epoch: int  # packed bins or padded batches, over all devices

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def describe(self) -> str:
        return (f"Training: {self.steps} steps = {self.epochs:.2f} epochs of the training data "
                f"({self.steps_per_epoch} steps an epoch)")


def training_schedule(trainer) -> Schedule:
    """The trainer's own arithmetic: a step is gradient_accumulation_steps batches on every device at once, and
    max_steps=-1 trains for num_train_epochs."""
    args = trainer.args
    batches = math.ceil(len(trainer.train_dataset) / args.per_device_train_batch_size)
    per_device = math.ceil(batches / max(args.world_size, 1))
    steps_per_epoch = max(math.ceil(per_device / args.gradient_accumulation_steps), 1)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return Schedule(steps, steps_per_epoch, batches)


# transformers' flex attention (unsloth's choice for Gemma 3 on GPUs) works on blocks of 128 tokens, and
# torch.compile specialises a batch of one block. So the first batch padded to <= 128 tokens after longer ones
# compiles every attention again: 58 s in one step on an H200, where its neighbours took 0.15 s (2026-11-27; with
# unsloth's block compile off, every later step ran at ~4x its time). Length-grouped batches end each megabatch
# with the shortest rows, so a run whose data has short rows meets it at the end of the first one (step 50 at batch
# 8). A batch of at least two blocks (129 tokens) never does (benchmarks/flex_recompiles.py shows the guard).
FLEX_BLOCK_TOKENS = 128


class PadBeyondOneFlexBlock:
    """A collator's batches, padded on the tokenizer's side to at least min_length tokens if they are shorter.

    The padding is invisible to training: attention_mask 0 and labels IGNORE_INDEX.
    """

    def __init__(self, collator, pad_token_id: int, padding_side: str, min_length: int = FLEX_BLOCK_TOKENS + 1):
        self.collator, self.min_length, self.padding_side = collator, min_length, padding_side
        self.fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def __call__(self, features):
        import torch.nn.functional as F

        batch = self.collator(features)
        length = batch["input_ids"].shape[-1]
        missing = self.min_length - length
        if missing <= 0:
            return batch
        unknown = [key for key, value in batch.items() if key not in self.fill and getattr(value, "ndim", 0) == 2
                   and value.shape[-1] == length]
        if unknown:
            raise ValueError(f"cannot pad the batch's {unknown}: only {sorted(self.fill)} are known")
        widths = (missing, 0) if self.padding_side == "left" else (0, missing)
        for key, value in self.fill.items():
            if key in batch:
                batch[key] = F.pad(batch[key], widths, value=value)
        return batch


def uses_flex_attention(model) -> bool:
    # unsloth sets it on the decoder's config only (a multimodal model's vision tower keeps its own)
    return getattr(model.config.get_text_config(), "_attn_implementation", None) == "flex_attention"


def pad_short_batches_for_flex_attention(trainer, model, tokenizer) -> bool:
    """With flex attention, pad every batch beyond one block (see FLEX_BLOCK_TOKENS); return whether it does."""
    if not uses_flex_attention(model):
        return False
    trainer.data_collator = PadBeyondOneFlexBlock(trainer.data_collator, tokenizer.pad_token_id,
                                                  tokenizer.padding_side)
    log.info("Flex attention: batches are padded to at least %d tokens (a batch of one %d-token block would "
             "compile it again)", FLEX_BLOCK_TOKENS + 1, FLEX_BLOCK_TOKENS)
    return True


def pack_rows(dataset, tokens: int):
    """TRL's best-fit-decreasing packing over the whole split at once: columns input_ids, labels, seq_lengths."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, tokens, strategy="bfd", map_kwargs={"batch_size": max(1, len(dataset))})


class PackedBinCollator:
    """One packed bin -> a batch of exactly `tokens` tokens: input_ids, labels and position_ids, no attention_mask.

    position_ids restart at 0 for every row, which is how the model tells the rows apart. The bin is filled up with
    a padding row of its own (its positions also restart at 0), so no real token attends to it, and its labels are
    IGNORE_INDEX, so it never trains.
    """

    def __init__(self, tokens: int, pad_token_id: int):
        self.tokens, self.pad_token_id = tokens, pad_token_id

    def __call__(self, features):
        import torch

        if len(features) != 1:
            raise ValueError(f"a packed batch is one bin, got {len(features)}")
        bin_ = features[0]
        input_ids, labels = list(bin_["input_ids"]), list(bin_["labels"])
        missing = self.tokens - len(input_ids)
        if missing < 0 or sum(bin_["seq_lengths"]) != len(input_ids):
            raise ValueError(f"a bin of {len(input_ids)} tokens (rows {list(bin_['seq_lengths'])}) does not fit "
                             f"{self.tokens} tokens")
        positions = [position for length in bin_["seq_lengths"] for position in range(length)]
        input_ids += [self.pad_token_id] * missing
        labels += [IGNORE_INDEX] * missing
        positions += range(missing)
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}
