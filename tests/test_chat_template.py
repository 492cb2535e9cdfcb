"""The Gemma 3 chat template is set, renders as Gemma 3, and a tokenizer without it is refused clearly."""

from __future__ import annotations

import pytest

from gemma_ft.chat_template import render_text, verify_gemma3_template
from gemma_ft.errors import TemplateError


def test_renders_gemma3_turns(gemma_tokenizer):
    text = gemma_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert text == "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"


def test_training_text_has_one_bos(gemma_tokenizer):
    text = render_text(gemma_tokenizer, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert not text.startswith("<bos>")
    ids = gemma_tokenizer(text).input_ids
    assert ids[0] == gemma_tokenizer.bos_token_id and ids[1] != gemma_tokenizer.bos_token_id


def test_turn_markers_are_single_tokens(gemma_tokenizer):
    assert gemma_tokenizer.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert gemma_tokenizer.encode("<end_of_turn>", add_special_tokens=False) == [106]


def test_generation_prompt_opens_a_model_turn(gemma_tokenizer):
    text = render_text(gemma_tokenizer, [{"role": "user", "content": "Q"}], add_generation_prompt=True)
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_tokenizer_without_template_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bare.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        verify_gemma3_template(bare)


def test_wrong_template_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    other.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    with pytest.raises(TemplateError, match="not a Gemma 3"):
        verify_gemma3_template(other)
