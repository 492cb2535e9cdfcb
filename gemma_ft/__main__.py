"""`python -m gemma_ft [overrides]`: a thin Hydra entry point around gemma_ft.pipeline.run.

A user's mistake (wrong key, value, CSV, ...) ends with one line on stderr and exit status 2; set
debug.traceback=true to see the traceback instead.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.config import register_configs
from gemma_ft.errors import UserError

USER_ERROR_EXIT = 2
# The shell's convention for a process stopped by a signal: 128 + signal number.
INTERRUPTED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def fail(message: str) -> None:
    print(f"gemma_ft: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from gemma_ft.pipeline import RunInterrupted, run

    try:
        metrics = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except UserError as exc:
        if cfg.debug.traceback:
            raise
        fail(str(exc))
    except RunInterrupted as exc:
        print(f"gemma_ft: {exc}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT[exc.signal_name])
    return metrics["eval_loss"]


def cli() -> None:
    from gemma_ft.cli_checks import check_overrides

    register_configs()
    try:
        check_overrides(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    main()


if __name__ == "__main__":
    cli()
