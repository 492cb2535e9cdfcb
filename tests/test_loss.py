"""The training loss goes through a fused LM head (no [tokens, vocabulary] logits: 8.6 GB in bf16 for a 16,384-token
step of Gemma 3's 262,144-token vocabulary) and equals the plain cross-entropy over materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma_ft.data.encoding import IGNORE_INDEX
from gemma_ft.pipeline import prepare
from tests.helpers import TINY, chess_rows, typed_config, write_csv


def fused_and_plain_losses(prepared, rows: int) -> tuple[float, float, dict]:
    """The trainer's own loss on a batch of `rows` training rows (what training backpropagates), the mean
    cross-entropy over the trained tokens computed from the model's materialised logits, and how the trainer's
    forward was called."""
    trainer, model = prepared.trainer, prepared.model
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(rows)]))
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(fused_lm_head=kwargs.get("fused_lm_head"), output=type(output).__name__,
                    logits=getattr(output, "logits", None))

    model.eval()
    with torch.no_grad():
        handle = model.register_forward_hook(record, with_kwargs=True)
        try:
            fused = trainer.compute_loss(model, dict(batch)).item()
        finally:
            handle.remove()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"]
    assert (labels != IGNORE_INDEX).sum() > 10
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX).item()
    return fused, plain, seen


def assert_fused_equals_plain(prepared) -> None:
    fused, plain, seen = fused_and_plain_losses(prepared, rows=4)
    assert seen["fused_lm_head"] is True and seen["logits"] is None, seen  # no logits were built for the loss
    assert fused == pytest.approx(plain, rel=1e-3)


def test_the_tiny_models_fused_loss_equals_the_plain_cross_entropy(tmp_path):
    path = write_csv(tmp_path / "d.csv", chess_rows(16))
    assert_fused_equals_plain(prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=4"]),
                                      run_dir=tmp_path / "run"))


@pytest.mark.slow
def test_the_embedded_270ms_fused_loss_equals_the_plain_cross_entropy(tmp_path):
    path = write_csv(tmp_path / "d.csv", chess_rows(16))
    prepared = prepare(typed_config([f"data.path={path}", "data.val_size=4", "train.max_seq_length=128",
                                     "train.report_to=none"]), run_dir=tmp_path / "run")
    assert prepared.model.config.get_text_config().hidden_size == 640  # the real 270M, not the tiny model
    assert_fused_equals_plain(prepared)
