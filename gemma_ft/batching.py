"""How each step's tokens reach the GPU: padded rows, or whole rows packed into bins of a fixed token budget, and
the gradient checkpointing that lets a step fit. The plan is chosen by measuring, not by estimating.

The rules (README "Performance"; measurements in benchmarks/results/):

* `train.batching=auto` packs on a CUDA GPU and pads on a CPU. On a GPU a padded step of 8 rows of ~430 tokens is
  bound by the host's per-step work (~0.16-0.19 s whatever it carries), so larger steps of real tokens fill it. On
  a 2-core CPU, packed bins of 4,096 tokens ran at 0.85x padded batches of 8 rows (dense attention over the whole
  bin; benchmarks/results/2026-12-04-cpu-270m-packed-vs-padded/).
* On a GPU the candidates are tried best first (`batch_candidates`): no checkpointing at the largest step, then at
  half of it, then unsloth's offloaded checkpointing from the largest step down. Training starts with the first;
  if its first step runs out of GPU memory, the model is loaded again with the next and training starts over
  (gemma_ft.pipeline.train_stepping_down), each step down logged with its reason. The first step's peak is
  measured and kept per GPU and model (`gemma_ft.memory_probe`), so later runs skip the plans known not to fit.
  The measurement is the first training step itself: a separate forward and backward pass before
  trainer.train() made unsloth reset its compiled graphs, and the next step crashed (H100, 2026-12-08). An earlier
  hand estimate of ~3.3 MB of activations per token for the 1B (54 GB at 16,384 tokens) chose the offload on an
  80 GB card where the step fits without it (2026-12-07): the offload cost 27% of the throughput there. On a CPU
  nothing is measured: padded rows, unsloth's checkpointing.
* `train.tokens_per_step` and `lora.use_gradient_checkpointing` set by the user are kept: only what is left to
  `auto`/`null` is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gemma_ft.errors import UserError

# 16k tokens a step brings the 1B to ~33% MFU on this stack; an epoch of a few thousand rows then still has ~75
# optimizer steps. (32k: see docs/performance.md.)
PACKED_TOKENS_CAP = 16384


@dataclass(frozen=True)
class BatchPlan:
    packed: bool
    tokens_per_step: int | None  # per device; packed only
    gradient_checkpointing: Any  # False | True | "unsloth", as unsloth's get_peft_model takes it

    def describe(self) -> str:
        steps = f"packed, {self.tokens_per_step} tokens per step and device" if self.packed else "padded rows"
        return f"Batches: {steps}; gradient checkpointing {self.gradient_checkpointing}"

    def key(self) -> str:
        return f"{'packed' if self.packed else 'padded'}-{self.tokens_per_step}-{self.gradient_checkpointing}"


def batch_candidates(train_cfg, checkpointing_cfg: Any, on_gpu: bool) -> list[BatchPlan]:
    """The plans worth trying, best first; on a CPU, or when the user fixed both choices, exactly one."""
    packed = train_cfg.batching == "packed" or (train_cfg.batching == "auto" and on_gpu)
    if not on_gpu:
        tokens = train_cfg.tokens_per_step or train_cfg.per_device_train_batch_size * train_cfg.max_seq_length
        checkpointing = "unsloth" if checkpointing_cfg == "auto" else checkpointing_cfg
        return [BatchPlan(packed, tokens if packed else None, checkpointing)]
    if not packed:
        modes = [False, "unsloth"] if checkpointing_cfg == "auto" else [checkpointing_cfg]
        return [BatchPlan(False, None, mode) for mode in modes]
    if train_cfg.tokens_per_step:
        sizes = [train_cfg.tokens_per_step]
    else:  # powers of two from the cap down, never below max_seq_length: a bin holds the longest row whole
        sizes, tokens = [], max(PACKED_TOKENS_CAP, train_cfg.max_seq_length)
        while tokens >= train_cfg.max_seq_length:
            sizes.append(tokens)
            tokens //= 2
        sizes = sizes or [train_cfg.max_seq_length]
    if checkpointing_cfg != "auto":
        return [BatchPlan(True, size, checkpointing_cfg) for size in sizes]
    # Checkpointing off at the two largest steps, then the offload from the largest step down: the offload
    # recomputes the forward pass (-26% on the 270M, -27% on the 1B), and a step much smaller than the cap leaves
    # the GPU waiting on the host.
    return [BatchPlan(True, size, False) for size in sizes[:2]] + [BatchPlan(True, size, "unsloth") for size in sizes]


class StepDoesNotFit(UserError):
    """Even the smallest batch plan's first step ran out of GPU memory."""


@dataclass(frozen=True)
class Measurement:
    """One measured first step (its optimizer step included): its peak reserved memory (None when it ran out of
    memory) and the card's memory less what other processes held."""

    peak_bytes: int | None
    limit_bytes: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes is not None and self.peak_bytes <= self.limit_bytes

    def why_not(self) -> str:
        if self.peak_bytes is None:
            return "its first step ran out of GPU memory"
        return (f"its first step peaked at {self.peak_bytes / 2**30:.1f} GiB, over the "
                f"{self.limit_bytes / 2**30:.1f} GiB free")


def skip_known_misfits(candidates: list[BatchPlan], known: Callable[[BatchPlan], Measurement | None]
                       ) -> tuple[list[BatchPlan], list[str]]:
    """The candidates without those whose first step an earlier run on this GPU and model measured not to fit
    (gemma_ft.memory_probe.StepMemoryCache), the last one always kept; and one line for each skipped."""
    kept, skipped = [], []
    for index, plan in enumerate(candidates):
        earlier = known(plan)
        if earlier is not None and not earlier.fits and (kept or index < len(candidates) - 1):
            skipped.append(f"{plan.key()}: skipped, measured before on this GPU: {earlier.why_not()}")
        else:
            kept.append(plan)
    return kept, skipped
