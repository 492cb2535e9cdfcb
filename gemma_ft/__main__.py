"""`python -m gemma_ft [overrides]`: a thin Hydra entry point around gemma_ft.pipeline.run."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gemma_ft.config import register_configs
from gemma_ft.errors import UserError

log = logging.getLogger("gemma_ft")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from gemma_ft.pipeline import run

    try:
        metrics = run(cfg, run_dir=cfg.run.dir or HydraConfig.get().runtime.output_dir)
    except UserError as exc:
        if cfg.debug.traceback:
            raise
        log.error("error: %s", exc)
        print(f"gemma_ft: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return metrics["eval_loss"]


if __name__ == "__main__":
    main()
