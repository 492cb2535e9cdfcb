"""One training step at a batch plan's exact shape, measured on the GPU: what gemma_ft.batching chooses from.

The step runs the trainer's own loss (the same compiled graphs and fused LM head as training, so on a cold machine
its compilation is the first training step's, not an extra one), then backward, and leaves no trace: gradients
cleared, random number generators and the trainer's logged metrics restored, nothing applied to the weights.
Measurements are kept per GPU, model and LoRA in <GEMMA_FT_CACHE>/compile/step_memory.json, so a later run skips the
candidates known not to fit without loading the model again.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
from pathlib import Path

from gemma_ft.batching import MEMORY_SHARE, OPTIMIZER_BYTES_PER_PARAMETER, BatchPlan, Measurement

log = logging.getLogger(__name__)


def measure_step(trainer, plan: BatchPlan) -> Measurement:
    """One forward and backward pass of `trainer` on its largest batch, on the GPU; its peak reserved memory (None
    when it ran out of memory) against what the card allows."""
    import torch

    model = trainer.model
    batch = trainer._prepare_inputs(largest_batch(trainer, plan))
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    total_tokens = getattr(trainer, "_total_train_tokens", None)
    was_training = model.training
    peak = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        del loss
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved()
    except torch.OutOfMemoryError:
        peak = None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
        if metrics is not None:
            trainer._metrics = metrics
        if total_tokens is not None:
            trainer._total_train_tokens = total_tokens
        del batch
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    free, total = torch.cuda.mem_get_info()
    held_by_others = max(0, total - free - torch.cuda.memory_reserved())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Measurement(peak, int(MEMORY_SHARE * total) - held_by_others, OPTIMIZER_BYTES_PER_PARAMETER * trainable)


def agree_across_ranks(measurement: Measurement) -> Measurement:
    """With several GPUs every rank measured its own step: the plan must fit on each, so take the largest peak
    (None if any rank ran out of memory) and the smallest limit."""
    from gemma_ft.distributed import gather_from_ranks, world_size

    if world_size() <= 1:
        return measurement
    everyone = gather_from_ranks([measurement.peak_bytes, measurement.limit_bytes, measurement.optimizer_bytes])
    peaks = [peak for peak, _, _ in everyone]
    return Measurement(None if None in peaks else max(peaks), min(limit for _, limit, _ in everyone),
                       max(optimizer for _, _, optimizer in everyone))


def largest_batch(trainer, plan: BatchPlan) -> dict:
    """A training batch of the plan's largest shape: any packed bin (all have the same shape), or the longest rows
    of a padded batch."""
    dataset = trainer.train_dataset
    if plan.packed:
        return trainer.data_collator([dataset[0]])
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[: trainer.args.per_device_train_batch_size]
    return trainer.data_collator([dataset[i] for i in longest])


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
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1) + "\n")
            os.replace(tmp, self.path)
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
