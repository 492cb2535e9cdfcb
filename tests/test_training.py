"""The trainer built from the config: response-only labels, weight decay in the optimizer, LoRA-only updates,
and a whole tiny-model run through `run(cfg)`."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_ft.pipeline import prepare, run
from gemma_ft.training import (
    FLEX_BLOCK_TOKENS,
    IGNORE_INDEX,
    PadBeyondOneFlexBlock,
    pad_short_batches_for_flex_attention,
)
from tests.helpers import START_OF_TURN_ID, TINY, chess_rows, typed_config, write_csv

CONVERSATIONS = [
    ["Answer in one word.", "Which piece moves in Nf3?", "knight"],
    ["Réponds en français.", "Quelle est la capitale ?", "Paris, évidemment — 巴黎 🎉"],
    ["Be helpful.", "List two squares.", "e4\nd5, with a comma"],
    ["Be terse.", "Say it twice.", "again again again"],
]


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = write_csv(tmp_path_factory.mktemp("data") / "conv.csv", CONVERSATIONS * 3)
    return prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=4"]),
                   run_dir=tmp_path_factory.mktemp("run"))


def test_labels_are_exactly_the_assistant_replies(prepared):
    tokenizer = prepared.tokenizer
    for dataset, conversations in ((prepared.trainer.train_dataset, prepared.split.train),
                                   (prepared.trainer.eval_dataset, prepared.split.validation)):
        assert len(dataset) == len(conversations)
        for row, conversation in zip(dataset, conversations):
            assert trained_text(tokenizer, row) == conversation.assistant + "<end_of_turn>\n"
            # Every label that trains is the input token itself (labels are not shifted here).
            assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(row["input_ids"], row["labels"]))
            assert row["input_ids"][:2] == [tokenizer.bos_token_id, START_OF_TURN_ID]  # one BOS, then the first turn


def test_ddp_neither_searches_for_unused_weights_nor_broadcasts_the_constant_buffers(prepared):
    # What DDP is told under torchrun. Both would cost every step of a several-GPU run: every LoRA weight gets its
    # gradient each step, and the only buffers are ones each rank computes from the config.
    ddp = prepared.trainer.accelerator.ddp_handler
    assert ddp.find_unused_parameters is False and ddp.broadcast_buffers is False
    buffers = {name.rsplit(".", 1)[-1] for name, _ in prepared.trainer.model.named_buffers()}
    assert buffers and all(name == "embed_scale" or name.endswith("inv_freq") for name in buffers), buffers


def test_a_batch_of_one_flex_attention_block_is_padded_beyond_it_without_changing_what_trains(prepared):
    tokenizer, model = prepared.tokenizer, prepared.model
    rows = [prepared.trainer.train_dataset[i] for i in range(2)]
    plain = prepared.trainer.data_collator(rows)
    padded = PadBeyondOneFlexBlock(prepared.trainer.data_collator, tokenizer.pad_token_id, "left")(rows)
    length = plain["input_ids"].shape[-1]
    missing = FLEX_BLOCK_TOKENS + 1 - length
    assert missing > 0 and set(padded) == set(plain)
    for key, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        assert padded[key].shape == (2, FLEX_BLOCK_TOKENS + 1)
        assert torch.equal(padded[key][:, missing:], plain[key]) and bool((padded[key][:, :missing] == fill).all())
    with torch.no_grad():
        # bf16 matmuls over other shapes round differently (measured up to 1.3e-5); a mask that let padding in
        # would move the loss by far more
        assert model(**padded).loss.item() == pytest.approx(model(**plain).loss.item(), rel=1e-4)
    right = PadBeyondOneFlexBlock(prepared.trainer.data_collator, tokenizer.pad_token_id, "right")(rows)
    assert torch.equal(right["labels"][:, :length], plain["labels"])
    assert bool((right["labels"][:, length:] == IGNORE_INDEX).all())
    unchanged = PadBeyondOneFlexBlock(prepared.trainer.data_collator, tokenizer.pad_token_id, "left", length - 5)(rows)
    assert all(torch.equal(unchanged[key], plain[key]) for key in plain)


def test_only_a_model_with_flex_attention_gets_the_padding(prepared):
    from types import SimpleNamespace

    trainer = SimpleNamespace(data_collator=prepared.trainer.data_collator)
    assert prepared.model.config._attn_implementation != "flex_attention"  # on CPU
    assert not pad_short_batches_for_flex_attention(trainer, prepared.model, prepared.tokenizer)
    assert trainer.data_collator is prepared.trainer.data_collator
    flex_config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(_attn_implementation="flex_attention"))
    assert pad_short_batches_for_flex_attention(trainer, SimpleNamespace(config=flex_config), prepared.tokenizer)
    assert isinstance(trainer.data_collator, PadBeyondOneFlexBlock)
    assert trainer.data_collator.collator is prepared.trainer.data_collator


def test_with_flex_attention_the_pipelines_training_steps_get_the_padded_batches(tmp_path, monkeypatch):
    import gemma_ft.training

    monkeypatch.setattr(gemma_ft.training, "uses_flex_attention", lambda model: True)  # as on a GPU
    path = write_csv(tmp_path / "d.csv", chess_rows(8))
    p = prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=2", "train.max_steps=2"]),
                run_dir=tmp_path / "run")
    assert isinstance(p.trainer.data_collator, PadBeyondOneFlexBlock)
    lengths, step = [], p.trainer.training_step

    def recorded(model, inputs, *args, **kwargs):
        lengths.append(inputs["input_ids"].shape[-1])
        return step(model, inputs, *args, **kwargs)

    p.trainer.training_step = recorded
    p.trainer.train()
    assert lengths == [FLEX_BLOCK_TOKENS + 1] * 2


def test_reply_cut_off_by_max_seq_length_is_dropped_and_counted(tmp_path):
    rows = chess_rows(8)
    rows[2][0] = "a very long system prompt " * 40
    path = write_csv(tmp_path / "long.csv", rows)
    p = prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=1", "data.split_seed=5",
                              "train.max_seq_length=64"]), run_dir=tmp_path / "run")
    assert sum(p.rows_dropped_too_long.values()) == 1
    assert len(p.trainer.train_dataset) + len(p.trainer.eval_dataset) == 7
    for row in p.trainer.train_dataset:
        assert any(label != IGNORE_INDEX for label in row["labels"])


def test_weight_decay_reaches_the_optimizer(tmp_path):
    # A value other than the default (0.001, test_configs) proves the path from the config to the optimizer: a
    # hard-coded or dropped value would give 0.001 or 0.0.
    expected = 0.01
    path = write_csv(tmp_path / "d.csv", chess_rows(6))
    p = prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=2", f"optim.weight_decay={expected}"]),
                run_dir=tmp_path / "r")
    optimizer = p.trainer.create_optimizer()
    decays = {group["weight_decay"] for group in optimizer.param_groups if group["params"]}
    # HF groups decayed weights apart from biases/norms (always 0); the decayed group carries the config's value.
    assert expected in decays and decays <= {expected, 0.0}
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] == expected]
    assert sum(p.numel() for g in decayed for p in g["params"]) > 0


def test_lora_weights_change_and_base_weights_do_not(prepared):
    model = prepared.model
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    prepared.trainer.train()
    changed_trainable, changed_frozen = [], []
    for name, param in model.named_parameters():
        if not torch.equal(before[name], param.detach()):
            (changed_trainable if param.requires_grad else changed_frozen).append(name)
    assert not changed_frozen
    assert any("lora_B" in name for name in changed_trainable)
    assert any("lm_head" in name or "modules_to_save" in name for name in changed_trainable)
    assert all(("lora_" in n or "modules_to_save" in n) for n in changed_trainable)


def test_tiny_run_writes_adapter_metrics_and_samples(tmp_path, tiny_model_dir, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="gemma_ft")
    path = write_csv(tmp_path / "d.csv", chess_rows(20))
    run_dir = tmp_path / "run"
    metrics = run(typed_config([*TINY, f"data.path={path}", "data.val_size=4", "train.save_steps=2",
                                "train.save_total_limit=1", "debug.verbose=true", "debug.show_examples=true",
                                "debug.example_index=100000"]), run_dir=run_dir)
    captured = capsys.readouterr()
    out = captured.out
    for heading in ("=== Dataset Example ===", "=== Formatted Text ===", "=== Tokenized Input ===",
                    "=== Masked Labels (only assistant responses) ==="):
        assert heading in out
    assert "Peak process memory (RSS)" in out and out.count("Training took") == 1
    # The exact-match phase shows its progress (rows answered) and its time.
    assert "Exact match, fine-tuned: 100%" in captured.err and "2/2" in captured.err
    assert "Exact match: 2 held-out rows answered before and after training in" in caplog.text
    # 16 training rows in batches of 2: 8 steps an epoch, so 4 steps are half of one; a user's file gets a warning.
    assert "Training: 4 steps = 0.50 epochs of the training data (8 steps an epoch)" in caplog.text
    assert f"This run sees only 50% of the training rows of {path}" in caplog.text

    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("train_loss", "eval_loss", "weight_decay", "max_steps", "runtime_s", "peak_memory_gib", "device",
                "exact_match_before", "exact_match_after"):
        assert key in saved
    # runtime_s is the whole job (model load, evaluation, exact match); train_runtime_s the training loop alone.
    assert saved["runtime_s"] > saved["train_runtime_s"] > 0 and saved["epochs"] == 0.5
    assert saved["device"] == "cpu" and saved["max_steps"] == 4 and saved["weight_decay"] == 0.001
    assert saved["eval_loss"] > 0 and saved["train_loss"] > 0
    samples = json.loads((run_dir / "samples.json").read_text())
    assert len(samples) == 2 and {"prompt", "expected", "generated_after"} <= set(samples[0])
    # save_steps=2 over 4 steps with save_total_limit=1 keeps only the newest checkpoint, inside the run dir.
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]

    # Plain peft loads the adapter on the same base, and it differs from the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_replies_before_training_are_the_untrained_models(tmp_path):
    """run() generates the "before" replies after training with the adapters off: they must be exactly the
    replies of the model as it was before its first step."""
    from gemma_ft.replies import generate_replies

    path = write_csv(tmp_path / "d.csv", chess_rows(20))
    overrides = [*TINY, f"data.path={path}", "data.val_size=4", "train.max_steps=8", "train.max_new_tokens=8",
                 "optim.lr=0.05", "optim.warmup_steps=0"]
    untrained = prepare(typed_config(overrides), run_dir=tmp_path / "untrained")
    expected_before = generate_replies(untrained.model, untrained.tokenizer, untrained.split.validation[:2], 8)

    run(typed_config(overrides), run_dir=tmp_path / "run")
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert [s["generated_before"] for s in samples] == expected_before
    # Training moved the replies, so the adapters really were off for the "before" ones.
    assert [s["generated_after"] for s in samples] != expected_before


@pytest.mark.parametrize("rows, batch, world, accumulation, max_steps, epochs, expected", [
    (16, 2, 1, 1, 4, 1.0, (4, 8, 0.5)),
    (17, 2, 1, 1, -1, 2.0, (18, 9, 2.0)),  # a last short batch is a step of its own
    (16, 2, 2, 2, 6, 1.0, (6, 2, 3.0)),  # two devices, two batches accumulated: 4 batches a device, 2 steps an epoch
    (3, 1, 1, 1, 60, 1.0, (60, 3, 20.0)),  # packed: 3 bins, one a step
])
def test_the_schedule_says_how_many_epochs_the_steps_cover(rows, batch, world, accumulation, max_steps, epochs,
                                                            expected):
    from types import SimpleNamespace

    from gemma_ft.training import training_schedule

    trainer = SimpleNamespace(train_dataset=[None] * rows, args=SimpleNamespace(
        per_device_train_batch_size=batch, world_size=world, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, num_train_epochs=epochs))
    schedule = training_schedule(trainer)
    assert (schedule.steps, schedule.steps_per_epoch, schedule.epochs) == expected


def test_concurrent_cpu_trainings_share_the_cores(tmp_path, monkeypatch):
    """Each training process on a CPU sets its threads to the cores / the trainings alive; seats of dead processes
    are cleared (two trainings on 2 cores once took 8.0x the time of one)."""
    import os
    import subprocess
    import sys

    import gemma_ft.cpu_share as cpu_share
    from gemma_ft.callbacks import ShareCpuCores

    monkeypatch.setattr(cpu_share, "available_cores", lambda: 8)
    seats = tmp_path / "seats"
    share = ShareCpuCores(seats)
    share.on_train_begin(None, None, None)
    threads_before = torch.get_num_threads()
    try:
        share.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 8  # alone
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (seats / str(other.pid)).write_text("")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (seats / str(dead.pid)).write_text("")
        share.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 4  # beside one live training; the dead one's seat is gone
        assert not (seats / str(dead.pid)).exists()
        other.kill()
        other.wait()
        share.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 8
    finally:
        share.on_train_end(None, None, None)
        torch.set_num_threads(threads_before)
    assert not (seats / str(os.getpid())).exists()


def test_a_process_starting_beside_a_training_makes_openmp_threads_sleep_before_torch_loads(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); "
            "from gemma_ft.cpu_share import sleep_while_waiting; sleep_while_waiting(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {**os.environ, "GEMMA_FT_CACHE": str(tmp_path)}
    alone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert alone.stdout.split() == ["None", "False"]  # alone: OpenMP's default (sleeping cost a lone run 20%)
    (tmp_path / "cpu_seats").mkdir()
    (tmp_path / "cpu_seats" / str(os.getpid())).write_text("")  # this test process: a live training
    beside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert beside.stdout.split() == ["PASSIVE", "False"]
