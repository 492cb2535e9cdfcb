"""The TRL SFTTrainer, masked so that only the assistant's replies carry loss."""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_ft.chat_template import MODEL_TURN, USER_TURN
from gemma_ft.config import Config
from gemma_ft.errors import DataError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def tokenize_conversations(tokenizer, conversations):
    """Chat-template text tokenised once, with one BOS and no EOS after the template's closing "<end_of_turn>\n".

    Handing the trainer token ids (not text) keeps TRL from appending <eos> to every row and from re-tokenising.
    """
    from datasets import Dataset

    from gemma_ft.chat_template import render_text

    texts = [render_text(tokenizer, c.messages()) for c in conversations]
    return Dataset.from_dict({"input_ids": tokenizer(texts).input_ids})


def build_trainer(model, tokenizer, train_dataset, eval_dataset, cfg: Config, checkpoint_dir: Path, callbacks=()):
    from trl import SFTConfig, SFTTrainer

    t, o = cfg.train, cfg.optim
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        max_length=t.max_seq_length,
        packing=False,
        # unsloth would switch padding-free batches on; with this stack on an H100/H200 its first step did not end
        # within 200 s, while padded batches run unsloth's compiled decoder blocks (0.2 s/step after compiling).
        # train.sampling=group_by_length keeps the padding small instead.
        padding_free=False,
        # The Trainer asks DDP to search for unused parameters whenever the model is a PeftModel: a walk of the
        # autograd graph every step on several GPUs. Every LoRA weight is used in every forward pass, so skip it.
        ddp_find_unused_parameters=False,
        # DDP would also broadcast the model's buffers from rank 0 before every forward pass: a collective and its
        # copies each step. Gemma 3's buffers (rotary frequencies, the embedding scale) are constants that every
        # rank computes from the config. transformers documents False as the default with gradient checkpointing
        # but passes nothing unless it is set (DDP's default is True).
        ddp_broadcast_buffers=False,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        train_sampling_strategy=t.sampling,
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
    return SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        args=args,
        callbacks=list(callbacks),
    )


def mask_to_responses(trainer) -> dict[str, int]:
    """Apply unsloth's train_on_responses_only; return how many rows each split lost to truncation."""
    from unsloth.chat_templates import train_on_responses_only

    before = {"train": len(trainer.train_dataset), "eval": len(trainer.eval_dataset)}
    train_on_responses_only(trainer, instruction_part=USER_TURN, response_part=MODEL_TURN)
    dropped = {
        "train": before["train"] - len(trainer.train_dataset),
        "eval": before["eval"] - len(trainer.eval_dataset),
    }
    for split, count in dropped.items():
        if count:
            log.warning("%d %s row(s) dropped: max_seq_length=%d cuts off the whole reply "
                        "(raise train.max_seq_length to keep them)", count, split, trainer.args.max_length)
    if len(trainer.train_dataset) == 0:
        raise DataError(f"every training row was dropped: train.max_seq_length={trainer.args.max_length} cuts off "
                        "every reply; raise train.max_seq_length")
    if len(trainer.eval_dataset) == 0:
        raise DataError(f"every validation row was dropped: train.max_seq_length={trainer.args.max_length} cuts off "
                        "every reply; raise train.max_seq_length")
    return dropped


# transformers' flex attention (unsloth's choice for Gemma 3 on GPUs) works on blocks of 128 tokens, and
# torch.compile specialises a batch of one block. So the first batch padded to <= 128 tokens after longer ones
# compiles every attention again: 58 s in one step on an H200, where its neighbours took 0.15 s (session 8; with
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
