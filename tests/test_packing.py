"""Packed batches: whole rows in bins of one fixed token budget, the same loss as padded batches, no attention
across rows (Gemma 3's sliding-window layers included), and the batch plan's rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gemma_ft.batching import PACKED_TOKENS_CAP, Measurement, StepDoesNotFit, batch_candidates, skip_known_misfits
from gemma_ft.data.encoding import IGNORE_INDEX, encode_conversations
from gemma_ft.pipeline import prepare
from gemma_ft.training import PackedBinCollator
from tests.helpers import TINY, chess_rows, typed_config, write_csv

TOKENS = 512


def packed_overrides(path, *extra):
    return [*TINY, f"data.path={path}", "data.val_size=4", "train.batching=packed", f"train.tokens_per_step={TOKENS}",
            "train.max_steps=3", *extra]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = write_csv(tmp_path_factory.mktemp("data") / "d.csv", chess_rows(24))
    return prepare(typed_config(packed_overrides(path)), run_dir=tmp_path_factory.mktemp("run"))


def test_every_packed_batch_has_the_budgets_shape_and_keeps_each_row_whole(packed):
    trainer, rows = packed.trainer, packed.train_rows
    seen = []
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        for batch in loader:
            assert batch["input_ids"].shape == (1, TOKENS) and batch["labels"].shape == (1, TOKENS)
            assert "attention_mask" not in batch
            positions = batch["position_ids"][0].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [TOKENS]
            for begin, end in zip(starts, starts[1:]):
                assert positions[begin:end] == list(range(end - begin))  # each segment counts from 0
                seen.append(batch["input_ids"][0, begin:end].tolist())
    eval_rows = encode_conversations(packed.tokenizer, packed.split.validation, 128)
    train_and_eval = [*rows.input_ids, *eval_rows.input_ids]
    for ids in train_and_eval:  # every row appears whole, as one segment
        assert ids in seen
    # the filler segments are padding that never trains
    fillers = [s for s in seen if s not in train_and_eval]
    assert all(set(s) == {packed.tokenizer.pad_token_id} for s in fillers)


def test_masked_labels_in_packed_batches_are_exactly_the_assistant_replies(packed):
    tokenizer = packed.tokenizer
    replies = sorted(c.assistant + "<end_of_turn>\n" for c in packed.split.train)
    trained = []
    for batch in packed.trainer.get_train_dataloader():
        ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for begin, end in zip(starts, starts[1:]):
            tokens = [t for t, label in zip(ids[begin:end], labels[begin:end]) if label != IGNORE_INDEX]
            assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids[begin:end], labels[begin:end]))
            if tokens:
                trained.append(tokenizer.decode(tokens))
    assert sorted(trained) == replies


def row_features(rows, indices) -> list[dict]:
    """Encoded rows as the packer sees them: ids, labels and their one sequence length."""
    return [{"input_ids": list(rows.input_ids[i]), "labels": rows.labels[i], "seq_lengths": [len(rows.input_ids[i])]}
            for i in indices]


def one_bin(features: list[dict]) -> dict:
    """The rows concatenated into one packed bin, as TRL's pack_dataset writes it."""
    return {key: sum((f[key] for f in features), []) for key in ("input_ids", "labels", "seq_lengths")}


def packed_and_padded_losses(prepared, rows_in_bin: int) -> tuple[float, float]:
    """The model's loss on the first `rows_in_bin` training rows, packed into one bin and as one padded batch."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows, model = prepared.train_rows, prepared.model
    features = row_features(rows, range(rows_in_bin))
    assert sum(len(f["input_ids"]) for f in features) <= prepared.batch_plan.tokens_per_step
    packed_batch = prepared.trainer.data_collator([one_bin(features)])
    padded_batch = DataCollatorForLanguageModeling(pad_token_id=prepared.tokenizer.pad_token_id)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    assert padded_batch["input_ids"].shape[0] == rows_in_bin and packed_batch["input_ids"].shape[0] == 1
    # In float32: in bf16 the two layouts' matmuls round differently (the 270M's losses once came out 1.2e-3 apart
    # in the full suite), which would hide what this compares, the definition of the loss.
    model.float().eval()
    with torch.no_grad():
        return model(**packed_batch).loss.item(), model(**padded_batch).loss.item()


def test_first_step_loss_packed_equals_padded_on_the_same_rows(packed):
    """The loss is the mean over trained tokens in both layouts, so one bin holding every row gives the padded
    batch's loss."""
    packed_loss, padded_loss = packed_and_padded_losses(packed, 6)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-3)


def test_on_the_embedded_270m_packed_and_padded_losses_agree(tmp_path):
    path = write_csv(tmp_path / "d.csv", chess_rows(24))
    prepared = prepare(typed_config([f"data.path={path}", "data.val_size=4", "train.batching=packed",
                                     f"train.tokens_per_step={TOKENS}", "train.max_seq_length=128",
                                     "train.report_to=none"]), run_dir=tmp_path / "run")
    assert prepared.model.config.get_text_config().hidden_size == 640  # the real 270M, not the tiny model
    packed_loss, padded_loss = packed_and_padded_losses(prepared, 6)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-3)


def test_no_row_attends_to_another_in_a_packed_batch(packed):
    """Perturbing one row of a bin leaves every other row's logits unchanged, in full and sliding-window layers."""
    model, rows = packed.model, packed.train_rows
    text_config = model.config.get_text_config()
    assert {"sliding_attention", "full_attention"} <= set(text_config.layer_types)
    features = row_features(rows, range(4))

    def logits(features):
        batch = packed.trainer.data_collator([one_bin(features)])
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()

    before = logits(features)
    perturbed = [dict(f) for f in features]
    ids = list(perturbed[1]["input_ids"])
    ids[5:9] = [1000, 2000, 3000, 4000]  # change tokens inside the second row
    perturbed[1]["input_ids"] = ids
    after = logits(perturbed)
    lengths = [len(f["input_ids"]) for f in features]
    first_end, second_end = lengths[0], lengths[0] + lengths[1]
    assert torch.equal(before[:first_end], after[:first_end])  # earlier row: causal anyway
    assert torch.allclose(before[second_end:], after[second_end:], atol=1e-5)  # later rows: would see it if leaking
    assert not torch.allclose(before[first_end:second_end], after[first_end:second_end])  # the row itself changed


def test_the_filler_is_a_row_of_its_own_that_never_trains():
    bin_ = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]}
    batch = PackedBinCollator(8, pad_token_id=0)([bin_])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9] + [IGNORE_INDEX] * 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    with pytest.raises(ValueError, match="does not fit 4 tokens"):
        PackedBinCollator(4, pad_token_id=0)([bin_])


GIB = 2**30


def train_cfg(**overrides):
    base = dict(batching="auto", tokens_per_step=None, per_device_train_batch_size=8, max_seq_length=512)
    return SimpleNamespace(**{**base, **overrides})


def test_auto_packs_on_a_gpu_and_pads_on_a_cpu():
    cpu = batch_candidates(train_cfg(), "auto", on_gpu=False)
    assert len(cpu) == 1 and not cpu[0].packed and cpu[0].gradient_checkpointing == "unsloth"  # unsloth's CPU default
    assert all(plan.packed for plan in batch_candidates(train_cfg(), "auto", on_gpu=True))
    cpu_packed = batch_candidates(train_cfg(batching="packed"), "auto", on_gpu=False)
    assert [(p.packed, p.tokens_per_step) for p in cpu_packed] == [(True, 8 * 512)]
    assert not any(p.packed for p in batch_candidates(train_cfg(batching="padded"), "auto", on_gpu=True))


def test_gpu_candidates_try_no_checkpointing_first_and_keep_the_users_choices():
    plans = [(p.tokens_per_step, p.gradient_checkpointing) for p in batch_candidates(train_cfg(), "auto", True)]
    assert plans[:3] == [(PACKED_TOKENS_CAP, False), (PACKED_TOKENS_CAP // 2, False), (PACKED_TOKENS_CAP, "unsloth")]
    assert plans[-1] == (512, "unsloth")  # down to max_seq_length: a bin holds the longest row whole
    fixed = batch_candidates(train_cfg(tokens_per_step=4096), "unsloth", True)
    assert [(p.tokens_per_step, p.gradient_checkpointing) for p in fixed] == [(4096, "unsloth")]
    assert [p.tokens_per_step for p in batch_candidates(train_cfg(max_seq_length=32768), "auto", True)] == \
        [32768, 32768]  # off, then the offload: never a bin shorter than the longest row
    padded = batch_candidates(train_cfg(batching="padded"), "auto", True)
    assert [p.gradient_checkpointing for p in padded] == [False, "unsloth"]


def test_plans_measured_not_to_fit_on_this_gpu_are_skipped_the_last_always_kept():
    candidates = batch_candidates(train_cfg(), "auto", True)
    known = {"packed-16384-False": Measurement(None, 80 * GIB), "packed-8192-False": Measurement(79 * GIB, 78 * GIB),
             "packed-16384-unsloth": Measurement(6 * GIB, 78 * GIB)}
    kept, skipped = skip_known_misfits(candidates, lambda plan: known.get(plan.key()))
    assert kept[0].key() == "packed-16384-unsloth" and kept == candidates[2:]
    assert skipped == ["packed-16384-False: skipped, measured before on this GPU: its first step ran out of GPU memory",
                       "packed-8192-False: skipped, measured before on this GPU: its first step peaked at 79.0 GiB, "
                       "over the 78.0 GiB free"]
    only = batch_candidates(train_cfg(tokens_per_step=4096), "unsloth", True)
    assert skip_known_misfits(only, lambda plan: Measurement(None, GIB)) == (only, [])  # never nothing to try


def test_a_first_step_out_of_gpu_memory_steps_down_says_so_and_trains_with_the_next_plan(tmp_path, caplog):
    """The step-down path on a CPU: the first plan's first step raises torch's out-of-memory error."""
    from dataclasses import replace

    from gemma_ft.batching import BatchPlan
    from gemma_ft.pipeline import train_stepping_down

    path = write_csv(tmp_path / "d.csv", chess_rows(16))
    prepared = prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=4", "train.max_steps=2"]),
                       run_dir=tmp_path / "run")
    first_model, first_plan = prepared.model, prepared.batch_plan
    fallback = BatchPlan(False, None, False)
    prepared = replace(prepared, batch_plans_left=[fallback])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    prepared.trainer.train = out_of_memory
    trained = train_stepping_down(prepared)
    assert trained is prepared  # changed in place: the runner's handlers see the new trainer
    assert trained.batch_plan == fallback and trained.model is not first_model  # loaded again, fresh LoRA
    assert trained.trainer.state.global_step == 2
    assert trained.batch_plan_steps_down == [
        f"{first_plan.key()}: its first step ran out of GPU memory; stepping down to {fallback.key()}"]
    assert any("stepping down" in record.getMessage() for record in caplog.records)
    # with nothing left to step down to: one line, no traceback
    exhausted = trained
    exhausted.batch_plans_left = []
    exhausted.trainer.train = out_of_memory
    exhausted.trainer.state.global_step = 0
    with pytest.raises(StepDoesNotFit, match="no batch plan fits this GPU"):
        train_stepping_down(exhausted)


def test_step_memory_is_remembered_per_gpu_and_model(tmp_path):
    from gemma_ft.memory_probe import StepMemoryCache

    plan = batch_candidates(train_cfg(), "auto", True)[0]
    one = StepMemoryCache(tmp_path / "step_memory.json", {"gpu": "H100", "architecture": {"hidden_size": 1152}})
    assert one.get(plan) is None
    one.put(plan, Measurement(28 * GIB, 70 * GIB))
    assert one.get(plan) == Measurement(28 * GIB, 70 * GIB)
    other_gpu = StepMemoryCache(tmp_path / "step_memory.json", {"gpu": "H200", "architecture": {"hidden_size": 1152}})
    assert other_gpu.get(plan) is None


def test_a_token_budget_below_max_seq_length_is_refused_before_loading(tmp_path):
    from gemma_ft.errors import ConfigError
    from gemma_ft.validation import validate

    cfg = typed_config([*TINY, "train.tokens_per_step=64", "train.batching=sideways"])
    with pytest.raises(ConfigError) as error:
        validate(cfg, has_cuda=False)
    assert "train.tokens_per_step=64 must be >= train.max_seq_length=128" in str(error.value)
    assert "train.batching='sideways' must be auto, padded or packed" in str(error.value)


def test_a_packed_run_trains_and_evaluates_through_the_pipeline(tmp_path):
    from gemma_ft.pipeline import run

    path = write_csv(tmp_path / "d.csv", chess_rows(20))
    metrics = run(typed_config(packed_overrides(path, "train.eval_steps=2")), run_dir=tmp_path / "run")
    assert metrics["batching"] == "packed" and metrics["tokens_per_step"] == TOKENS
    assert metrics["global_step"] == 3 and metrics["eval_loss"] > 0
