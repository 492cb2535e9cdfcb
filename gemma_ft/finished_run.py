"""A finished run as something to use: its config, its base model with the adapter, its tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gemma_ft.config import Config, register_configs
from gemma_ft.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class FinishedRun:
    run_dir: Path
    cfg: Config
    model: Any
    tokenizer: Any


def run_config(run_dir: Path) -> Config:
    """The typed config a run trained with (the runner saved it as config.yaml)."""
    from gemma_ft.commands import finished_run_problem
    from gemma_ft.run_dir import RUN_CONFIG

    problem = finished_run_problem(run_dir)
    if problem:
        raise ConfigError(problem)
    saved = run_dir / RUN_CONFIG
    register_configs()
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved)))


def load_finished_run(run_dir: str | Path, merged: bool = False) -> FinishedRun:
    """Base model + adapter (a PeftModel), or with merged=True the adapter folded into the weights."""
    from gemma_ft.compile_cache import import_unsloth_with_persistent_compile_cache
    from gemma_ft.console import quiet_libraries, quiet_library_progress

    quiet_libraries(verbose=False)
    import_unsloth_with_persistent_compile_cache()  # before transformers and peft: it patches them
    quiet_library_progress(verbose=False)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_ft.models.loading import resolve_model_path

    run_dir = Path(run_dir).expanduser().resolve()
    cfg = run_config(run_dir)
    base_path = resolve_model_path(cfg.model.name_or_path)
    log.info("Loading %s with the adapter of %s ...", base_path, run_dir)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    if merged:
        model = model.merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    # The adapter folder holds the tokenizer with the Gemma 3 chat template the run trained with.
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    return FinishedRun(run_dir, cfg, model, tokenizer)
