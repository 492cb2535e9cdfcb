"""Export a finished run: `python -m gemma_ft.export run=outputs/<run> [format=merged|gguf]`.

- merged: <run>/merged, the adapter folded into 16-bit weights, with the tokenizer and its chat template, loadable
  by plain transformers (no peft), whose generation config stops at <eos> and <end_of_turn>;
- gguf: <run>/gguf/<name>-<type>.gguf for llama.cpp and Ollama (gemma_ft.gguf_export), with an Ollama Modelfile.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.commands import guard_command
from gemma_ft.errors import UserError, fail

PROGRAM = "gemma_ft.export"
# Written into every folder an export creates: only a folder holding it may ever be replaced (with overwrite=true).
EXPORT_MARKER = ".gemma_ft_export"
FORMATS = ("merged", "gguf")
MERGED_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class GGUFConfig:
    type: str = "q8_0"  # bf16 | f16 | q8_0


@dataclass
class ExportConfig:
    run: str = MISSING
    format: str = "merged"  # merged | gguf
    output: Optional[str] = None  # folder inside the run directory (or an absolute path); null: "merged" or "gguf"
    dtype: str = "bfloat16"  # merged: bfloat16 | float16 | float32
    gguf: GGUFConfig = field(default_factory=lambda: GGUFConfig())
    overwrite: bool = False  # replace this command's own earlier export in the same folder


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def merged_model(run):
    """The run's model with its adapter folded in; a trained output head kept apart from the input embedding."""
    model = run.model
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.weight.data_ptr():
        # A trained output head no longer equals the input embedding: keep both, or reloading re-ties them.
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "text_config"):
            model.config.text_config.tie_word_embeddings = False
    return model


def export_merged(run_dir: str | Path, output: str | None = None, dtype: str = "bfloat16") -> Path:
    import torch

    from gemma_ft.finished_run import load_finished_run
    from gemma_ft.replies import stop_token_ids

    run = load_finished_run(run_dir, merged=True)
    target = export_target(run.run_dir, output, "merged")
    model = merged_model(run).to(getattr(torch, dtype))
    # <eos> and <end_of_turn>, as Google's Gemma 3 instruct configs list them: plain transformers, vLLM and others
    # then stop at the end of the reply.
    model.generation_config.eos_token_id = stop_token_ids(run.tokenizer)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    run.tokenizer.save_pretrained(str(staging))
    (staging / EXPORT_MARKER).write_text("merged\n")
    if target.exists():  # only an earlier export of ours gets here (export_problems), and only with overwrite=true
        shutil.rmtree(target)
    staging.rename(target)
    print(f"Merged {dtype} model written to {target}")
    return target


def export_gguf(run_dir: str | Path, output: str | None = None, gguf_type: str = "q8_0") -> Path:
    """<output>/<name>-<type>.gguf and an Ollama Modelfile beside it; returns the GGUF file."""
    from gemma_ft.finished_run import load_finished_run
    from gemma_ft.gguf_export import attention_pattern_warning, ollama_modelfile, write_gguf
    from gemma_ft.generate import SamplingConfig

    run = load_finished_run(run_dir, merged=True)
    folder = export_target(run.run_dir, output, "gguf")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXPORT_MARKER).write_text("gguf\n")
    name = run.run_dir.name
    warning = attention_pattern_warning(run.model.config.get_text_config())
    if warning:
        print(f"Warning: {warning}")
    target = write_gguf(merged_model(run), run.tokenizer, folder / f"{name}-{gguf_type}.gguf", gguf_type, name)
    modelfile = folder / "Modelfile"
    modelfile.write_text(ollama_modelfile(target, run.cfg.data.system_prompt, SamplingConfig()), encoding="utf-8")
    print(f"GGUF ({gguf_type}) written to {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    print(f"Ollama: ollama create {name} -f {modelfile}")
    print(f"llama.cpp: llama-cli -m {target} -cnv")
    return target


def export(cfg: ExportConfig) -> Path:
    problem = target_problem(cfg)
    if problem:
        raise UserError(problem)
    if cfg.format == "merged":
        return export_merged(cfg.run, cfg.output, cfg.dtype)
    return export_gguf(cfg.run, cfg.output, cfg.gguf.type)


def export_target(run_dir: Path, output: str | None, default: str) -> Path:
    """The export's folder: `output` inside the run dir, or an absolute path (or one starting with ~)."""
    target = Path(output or default).expanduser()
    return (target if target.is_absolute() else run_dir / target).resolve()


def target_problem(cfg: ExportConfig) -> str | None:
    """Why the export may not write where it is told to: it never deletes or replaces what it did not create."""
    from gemma_ft.run_dir import run_owning

    run_dir = Path(cfg.run).expanduser().resolve()
    target = export_target(run_dir, cfg.output, cfg.format)
    key = f"output={cfg.output}" if cfg.output else f"the default output {target}"
    for protected in (run_dir / "adapter", run_dir / "checkpoints"):
        if target == protected or protected in target.parents:
            return f"{key} is inside the run's {protected.name}/, which the export must not touch; choose a new folder"
    if target == run_dir or target in run_dir.parents:
        return f"{key} would hold the run directory itself; choose a new folder such as output=merged"
    other_run = run_owning(target)
    if other_run is not None:
        return f"{key} is inside the files of the run in {other_run}, which the export must not touch; choose a new folder"
    if target.exists():
        if not (target / EXPORT_MARKER).exists():
            return f"{key} already exists and was not written by gemma_ft.export; choose a new folder"
        if not cfg.overwrite:
            return f"{key} holds an earlier export; add overwrite=true to replace it, or choose a new folder"
    return None


def export_problems(cfg: ExportConfig) -> list[str]:
    from gemma_ft.gguf_export import GGUF_TYPES

    found = []
    problem = target_problem(cfg) if cfg.format in FORMATS else None
    if problem:
        found.append(problem)
    if cfg.format not in FORMATS:
        found.append(f"format={cfg.format!r} must be one of {', '.join(FORMATS)}")
    if cfg.dtype not in MERGED_DTYPES:
        found.append(f"dtype={cfg.dtype!r} must be one of {', '.join(MERGED_DTYPES)}")
    if cfg.gguf.type not in GGUF_TYPES:
        found.append(f"gguf.type={cfg.gguf.type!r} must be one of {', '.join(GGUF_TYPES)}")
    return found


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg) -> None:
    cfg = OmegaConf.to_object(cfg)
    try:
        export(cfg)
    except UserError as exc:
        fail(PROGRAM, str(exc))


def cli() -> None:
    guard_command(PROGRAM, "export", ExportConfig, __doc__, problems=export_problems)
    main()


if __name__ == "__main__":
    cli()
