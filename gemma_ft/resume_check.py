"""What shapes training, recorded with every run, so that a resume continues the run it claims to continue.

A checkpoint holds the weights, optimizer and schedule state of one config: resumed with another learning rate,
batch or file, the Trainer would go on silently on the checkpoint's schedule and the other data, while config.yaml
and metrics.json recorded the new values.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gemma_ft.config import Config
from gemma_ft.data.conversations import Split, split_digest
from gemma_ft.errors import ConfigError
from gemma_ft.run_dir import BEFORE_RESUME, TRAINING_INPUTS

log = logging.getLogger(__name__)

SHAPING_GROUPS = ("model", "lora", "data", "optim", "train")
# Keys of those groups that change what a run reports, or how often it saves, but not what it learns.
NOT_SHAPING = frozenset({
    "data.path",  # the rows themselves are compared (DATA_DIGEST): a moved file is the same data
    "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.report_to",
    "train.exact_match_rows", "train.max_new_tokens", "train.per_device_eval_batch_size",
})
DATA_DIGEST = "data.rows_digest"  # sha256 of the training and validation rows, in order


def training_inputs(cfg: Config, split: Split) -> dict[str, Any]:
    """Every setting that shapes the trained weights, as dotted keys, and the digest of the rows."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    flat: dict[str, Any] = {}
    for group in SHAPING_GROUPS:
        _flatten(container[group], group, flat)
    inputs = {key: value for key, value in flat.items() if key not in NOT_SHAPING}
    inputs[DATA_DIGEST] = split_digest(split)
    return json.loads(json.dumps(inputs))  # as it reads back from the file: tuples are lists


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}", out)
    else:
        out[prefix] = node


def write_training_inputs(folder: Path, inputs: dict[str, Any]) -> None:
    (folder / TRAINING_INPUTS).write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# What the trainer restores from a checkpoint's optimizer and scheduler state, whatever the config says now: the
# optimizer's kind and its param groups' lr (the scheduler's base) and weight decay. The schedule's shape
# (lr_scheduler_type, warmup_steps, max_steps) is rebuilt from the config, and max_grad_norm is read at each step.
RESTORED_FROM_CHECKPOINT = ("optim.name ", "optim.lr ", "optim.weight_decay ")


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key old -> new' for every key whose value differs; the rows' digest as 'the data rows'."""
    changes = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<not set>"), current.get(key, "<not set>")
        if old == new:
            continue
        changes.append("the data rows (another file or other contents)" if key == DATA_DIGEST
                       else f"{key} {old!r} -> {new!r}")
    return changes


def check_resume_inputs(checkpoint: Path, current: dict[str, Any], resume_changed: bool) -> Path | None:
    """Refuse to resume `checkpoint` with settings that shape training differently from the run that wrote it.

    Returns the folder of that run's record when resume_changed=true let a difference through (its config is then
    kept beside the new one), else None.
    """
    source_run = checkpoint.parent.parent  # <run dir>/checkpoints/checkpoint-N
    record = source_run / TRAINING_INPUTS
    if not record.is_file():
        log.warning("Resuming %s without checking its settings: its run recorded none (%s is missing)", checkpoint,
                    TRAINING_INPUTS)
        return None
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{record} is not valid JSON; restore it, or start over with run.resume=never") from None
    changes = changed_inputs(recorded, current)
    if not changes:
        return None
    restored = [change for change in changes if change.startswith(RESTORED_FROM_CHECKPOINT)]
    if resume_changed and restored:
        raise ConfigError(
            f"run.resume: {'; '.join(restored)} cannot change on resume, even with run.resume_changed=true: the "
            "checkpoint's optimizer and learning-rate schedule are restored with the values they were made with, so "
            "the new ones would not apply; resume with the old values, or start over (run.resume=never "
            "run.overwrite=true, or another run.name)")
    if not resume_changed:
        raise ConfigError(
            f"run.resume: {checkpoint} was trained with other settings: {'; '.join(changes)}; resume with the "
            "settings it was trained with, start over (run.resume=never run.overwrite=true, or another run.name), "
            "or set run.resume_changed=true to continue it with the new ones"
        )
    log.warning("Resuming %s with changed settings (run.resume_changed=true): %s; the earlier settings are kept "
                "in %s and %s", checkpoint, "; ".join(changes), *BEFORE_RESUME.values())
    return source_run


def keep_settings_before_resume(source_run: Path, work_dir: Path) -> None:
    """Copy the resumed run's config and training inputs as *.before-resume.* into the run being written."""
    for name, kept_as in BEFORE_RESUME.items():
        if (source_run / name).is_file():
            shutil.copyfile(source_run / name, work_dir / kept_as)
