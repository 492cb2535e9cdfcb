"""Crash safety: a killed run resumes to the same losses and weights; half-written checkpoints are skipped;
Ctrl-C/SIGTERM save and stop; a finished run is never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY, built_once, chess_rows, run_cli, write_csv

STEPS = 6
# 6 training rows in batches of 2: 3 steps an epoch, so the kill after checkpoint-4 lands inside epoch 2, where the
# length-grouped order of a resumed run once differed from the uninterrupted run's.
ROWS, VAL_ROWS = 10, 4


def overrides(data: Path, name: str) -> list[str]:
    return [*TINY, f"data.path={data}", f"data.val_size={VAL_ROWS}", f"train.max_steps={STEPS}", "train.save_steps=2",
            "train.exact_match_rows=0", f"run.name={name}"]


def resume(workdir: Path, args: list[str]) -> str:
    """The same command again, in a fresh process as the uninterrupted run was: returns its console output.

    (Resumed inside a test worker of the whole suite on two workers, later steps' losses came out up to 3e-4 off the
    uninterrupted run's, while the same tests alone matched: comparing two fresh processes keeps state that other
    tests leave in a worker out of it.)"""
    result = run_cli(workdir, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def write_data_and_run_straight(workdir: Path) -> None:
    write_csv(workdir / "data.csv", chess_rows(ROWS))
    result = run_cli(workdir, *overrides(workdir / "data.csv", "straight"))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The data and an uninterrupted run, shared by the test workers; each test writes its own run next to it."""
    return built_once(tmp_path_factory, "resume", write_data_and_run_straight)


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    return workdir / "outputs" / "straight"


def assert_same_run(resumed: Path, reference: Path) -> None:
    expected, got = step_losses(reference), step_losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, abs=1e-4)
    metrics, reference_metrics = (json.loads((d / "metrics.json").read_text()) for d in (resumed, reference))
    assert metrics["eval_loss"] == pytest.approx(reference_metrics["eval_loss"], abs=1e-4)
    # The true mean over all six steps, not the resumed steps' loss divided by six.
    assert metrics["train_loss"] == pytest.approx(reference_metrics["train_loss"], abs=1e-4)
    assert metrics["train_loss"] == pytest.approx(sum(expected.values()) / STEPS, abs=1e-4)
    weights, reference_weights = adapter(resumed), adapter(reference)
    assert weights.keys() == reference_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], atol=1e-4, rtol=0)


def test_killed_in_the_second_epoch_resumes_to_the_same_result(workdir, uninterrupted):
    args = overrides(workdir / "data.csv", "killed")
    killed = run_cli(workdir, *args, interrupt=("sigkill-after-save", 4))
    assert killed.returncode == -9
    run_dir = workdir / "outputs" / "killed"
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2, "the kill must fall inside the second epoch"
    log = resume(workdir, args)
    assert "Resuming from" in log and "checkpoint-4" in log
    assert_same_run(run_dir, uninterrupted)


def test_checkpoint_cut_short_by_a_kill_is_skipped(workdir, uninterrupted):
    args = overrides(workdir / "data.csv", "midsave")
    killed = run_cli(workdir, *args, interrupt=("sigkill-during-save", 4))
    assert killed.returncode == -9
    half_written = workdir / "outputs" / "midsave" / "checkpoints" / "checkpoint-4"
    assert half_written.is_dir() and not (half_written / "trainer_state.json").exists()
    log = resume(workdir, args)
    assert "Skipping" in log and "checkpoint-4" in log and "Resuming from" in log and "checkpoint-2" in log
    assert_same_run(workdir / "outputs" / "midsave", uninterrupted)


@pytest.mark.parametrize("mode, code", [("sigint", 130), ("sigterm", 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(workdir, uninterrupted, mode, code):
    args = overrides(workdir / "data.csv", mode)
    stopped = run_cli(workdir, *args, interrupt=(mode, 3))
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    run_dir = workdir / "outputs" / mode
    # The signal arrives during step 3; the step in progress finishes, then the checkpoint is written.
    [saved] = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name != "checkpoint-2"]
    assert saved.name in ("checkpoint-3", "checkpoint-4") and (saved / "gemma_ft_complete").exists()
    assert "resume" in stopped.stderr and str(run_dir) in stopped.stderr
    assert not (run_dir / "metrics.json").exists()
    if mode == "sigterm":  # resuming does not depend on which signal stopped the run: once is enough on 2 cores
        resume(workdir, [*args, f"run.dir={run_dir}"])
        assert_same_run(run_dir, uninterrupted)


def test_finished_run_is_not_overwritten(workdir, uninterrupted):
    before = {p: p.read_bytes() for p in [uninterrupted / "metrics.json", uninterrupted / ".hydra" / "config.yaml"]}
    again = run_cli(workdir, *overrides(workdir / "data.csv", "straight"))
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr
    assert {p: p.read_bytes() for p in before} == before
