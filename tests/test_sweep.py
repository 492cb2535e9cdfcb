"""Sweeps: one job per value, a summary that compares them, failures recorded, and real launchers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, chess_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
FAST = [*TINY, "train.eval_steps=2", "data.val_size=4"]


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_ft", "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


def summary_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep")
    write_csv(path / "data.csv", chess_rows(16))
    return path


@pytest.mark.slow
def test_sweep_summarises_every_job_and_survives_a_failing_one(workdir):
    result = sweep(workdir, *FAST, "data.path=data.csv", "hydra.sweep.dir=outputs/wd",
                   "optim.weight_decay=0.001,0.01,-1")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]  # a job failed: the exit status says so
    sweep_dir = workdir / "outputs" / "wd"
    rows = summary_rows(sweep_dir)
    assert [r["optim.weight_decay"] for r in rows] == ["0.001", "0.01", "-1"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "optim.weight_decay=-1" in rows[2]["error"] and "must be >= 0" in rows[2]["error"]
    for row in rows[:2]:
        assert float(row["final_eval_loss"]) > 0 and float(row["final_train_loss"]) > 0
        assert float(row["best_eval_loss"]) <= float(row["final_eval_loss"])
        assert float(row["runtime_s"]) > float(row["train_runtime_s"]) > 0 and float(row["peak_memory_gib"]) > 0
        assert row["exact_match_after"] != ""
    marks = [r["best"] for r in rows[:2]]
    assert marks.count("*") == 1 or marks == ["tie", "tie"]
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    markdown = (sweep_dir / "summary.md").read_text()
    assert "optim.weight_decay" in markdown and markdown.count("\n|") >= 4
    assert "final_eval_loss" in result.stdout  # the table is printed at the end
    # The jobs differ only in weight decay: the same held-out rows were evaluated in both.
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "samples.json").exists())
    samples = [[s["row"] for s in json.loads((job / "samples.json").read_text())] for job in jobs]
    assert len(samples) == 2 and samples[0] == samples[1]
    decays = [json.loads((job / "metrics.json").read_text())["weight_decay"] for job in jobs]
    assert decays == [0.001, 0.01]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep_of_two_ranks_each(workdir):
    """As hydra/launcher=slurm with gpus_per_node=2 would: each job's two tasks train as one torch.distributed run."""
    result = sweep(workdir, *FAST, "data.path=data.csv", "hydra.sweep.dir=outputs/submitit",
                   "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.tasks_per_node=2",
                   "lora.r=4,8")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = workdir / "outputs" / "submitit"
    rows = summary_rows(sweep_dir)
    assert [r["lora.r"] for r in rows] == ["4", "8"] and all(r["status"] == "ok" for r in rows)
    for job in ("0", "1"):
        checkpoint = sweep_dir / job / "checkpoints" / "checkpoint-4"
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}  # two ranks trained
        assert (sweep_dir / job / "gemma_ft.log").read_text().count("Data: 16 rows") == 1  # written by rank 0 only


@pytest.mark.slow
def test_optuna_search_minimises_eval_loss(workdir):
    result = sweep(workdir, *FAST, "data.path=data.csv", "hydra.sweep.dir=outputs/optuna",
                   "hparams_search=optuna_wd_lr", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = workdir / "outputs" / "optuna"
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_value" in best and "optim.weight_decay" in best
    rows = summary_rows(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)


def fake_job(sweep_dir: Path, num: int, weight_decay: str, eval_losses: list[float], status: str = "ok") -> None:
    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- optim.weight_decay={weight_decay}\n")
    (job / "status.json").write_text(json.dumps({"status": status, "error": None}))
    history = [{"loss": 2.0, "step": 1}, *({"eval_loss": v, "step": 10 * (i + 1)} for i, v in enumerate(eval_losses))]
    (job / "history.json").write_text(json.dumps(history))
    (job / "metrics.json").write_text(json.dumps({"eval_loss": eval_losses[-1], "train_loss": 2.0, "runtime_s": 90.0,
                                                  "train_runtime_s": 12.0, "peak_memory_gib": 1.5}))


def test_jobs_equal_to_the_shown_precision_are_a_tie_not_one_arbitrary_best(tmp_path):
    from gemma_ft.sweep import summarise

    fake_job(tmp_path, 0, "0.001", [1.23451])
    fake_job(tmp_path, 1, "0.01", [1.23449])
    fake_job(tmp_path, 2, "0.1", [1.3])
    rows = summarise(tmp_path)
    assert [r["best"] for r in rows] == ["tie", "tie", ""]
    assert "`tie` marks jobs" in (tmp_path / "summary.md").read_text()
    assert [(r["runtime_s"], r["train_runtime_s"]) for r in rows] == [(90.0, 12.0)] * 3

    fake_job(tmp_path, 3, "0.2", [1.2])
    assert [r["best"] for r in summarise(tmp_path)] == ["", "", "", "*"]


def test_the_sweep_plot_draws_every_logged_eval_and_marks_a_single_one(tmp_path, monkeypatch):
    import gemma_ft.sweep as sweep_module

    drawn = {}
    monkeypatch.setattr(sweep_module, "plot_sweep_eval_losses", lambda curves, path: drawn.update(curves))
    fake_job(tmp_path, 0, "0.001", [2.0, 1.5, 1.4])
    fake_job(tmp_path, 1, "0.01", [1.45])
    sweep_module.summarise(tmp_path)
    assert drawn == {"optim.weight_decay=0.001": ([10, 20, 30], [2.0, 1.5, 1.4]),
                     "optim.weight_decay=0.01": ([10], [1.45])}

    from matplotlib import pyplot

    from gemma_ft.plots import plot_sweep_eval_losses

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    plot_sweep_eval_losses(drawn, tmp_path / "summary.png")
    [axes] = figures[0].axes
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == ["optim.weight_decay=0.001", "optim.weight_decay=0.01 (one evaluation)"]
    assert [text.get_text() for text in axes.texts] == ["1.4500"]
    assert (tmp_path / "summary.png").stat().st_size > 1000
