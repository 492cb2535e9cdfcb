"""Export a finished run: `python -m gemma_ft.export run=outputs/<run>`.

Writes <run>/merged: the adapter folded into 16-bit weights, with the tokenizer and its chat template, loadable by
plain transformers (no peft). GGUF for llama.cpp/Ollama is not written here (see `gguf_hint`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.errors import UserError, fail


@dataclass
class ExportConfig:
    run: str = MISSING
    output: str = "merged"  # folder inside the run directory (or an absolute path)
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def gguf_hint(merged_dir: Path) -> str:
    return (f"GGUF: gemma_ft does not convert to GGUF itself (no well-kept PyPI package does it offline); run "
            f"llama.cpp's `python convert_hf_to_gguf.py {merged_dir} --outtype q8_0` on the merged folder")


def export_merged(run_dir: str | Path, output: str = "merged", dtype: str = "bfloat16") -> Path:
    import torch

    from gemma_ft.finished_run import load_finished_run

    run = load_finished_run(run_dir, merged=True)
    target = Path(output) if Path(output).is_absolute() else run.run_dir / output
    model = run.model.to(getattr(torch, dtype))
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.weight.data_ptr():
        # A trained output head no longer equals the input embedding: keep both, or reloading re-ties them.
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "text_config"):
            model.config.text_config.tie_word_embeddings = False
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    run.tokenizer.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"Merged {dtype} model written to {target}")
    print(gguf_hint(target))
    return target


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg) -> None:
    cfg = OmegaConf.to_object(cfg)
    try:
        export_merged(cfg.run, cfg.output, cfg.dtype)
    except UserError as exc:
        fail("gemma_ft.export", str(exc))


if __name__ == "__main__":
    main()
