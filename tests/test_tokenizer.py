"""The tokenizer built from the GGUF equals SentencePiece's BPE on the same vocabulary (an independent
implementation), and keeps Gemma 3's special tokens whole."""

from __future__ import annotations

import pytest

REFERENCE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces\n\nnewlines\ttab   ",
    "Café naïve façade déjà vu — «quotes»",
    "日本語のテキスト、中文文本，한국어",
    "emoji 😀🎉👍🏽 and symbols ∑∫√",
    "e2e4 Nf3 O-O-O exd5 Qxh7+ 1-0",
    "1234567 3.14159 -42 1e-5",
    "def f(x):\n    return x**2\n",
    "\u00a0nbsp \u200b zwsp",
    "Über straße ÀÉÎÕÜ",
    "mixed\r\nline endings\r\n",
    "a" * 50,
]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "sentencepiece.model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("text", REFERENCE_TEXTS)
def test_matches_sentencepiece_reference(tokenizer, reference, text):
    assert tokenizer(text, add_special_tokens=False).input_ids == reference.encode(text)


def test_words_are_not_split_into_characters(tokenizer):
    # The bug this tokenizer fixes: a zero-merge BPE gives one token per character.
    assert len(tokenizer("The quick brown fox", add_special_tokens=False).input_ids) == 4


def test_known_gemma3_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    assert ids == [0, 1, 2, 105, 106]
    assert tokenizer("user", add_special_tokens=False).input_ids == [2364]
    assert tokenizer("model", add_special_tokens=False).input_ids == [4368]


def test_adds_one_bos_and_decodes_back(tokenizer):
    text = "Café 😀 e2e4"
    ids = tokenizer(text).input_ids
    assert ids[0] == 2 and ids[1] != 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_stay_whole(tokenizer):
    ids = tokenizer("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False).input_ids
    assert ids == [105, 2364, 107, 2202, 106, 107]
