"""How each step's tokens reach the GPU: padded rows, or whole rows packed into bins of a fixed token budget, and
the gradient checkpointing that lets a step fit. The plan is chosen by measuring, not by estimating.

The rules (README "Performance"; measurements in benchmarks/results/):

* `train.batching=auto` packs on a CUDA GPU and pads on a CPU. On a GPU a padded step of 8 rows of ~430 tokens is
  bound by the host's per-step work (~0.16-0.19 s whatever it carries), so larger steps of real tokens fill it. On
  a 2-core CPU, packed bins of 4,096 tokens ran at 0.85x padded batches of 8 rows (dense attention over the whole
  bin; benchmarks/results/2026-12-04-cpu-270m-packed-vs-padded/).
* On a GPU the candidates are tried best first (`batch_candidates`): no checkpointing at the largest step, then at
  half of it, then unsloth's offloaded checkpointing from the largest step down. Each candidate is measured by one
  forward and backward pass at its exact shape (`gemma_ft.memory_probe`); the first whose measured peak plus the
  optimizer's state fits the card is kept, and every step down is logged with its reason. An earlier hand
  estimate of ~3.3 MB of activations per token for the 1B (54 GB at 16,384 tokens) chose the offload on an 80 GB
  card where the measured peak without checkpointing was 27.9 GiB (2026-12-07): the offload cost 27% of the
  throughput there. On a CPU nothing is measured: padded rows, unsloth's checkpointing.
* `train.tokens_per_step` and `lora.use_gradient_checkpointing` set by the user are kept: only what is left to
  `auto`/`null` is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from gemma_ft.errors import UserError

# 16k tokens a step brings the 1B to ~33% MFU on this stack; an epoch of a few thousand rows then still has ~75
# optimizer steps. (32k: see docs/performance.md.)
PACKED_TOKENS_CAP = 16384
# The share of the card's memory a step may take, measured peak plus the optimizer state it has not allocated yet:
# the rest absorbs the allocator's fragmentation over a run and evaluation's different shapes.
MEMORY_SHARE = 0.9
# AdamW keeps two float32 moments per trainable parameter (8-bit optimizers keep less: this is the upper bound).
OPTIMIZER_BYTES_PER_PARAMETER = 8


@dataclass(frozen=True)
class BatchPlan:
    packed: bool
    tokens_per_step: int | None  # per device; packed only
    gradient_checkpointing: Any  # False | True | "unsloth", as unsloth's get_peft_model takes it
    measured_peak_bytes: int | None = None  # the calibration step's peak (GPU only)

    def describe(self) -> str:
        steps = f"packed, {self.tokens_per_step} tokens per step and device" if self.packed else "padded rows"
        measured = "" if self.measured_peak_bytes is None else \
            f"; one step measured at {self.measured_peak_bytes / 2**30:.1f} GiB peak"
        return f"Batches: {steps}; gradient checkpointing {self.gradient_checkpointing}{measured}"

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
    """Even the smallest batch plan ran out of GPU memory in its calibration step."""


@dataclass(frozen=True)
class Measurement:
    """One calibration step: its peak (None when it ran out of memory) and what the card allows for it."""

    peak_bytes: int | None
    limit_bytes: int  # MEMORY_SHARE of the card, less what other processes hold
    optimizer_bytes: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes is not None and self.peak_bytes + self.optimizer_bytes <= self.limit_bytes

    def why_not(self) -> str:
        if self.peak_bytes is None:
            return "one step ran out of GPU memory"
        return (f"one step peaked at {self.peak_bytes / 2**30:.1f} GiB, plus {self.optimizer_bytes / 2**30:.1f} GiB "
                f"of optimizer state, over the {self.limit_bytes / 2**30:.1f} GiB this GPU allows")


def choose_batch_plan(candidates: Iterable[BatchPlan], measure: Callable[[BatchPlan], Measurement],
                      known: Callable[[BatchPlan], Measurement | None] = lambda plan: None,
                      say: Callable[[str], None] = print) -> tuple[BatchPlan, list[str]]:
    """The first candidate whose measured step fits, and the step-downs on the way (one line each).

    `known` answers from earlier runs on this card and model (gemma_ft.memory_probe.StepMemoryCache) without a
    step; a candidate it knows does not fit is skipped. The chosen one is always measured here: another process may
    hold memory now. The last candidate is taken if its step ran at all, even above MEMORY_SHARE (a run whose
    choices the user fixed is not refused for a margin); if it ran out of memory the run ends with StepDoesNotFit.
    """
    candidates = list(candidates)
    steps_down = []
    for index, plan in enumerate(candidates):
        last = index == len(candidates) - 1
        earlier = known(plan)
        if earlier is not None and not earlier.fits and not last:
            steps_down.append(f"{plan.key()}: skipped, measured before on this GPU: {earlier.why_not()}")
            say(f"Batch plan {steps_down[-1]}")
            continue
        measurement = measure(plan)
        if measurement.fits or (last and measurement.peak_bytes is not None):
            return replace(plan, measured_peak_bytes=measurement.peak_bytes), steps_down
        if last:
            raise StepDoesNotFit(
                f"no batch plan fits this GPU: the smallest, {plan.key()} ({plan.describe()}), ran out of memory; "
                "lower train.tokens_per_step or train.max_seq_length, set lora.use_gradient_checkpointing=unsloth, "
                "or load the model in 4-bit (model.load_in_4bit=true)")
        steps_down.append(f"{plan.key()}: {measurement.why_not()}; stepping down")
        say(f"Batch plan {steps_down[-1]}")
    raise ValueError("no batch plan candidates")
