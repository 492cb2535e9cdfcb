"""A merged Gemma 3 model -> one GGUF file for llama.cpp and Ollama, written with the `gguf` package llama.cpp
publishes, laid out as llama.cpp's own Gemma 3 converter lays it out (`convert_hf_to_gguf.py`, Gemma3Model):

- the text architecture's keys (context length, sizes, heads, rope base and scaling, sliding window, norm epsilon);
- every RMSNorm weight stored as 1 + w (Gemma computes x * (1 + w); llama.cpp's kernel computes x * w), in float32;
- the output head only when it differs from the embedding (a trained head); a tied one is re-tied on load;
- the Gemma 3 vocabulary with SentencePiece scores and token types (all Gemma 3 sizes share one vocabulary: it is
  taken from the embedded 270M's GGUF, as llama.cpp's converter stored it, after checking the run's tokenizer has exactly those tokens), BOS/EOS/EOT/pad
  ids and the run's chat template.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma_ft.chat_template import END_OF_TURN
from gemma_ft.errors import UserError

# name -> (GGML type of the matrices, llama.cpp's general.file_type)
GGUF_TYPES = {"bf16": ("BF16", 32), "f16": ("F16", 1), "q8_0": ("Q8_0", 7)}
# Ollama's Gemma 3 template, with the system prompt folded into the first user turn as Gemma 3's own template does.
OLLAMA_TEMPLATE = """{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def text_weights(model) -> dict[str, object]:
    """The language model's tensors under Gemma3ForCausalLM's names (a multimodal model's vision tower left out)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            continue
        weights[name.replace("model.language_model.", "model.")] = tensor
    return weights


def check_exportable(config) -> None:
    """llama.cpp's Gemma 3 scales attention by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 27B); another
    query_pre_attn_scalar would give another model there."""
    scalars = {config.head_dim, config.hidden_size // config.num_attention_heads}
    if config.query_pre_attn_scalar not in scalars:
        raise UserError(f"this model's query_pre_attn_scalar={config.query_pre_attn_scalar} is neither head_dim "
                        f"({config.head_dim}) nor hidden_size/heads, as llama.cpp's Gemma 3 assumes; it cannot be "
                        "exported to GGUF (export format=merged instead)")


def attention_pattern_warning(config) -> str | None:
    """llama.cpp (and transformers' GGUF loader) give Gemma 3 a global layer every sixth layer; a model with another
    pattern reads back the same only for prompts within its sliding window."""
    standard = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", standard)) != standard:
        return (f"this model's global-attention layers differ from Gemma 3's every sixth layer, which GGUF readers "
                f"assume: beyond {config.sliding_window} tokens of context its replies will differ there")
    return None


def rope_settings(config) -> tuple[float, str | None, float | None]:
    """(base frequency of the global layers, scaling type, factor): transformers 5 keeps them per layer type."""
    parameters = getattr(config, "rope_parameters", None) or {}
    full = parameters.get("full_attention", parameters)
    theta = full.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = full.get("rope_type")
    return float(theta), (kind if kind not in (None, "default") else None), full.get("factor")


def gguf_vocab_for(tokenizer) -> dict:
    """Gemma 3's vocabulary as GGUF stores it, after checking the tokenizer has exactly these tokens."""
    import json

    from gemma_ft.models.builtin import resolve_builtin
    from gemma_ft.models.gguf_tokenizer import spm_piece

    vocab = json.loads((resolve_builtin("builtin:gemma3-vocab") / "vocab.json").read_text(encoding="utf-8"))
    ids = tokenizer.convert_tokens_to_ids([spm_piece(token) for token in vocab["tokens"]])
    mismatched = sum(token_id != i for i, token_id in enumerate(ids))
    if mismatched or len(tokenizer) != len(vocab["tokens"]):
        raise UserError(f"the run's tokenizer is not Gemma 3's ({len(tokenizer)} tokens, {mismatched} placed "
                        "differently); GGUF export writes Gemma 3's vocabulary and needs its tokenizer")
    return vocab


def write_gguf(model, tokenizer, target: Path, type_name: str, name: str) -> Path:
    """Write the model as `target` (through a temporary file renamed at the end: never half-written)."""
    import gguf
    import numpy as np
    import torch

    config = model.config.get_text_config()
    check_exportable(config)
    vocab = gguf_vocab_for(tokenizer)
    qtype_name, file_type = GGUF_TYPES[type_name]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    partial = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    theta, scaling, factor = rope_settings(config)
    writer.add_rope_freq_base(theta)
    if scaling == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos_id"])
    writer.add_eos_token_id(vocab["eos_id"])
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    writer.add_unk_token_id(vocab["unk_id"])
    writer.add_pad_token_id(vocab["pad_id"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    weights = text_weights(model)
    head, embedding = weights.get("lm_head.weight"), weights["model.embed_tokens.weight"]
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight" and (head is None or torch.equal(head, embedding)):
            continue  # tied: llama.cpp and transformers use the embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export does not know the tensor {hf_name!r}; export format=merged instead")
        data = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith("norm.weight"):
            data = data + 1
        array = data.numpy()
        if array.ndim == 1 or (qtype_name == "Q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]):
            # norms stay float32 as llama.cpp keeps them; a row that does not divide into Q8_0 blocks goes f16
            kind = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else gguf.GGMLQuantizationType.F16
        else:
            kind = qtype
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:  # bf16 and q8_0 are bytes whose logical shape the writer derives from the type
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, target)
    return target


def ollama_modelfile(gguf_file: Path, system_prompt: str | None, sampling) -> str:
    """An Ollama Modelfile for the GGUF beside it: its template, stop token, sampling defaults and system prompt."""
    lines = [f"FROM ./{gguf_file.name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', f'PARAMETER stop "{END_OF_TURN}"',
             f"PARAMETER temperature {sampling.temperature}", f"PARAMETER top_p {sampling.top_p}",
             f"PARAMETER top_k {sampling.top_k}"]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"
