"""The run measures its own speed, as torchtune's and litgpt's recipes do: trained tokens per second, MFU, the step
shapes it trained and what compiled after the first step. metrics.json and the sweep summary carry them.

Tokens are the real ones (a padded batch's attention mask, a packed bin's tokens that are not its filler), counted on
the GPU without waiting for it; the clock starts at the end of the first optimizer step (which compiles) and stops
at the end of the last one, the GPU synchronised at both ends. Evaluations and checkpoints between them count.
MFU counts 4 N FLOPs per token for LoRA (forward 2N, backward through the frozen weights 2N; the adapters' own are
negligible) plus attention (12 x layers x heads x head_dim x the mean context a token attends to), against the bf16
matrix-multiply peak measured once on this GPU (an 8192^3 product, cached beside the compile cache).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class SpeedMonitor(TrainerCallback):
    """Counts the tokens of every training batch (`count`, called by the trainer) and times the optimizer steps."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.step_shapes: set[tuple] = set()
        self._tokens_first = 0
        self._tokens_after_first = 0
        self._first_step_end: float | None = None
        self._end: float | None = None
        self._graphs_after_first: int | None = None
        self.steps_after_first = 0
        self.first_step_peak_gib: float | None = None  # GPU memory reserved by the end of the first step

    def count(self, inputs) -> None:
        ids = inputs["input_ids"]
        self.step_shapes.add(tuple(ids.shape))
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else (ids != self.pad_token_id).sum()  # stays on the device
        if self._first_step_end is None:
            self._tokens_first = self._tokens_first + tokens
        else:
            self._tokens_after_first = self._tokens_after_first + tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self._first_step_end is None:
            _synchronize()
            self._first_step_end = time.perf_counter()
            self._graphs_after_first = compiled_graphs()
            self.first_step_peak_gib = _peak_reserved_gib()
        else:
            self.steps_after_first += 1
            if state.global_step >= state.max_steps:  # before the final evaluation and save
                _synchronize()
                self._end = time.perf_counter()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._end is None:  # stopped early (a signal, a diverged step): the last step has ended by now
            _synchronize()
            self._end = time.perf_counter()
        return control

    def report(self, text_config, n_params: int, mean_row_tokens: float) -> dict:
        """tokens_per_s and mfu (None when fewer than two steps ran here), step shapes, graphs compiled after the
        first step; mfu only on a CUDA GPU."""
        tokens = int(self._tokens_after_first)
        seconds = (self._end - self._first_step_end) if self._end and self._first_step_end else 0.0
        tokens_per_s = tokens / seconds if tokens and seconds > 0 else None
        peak = bf16_peak_flops()
        mfu = None
        if tokens_per_s and peak:
            mfu = tokens_per_s * flops_per_token(text_config, n_params, mean_row_tokens) / peak
        graphs_now = compiled_graphs()
        return {
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "bf16_peak_tflops": peak / 1e12 if peak else None,
            "timed_steps": self.steps_after_first,
            "timed_tokens": tokens,
            "step_shapes": len(self.step_shapes),
            "graphs_compiled_after_first_step": (graphs_now - self._graphs_after_first
                                                 if self._graphs_after_first is not None else None),
        }


def flops_per_token(text_config, n_params: int, mean_row_tokens: float) -> float:
    """Training FLOPs per token of a LoRA step (see the module's docstring); the attention's context is a row's,
    packed or not, and a sliding-window layer's is at most its window."""
    c = text_config
    layers = c.num_hidden_layers
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * layers
    window = getattr(c, "sliding_window", None) or mean_row_tokens
    context = sum(mean_row_tokens / 2 if kind == "full_attention" else min(mean_row_tokens / 2, window)
                  for kind in layer_types) / len(layer_types)
    return 4 * n_params + 12 * layers * c.num_attention_heads * c.head_dim * context


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _peak_reserved_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bf16_peak_flops(cache: Path | None = None) -> float | None:
    """This GPU's measured bf16 matrix-multiply rate (FLOP/s), measured once per GPU model; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from gemma_ft.models.builtin import cache_dir
    from gemma_ft.run_dir import atomic_write_text

    cache = cache or cache_dir() / "compile" / "gpu_bf16_peak.json"
    name = torch.cuda.get_device_name(0)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if name in known:
        return float(known[name])
    peak = measure_matmul_flops()
    known[name] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, indent=1) + "\n")
    except OSError as exc:
        log.debug("could not cache the GPU's bf16 peak in %s: %s", cache, exc)
    return peak


def measure_matmul_flops(size: int = 8192, repeats: int = 10) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 * repeats / seconds
