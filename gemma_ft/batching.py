"""How each step's tokens reach the GPU: padded rows, or whole rows packed into bins of a fixed token budget.

The rules (README "Performance"; measurements in benchmarks/results/2026-12-04-h200-1b-packed-epoch/):

* `train.batching=auto` packs on a CUDA GPU and pads on a CPU. On a GPU a padded step of 8 rows of ~430 tokens is
  bound by the host's per-step work (~0.16-0.19 s whatever it carries), so larger steps of real tokens fill it. On
  a 2-core CPU, packed bins of 4,096 tokens ran at 0.85x padded batches of 8 rows (dense attention over the whole
  bin; benchmarks/results/2026-12-04-cpu-270m-packed-vs-padded/).
* `train.tokens_per_step=null` picks the largest power of two up to PACKED_TOKENS_CAP whose activations fit in
  MEMORY_SHARE of the GPU memory left free once the model is loaded, and at least `train.max_seq_length` (a bin
  must hold the longest row whole). On a CPU it is `per_device_train_batch_size x max_seq_length`.
* `lora.use_gradient_checkpointing=auto` turns checkpointing off when those activations fit without it (it costs
  a recomputed forward pass, and unsloth's offload pins host memory), else uses unsloth's offloaded one. On a CPU
  it keeps unsloth's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# 16k tokens a step already brings the 1B to the measured ~27% MFU of this stack; beyond it an epoch of a few
# thousand rows has few optimizer steps left for little more speed.
PACKED_TOKENS_CAP = 16384
# The share of free GPU memory the activations may take: the rest is for the optimizer state, the allocator's
# fragmentation and the loss's chunks.
MEMORY_SHARE = 0.6
BYTES_BF16 = 2


@dataclass(frozen=True)
class BatchPlan:
    packed: bool
    tokens_per_step: int | None  # per device; packed only
    gradient_checkpointing: Any  # False | True | "unsloth", as unsloth's get_peft_model takes it

    def describe(self) -> str:
        steps = f"packed, {self.tokens_per_step} tokens per step and device" if self.packed else "padded rows"
        return f"Batches: {steps}; gradient checkpointing {self.gradient_checkpointing}"


def activation_bytes_per_token(text_config, checkpointing: bool) -> int:
    """What one token's activations keep on the GPU for the backward pass (bf16), an upper estimate.

    Per decoder layer: the residual stream and norm inputs (~8 x hidden), the attention's query, key, value and
    output (2 x query width + 4 x key/value width), the MLP's gate, up, activation and product (~6 x intermediate).
    With unsloth's offloaded checkpointing only one layer's are live at a time. Plus a bf16 row of logits.
    """
    c = text_config
    query = c.num_attention_heads * c.head_dim
    key_value = c.num_key_value_heads * c.head_dim
    per_layer = (8 * c.hidden_size + 2 * query + 4 * key_value + 6 * c.intermediate_size) * BYTES_BF16
    layers = 1 if checkpointing else c.num_hidden_layers
    return per_layer * layers + c.vocab_size * BYTES_BF16


def plan_batching(train_cfg, checkpointing_cfg: Any, text_config, free_gpu_bytes: int | None) -> BatchPlan:
    """The batching for this run; `free_gpu_bytes` is None on a machine without a CUDA GPU."""
    on_gpu = free_gpu_bytes is not None
    packed = train_cfg.batching == "packed" or (train_cfg.batching == "auto" and on_gpu)
    if not on_gpu:
        tokens = train_cfg.tokens_per_step or train_cfg.per_device_train_batch_size * train_cfg.max_seq_length
        checkpointing = "unsloth" if checkpointing_cfg == "auto" else checkpointing_cfg
        return BatchPlan(packed, tokens if packed else None, checkpointing)

    budget = MEMORY_SHARE * free_gpu_bytes
    if packed:
        tokens = train_cfg.tokens_per_step or _fitting_tokens(train_cfg.max_seq_length, text_config, budget)
    else:
        tokens = train_cfg.per_device_train_batch_size * train_cfg.max_seq_length
    checkpointing = checkpointing_cfg
    if checkpointing_cfg == "auto":
        fits = tokens * activation_bytes_per_token(text_config, checkpointing=False) <= budget
        checkpointing = False if fits else "unsloth"
    return BatchPlan(packed, tokens if packed else None, checkpointing)


def _fitting_tokens(max_seq_length: int, text_config, budget: float) -> int:
    """The largest power of two <= PACKED_TOKENS_CAP whose activations fit `budget`, with offloaded checkpointing if
    they must (larger steps are worth the recomputation: small ones leave the GPU waiting on the host), and never
    less than max_seq_length."""
    tokens = PACKED_TOKENS_CAP
    while tokens >= max_seq_length:
        if tokens * activation_bytes_per_token(text_config, checkpointing=True) <= budget:
            return tokens
        tokens //= 2
    return max_seq_length
