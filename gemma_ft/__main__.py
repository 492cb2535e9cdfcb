"""`python -m gemma_ft [overrides]`: a thin Hydra entry point around gemma_ft.pipeline.run.

A user's mistake (wrong key, value, CSV, ...) ends with one line on stderr and exit status 2; set
debug.traceback=true to see the traceback instead. In a sweep (-m) a failing job is recorded in its
status.json and the sweep goes on; the summary marks it and the exit status is 1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.config import register_configs
from gemma_ft.distributed import (
    end_process_group,
    is_main_process,
    shared_run_dir_overrides,
    submitit_tasks_as_one_run,
)
from gemma_ft.errors import UserError, fail, say

# The shell's convention for a process stopped by a signal: 128 + signal number.
INTERRUPTED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from gemma_ft.pipeline import RunInterrupted, run
    from gemma_ft.run_dir import claimed_by_this_process
    from gemma_ft.sweep import write_refused_job, write_status

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        with submitit_tasks_as_one_run():
            # One job's failure must not stop the others: record it, return NaN (Optuna counts it as failed).
            # Its record (.hydra/), log and status go into its folder only once the job owns it: a job refused
            # because its folder holds another run is recorded in the sweep folder instead (gemma_ft.sweep).
            try:
                metrics = run(cfg, run_dir=job_dir, records=hydra_record(cfg))
            except Exception as exc:
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
                if is_main_process():
                    error = f"{type(exc).__name__}: {first_line}"
                    if claimed_by_this_process(job_dir):
                        write_status(job_dir, "failed", error)
                    else:
                        write_refused_job(Path(hydra_cfg.sweep.dir), job_dir.name, hydra_cfg.overrides.task, error)
                say(f"gemma_ft: job {hydra_cfg.job.num} failed: {first_line}")
                return math.nan
            if is_main_process():
                write_status(job_dir, "ok")
            return metrics["eval_loss"]
    try:
        metrics = run(cfg, run_dir=job_dir, records=hydra_record(cfg))
    except UserError as exc:
        if cfg.debug.traceback:
            raise
        fail("gemma_ft", str(exc))
    except RunInterrupted as exc:
        say(f"gemma_ft: {exc}")
        sys.exit(INTERRUPTED_EXIT[exc.signal_name])
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while the first was being handled
        say("gemma_ft: aborted by a second signal; the run resumes from its last complete checkpoint with the same "
            "command")
        sys.exit(INTERRUPTED_EXIT["SIGINT"])
    return metrics["eval_loss"]


def hydra_record(cfg: DictConfig) -> dict[str, object]:
    """What Hydra writes into a job's .hydra/ (hydra.output_subdir=null hands it to gemma_ft, which writes it once
    the run owns its directory): the resolved config, Hydra's own and the command line's overrides."""
    hydra_cfg = HydraConfig.get()
    return {".hydra/config.yaml": cfg, ".hydra/hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
            ".hydra/overrides.yaml": hydra_cfg.overrides.task}


def cli() -> None:
    from gemma_ft.cli_checks import check_overrides
    from gemma_ft.cpu_share import sleep_while_waiting

    sleep_while_waiting()  # before anything loads torch

    register_configs()
    try:
        check_overrides(sys.argv[1:])
    except UserError as exc:
        fail("gemma_ft", str(exc))
    sys.argv += shared_run_dir_overrides(sys.argv[1:])  # torchrun: all ranks in one run dir
    try:
        main()
    finally:
        # As the process ends, whether it ran one job or a basic launcher's sweep (whose jobs share the process and,
        # under torchrun, one group): NCCL warns at exit about a group left open.
        end_process_group()


if __name__ == "__main__":
    cli()
