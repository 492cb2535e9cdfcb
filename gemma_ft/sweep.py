"""The comparison a sweep exists for: one row per job in summary.csv / summary.md, and summary.png.

`SweepSummary` is a Hydra callback (registered in conf/config.yaml), so it runs after the last job with any
launcher: the basic one, joblib, or submitit (SLURM and submitit_local).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from gemma_ft.errors import say
from gemma_ft.plots import curve, plot_sweep_eval_losses

STATUS_FILE = "status.json"
SWEEP_OWNER = ".gemma_ft_sweep"  # created once, exclusively, by the sweep that owns the folder
METRIC_COLUMNS = ["final_eval_loss", "best_eval_loss", "final_train_loss", "exact_match_after", "runtime_s",
                  "train_runtime_s", "peak_memory_gib", "tokens_per_s", "mfu", "time_to_first_step_s"]
# The speed columns a run measures itself (gemma_ft.speed); mfu is empty on a CPU.
SPEED_COLUMNS = ["tokens_per_s", "mfu", "time_to_first_step_s"]
# Losses are shown to 4 decimals: jobs equal at that precision are a tie, never one arbitrary "best".
LOSS_DECIMALS = 4


def claim_sweep_dir(sweep_dir: Path) -> None:
    """Own `sweep_dir` or end the command (one line, exit status 2): a second sweep into one folder would replace
    the first one's jobs (same job numbers) and relabel them in the summary."""
    from gemma_ft.errors import fail

    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        with (sweep_dir / SWEEP_OWNER).open("x") as handle:
            handle.write(json.dumps({"pid": os.getpid()}) + "\n")
    except FileExistsError:
        fail("gemma_ft", f"hydra.sweep.dir={sweep_dir} already holds a sweep; its jobs would be overwritten: choose "
                         "another hydra.sweep.dir (or leave it to the default, a new folder per sweep)")


REFUSED_JOBS = ".refused_jobs"  # in the sweep folder: jobs refused before they owned their folder, one file each


def write_status(job_dir: Path, status: str, error: str | None = None) -> None:
    (job_dir / STATUS_FILE).write_text(json.dumps({"status": status, "error": error}) + "\n")


def write_refused_job(sweep_dir: Path, job: str, overrides: list[str], error: str) -> None:
    """A job refused before it owned its folder (which may hold another run): recorded beside the jobs, never in
    that folder."""
    folder = sweep_dir / REFUSED_JOBS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job}.json").write_text(json.dumps({"overrides": list(overrides), "error": error}) + "\n")


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job: its folder (with Hydra's .hydra/overrides.yaml) or its refusal record, in job order."""
    jobs = []
    refused = {path.stem: json.loads(path.read_text()) for path in (sweep_dir / REFUSED_JOBS).glob("*.json")}
    job_dirs = {path.parent.parent.name: path for path in sweep_dir.glob("*/.hydra/overrides.yaml")}
    for name in sorted(set(job_dirs) | set(refused)):
        job_dir = sweep_dir / name
        if name in refused:  # what its folder holds belongs to another run: nothing of it is this job's
            overrides = dict(o.split("=", 1) for o in refused[name]["overrides"] if "=" in o)
            status, metrics, history = {"status": "failed", "error": refused[name]["error"]}, {}, []
        else:
            overrides = dict(o.split("=", 1) for o in OmegaConf.load(job_dirs[name]) if "=" in o)
            status = json.loads((job_dir / STATUS_FILE).read_text()) if (job_dir / STATUS_FILE).exists() else {
                "status": "failed", "error": "the job stopped without reporting (killed?)"}
            # Only a job that reported here owns what its folder holds (metrics once it finished)
            owned, finished = (job_dir / STATUS_FILE).exists(), status["status"] == "ok"
            metrics = _read_json(job_dir / "metrics.json", {}) if finished else {}
            history = _read_json(job_dir / "history.json", []) if owned else []
        evals = curve(history, "eval_loss")
        jobs.append({
            "job": job_dir.name,
            "num": int(job_dir.name) if job_dir.name.isdigit() else len(jobs),
            "overrides": overrides,
            "status": status["status"],
            "error": status.get("error") or "",
            "final_eval_loss": metrics.get("eval_loss"),
            "best_eval_loss": min(evals[1]) if evals[1] else metrics.get("eval_loss"),
            "final_train_loss": metrics.get("train_loss"),
            "exact_match_after": metrics.get("exact_match_after"),
            "runtime_s": metrics.get("runtime_s"),
            "train_runtime_s": metrics.get("train_runtime_s"),
            "peak_memory_gib": metrics.get("peak_memory_gib"),
            **{column: metrics.get(column) for column in SPEED_COLUMNS},
            "eval_curve": evals,
        })
    return sorted(jobs, key=lambda j: j["num"])


def _read_json(path: Path, missing):
    return json.loads(path.read_text()) if path.exists() else missing


def varying_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    varying = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    return varying or keys


def summarise(sweep_dir: Path) -> list[dict]:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; return the rows."""
    jobs = collect_jobs(sweep_dir)
    keys = varying_keys(jobs)
    marks = best_marks(jobs)
    rows = []
    for job in jobs:
        row = {"job": job["job"], **{k: job["overrides"].get(k, "") for k in keys}}
        row.update({c: job[c] for c in METRIC_COLUMNS})
        row.update({"status": job["status"], "best": marks.get(job["job"], ""), "error": job["error"]})
        rows.append(row)
    columns = ["job", *keys, *METRIC_COLUMNS, "status", "best", "error"]
    with (sweep_dir / "summary.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    markdown = markdown_table(rows, columns)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\n{markdown}\n\n`*` marks the job with the lowest final eval loss; `tie` marks jobs "
        f"whose final eval loss equals the lowest to {LOSS_DECIMALS} decimals.\n", encoding="utf-8")
    curves = {", ".join(f"{k}={j['overrides'].get(k, '')}" for k in keys) or j["job"]: j["eval_curve"]
              for j in jobs if j["eval_curve"][0]}
    plot_sweep_eval_losses(curves, sweep_dir / "summary.png")
    return rows


def best_marks(jobs: list[dict]) -> dict[str, str]:
    """job -> "*" for the one finished job with the lowest final eval loss, or "tie" for each of several."""
    finished = [j for j in jobs if j["status"] == "ok" and _number(j["final_eval_loss"])]
    if not finished:
        return {}
    lowest = round(min(j["final_eval_loss"] for j in finished), LOSS_DECIMALS)
    best = [j["job"] for j in finished if round(j["final_eval_loss"], LOSS_DECIMALS) == lowest]
    return {job: "*" if len(best) == 1 else "tie" for job in best}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


class SweepSummary(Callback):
    """Before the first job: the sweep folder must be new to this sweep. After the last job: the summary files, the
    table on stdout, and exit status 1 if any job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        claim_sweep_dir(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        print((sweep_dir / "summary.md").read_text())
        print(f"Sweep summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.png'}")
        failed = [r for r in rows if r["status"] != "ok"]
        if failed:
            say(f"gemma_ft: {len(failed)} of {len(rows)} sweep job(s) failed: "
                + "; ".join(f"{r['job']}: {r['error']}" for r in failed))
            sys.exit(1)
