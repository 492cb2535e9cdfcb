"""Short runs on the real embedded Gemma 3 270M (converted once into the cache)."""

from __future__ import annotations

import json

import pytest

from gemma_ft.pipeline import run
from tests.helpers import typed_config


@pytest.fixture(scope="module")
def model_dir():
    from gemma_ft.models.builtin import resolve_builtin

    return resolve_builtin("builtin:gemma3-270m")


def test_converted_folder_is_a_bf16_gemma3_with_its_tokenizer(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["hidden_size"] == 640
    assert config["num_hidden_layers"] == 18 and config["vocab_size"] == 262144
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").stat().st_size > 500e6
    assert (model_dir / "tokenizer.json").exists()


def test_base_model_speaks_before_any_training(model_dir):
    # The conversion kept the weights (and the tokenizer its merges): the base model continues simple text.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer("1, 2, 3, 4,", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(out[0][ids["input_ids"].shape[1]:]) == " 5, 6,"


@pytest.mark.slow
def test_short_run_improves_exact_match_and_learns_to_end_its_turn(tmp_path):
    metrics = run(typed_config([
        "train.max_steps=10", "optim.lr=4e-4", "optim.warmup_steps=2",  # 10 steps instead of 20: CI has 2 cores
        "train.exact_match_rows=8", "train.max_new_tokens=8", "train.report_to=none",
        "train.max_seq_length=128", "data.val_size=16", "train.sampling=random", "train.per_device_train_batch_size=4",
    ]), run_dir=tmp_path / "run")
    assert metrics["exact_match_before"] == 0.0
    assert metrics["exact_match_after"] > metrics["exact_match_before"]
    assert metrics["eval_loss"] < 3.0 and metrics["device"] == "cpu"
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert len(samples) == 8 and all(s["generated_after"] for s in samples)

    # The generate command answers with the run's template and stops at <end_of_turn>, well before the limit.
    from gemma_ft.finished_run import load_finished_run
    from gemma_ft.generate import SamplingConfig, answer

    finished = load_finished_run(tmp_path / "run")
    solved = next(s for s in samples if s["generated_after"] == s["expected"])
    messages = [{"role": "system", "content": solved["system"]}, {"role": "user", "content": solved["prompt"]}]
    reply = answer(finished, messages, SamplingConfig(max_new_tokens=20, do_sample=False), stream=False)
    assert reply == solved["expected"]
    assert len(finished.tokenizer(reply, add_special_tokens=False).input_ids) < 20
