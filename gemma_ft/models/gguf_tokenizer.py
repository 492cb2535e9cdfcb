"""Build a correct Gemma 3 tokenizer from a GGUF file's metadata.

transformers turns this GGUF's vocabulary into a Unigram tokenizer, which over-splits words and, saved and
reloaded, becomes a BPE with no merges (one token per character). Gemma's tokenizer is a SentencePiece BPE whose
merge order is the rank (score) of the merged piece, so we rebuild it exactly that way:

* `sentencepiece_proto` writes the vocabulary as a SentencePiece BPE model, which the `sentencepiece` library can
  run: that is the reference the tests compare against.
* `hf_tokenizer` builds the Hugging Face (tokenizers) BPE with merges derived from the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken

# GGUF token types follow SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int

    @classmethod
    def read(cls, gguf_path: str | Path) -> "GGUFVocab":
        from gguf import GGUFReader

        return cls.from_reader(GGUFReader(str(gguf_path)))

    @classmethod
    def from_reader(cls, reader) -> "GGUFVocab":
        """From an open gguf.GGUFReader (reading a GGUF's fields takes ~20 s of Python: read each file once)."""
        fields = reader.fields

        def value(key: str):
            return fields[key].contents()

        tokens = [spm_piece(t) for t in value("tokenizer.ggml.tokens")]
        types = [int(t) for t in value("tokenizer.ggml.token_type")]
        unk_id = int(value("tokenizer.ggml.unknown_token_id"))
        types[unk_id] = UNKNOWN
        return cls(
            tokens=tokens,
            scores=[float(s) for s in value("tokenizer.ggml.scores")],
            types=types,
            bos_id=int(value("tokenizer.ggml.bos_token_id")),
            eos_id=int(value("tokenizer.ggml.eos_token_id")),
            unk_id=unk_id,
            pad_id=int(value("tokenizer.ggml.padding_token_id")),
        )


def spm_piece(token: str) -> str:
    # llama.cpp's converter stores whitespace-only pieces with real spaces; SentencePiece spells them with "▁".
    return "▁" * len(token) if token and not token.strip(" ") else token


def sentencepiece_proto(vocab: GGUFVocab) -> bytes:
    """The vocabulary as a serialised SentencePiece BPE ModelProto (Gemma's normaliser settings)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(vocab.tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def hf_tokenizer(vocab: GGUFVocab):
    """A transformers GemmaTokenizer: BPE whose merges are ranked by the GGUF scores, special tokens marked."""
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    ids = {piece: i for i, piece in enumerate(vocab.tokens)}
    mergeable = {p: s for p, s, k in zip(vocab.tokens, vocab.scores, vocab.types) if k == NORMAL}
    not_mergeable = [p for p, k in zip(vocab.tokens, vocab.types) if k != NORMAL]
    merges = generate_merges(ids, mergeable, skip_tokens=not_mergeable)
    tokenizer = GemmaTokenizer(
        vocab=ids,
        merges=merges,
        unk_token=vocab.tokens[vocab.unk_id],
        bos_token=vocab.tokens[vocab.bos_id],
        eos_token=vocab.tokens[vocab.eos_id],
        pad_token=vocab.tokens[vocab.pad_id],
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
    )
    # Control pieces (<start_of_turn>, <end_of_turn>, ...) are special tokens; user-defined ones ("\n\n", ...)
    # are matched whole but are ordinary text, as in SentencePiece.
    # User-defined pieces are matched after normalisation, so that a run of spaces finds its "▁▁" piece.
    added = [
        AddedToken(p, special=k != USER_DEFINED, normalized=k == USER_DEFINED)
        for p, k in zip(vocab.tokens, vocab.types)
        if k in (CONTROL, UNKNOWN, USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    return tokenizer
