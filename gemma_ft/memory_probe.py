"""The first training step of a batch plan, measured on the GPU: what gemma_ft.batching chooses from next time.

Measurements (peak reserved memory, or out of memory) are kept per GPU, model and LoRA in
<GEMMA_FT_CACHE>/compile/step_memory.json, so a later run skips the plans known not to fit without loading the model
for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from gemma_ft.batching import BatchPlan, Measurement
from gemma_ft.run_dir import atomic_write_text

log = logging.getLogger(__name__)


class FirstStepMemory(TrainerCallback):
    """At the end of the first training step: the GPU's peak reserved memory for this plan, into the cache."""

    def __init__(self, plan: BatchPlan, cache: "StepMemoryCache"):
        self.plan, self.cache, self.done = plan, cache, False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            self.cache.put(self.plan, measured_now())
        return control


def measured_now() -> Measurement:
    """This process's peak reserved GPU memory so far, against the card less what other processes hold."""
    import torch

    free, total = torch.cuda.mem_get_info()
    held_by_others = max(0, total - free - torch.cuda.memory_reserved())
    return Measurement(torch.cuda.max_memory_reserved(), total - held_by_others)


class StepMemoryCache:
    """Earlier calibration steps on this GPU for this model and LoRA: plan key -> Measurement."""

    def __init__(self, path: Path, scope: dict):
        self.path = path
        self.scope = hashlib.sha256(json.dumps(scope, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _entries(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, plan: BatchPlan) -> Measurement | None:
        entry = self._entries().get(self.scope, {}).get(plan.key())
        return None if entry is None else Measurement(**entry)

    def put(self, plan: BatchPlan, measurement: Measurement) -> None:
        entries = self._entries()
        entries.setdefault(self.scope, {})[plan.key()] = measurement.__dict__
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(entries, indent=1) + "\n")
        except OSError as exc:  # a read-only cache only costs the next run its calibration steps
            log.debug("could not record the step's memory in %s: %s", self.path, exc)


def step_memory_scope(model_path: str, model_cfg, lora_cfg, max_seq_length: int) -> dict:
    """What a step's memory depends on besides the plan: the GPU, the model's architecture and how it is loaded,
    the LoRA, and the library versions."""
    import torch
    import transformers

    text = _read_config(model_path)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_bytes": torch.cuda.get_device_properties(0).total_memory,
            "architecture": text, "load_in_4bit": model_cfg.load_in_4bit, "dtype": model_cfg.dtype,
            "full_finetuning": model_cfg.full_finetuning, "lora": repr(lora_cfg), "max_seq_length": max_seq_length,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _read_config(model_path: str) -> dict:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {"path": model_path}
    config.pop("_name_or_path", None)
    return config
