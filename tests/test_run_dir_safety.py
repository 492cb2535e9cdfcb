"""Nothing saved is lost: a refused command leaves the run directory byte for byte as it was, an overwrite takes the
earlier run's place only once it has finished, a resume with other settings is refused unless asked for, and a save
that fills the disk leaves nothing behind that blocks the rerun."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import TINY, chess_rows, run_cli, write_csv

STEPS = 4


def overrides(data: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={data}", "data.val_size=2", f"train.max_steps={STEPS}", "train.save_steps=2",
            "train.exact_match_rows=0", *extra]


def tree_digest(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes), but the top-level names in `ignore`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).parts[0] not in ignore}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def finished_run(tmp_path: Path, name: str) -> tuple[Path, Path]:
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    done = run_cli(tmp_path, *overrides(data, f"run.name={name}"))
    assert done.returncode == 0, done.stderr[-2000:]
    return data, tmp_path / "outputs" / name


@pytest.mark.slow
def test_refused_commands_leave_a_finished_run_byte_for_byte_and_an_overwrite_keeps_it_until_done(tmp_path):
    data, run_dir = finished_run(tmp_path, "replaced")
    assert {".hydra", "gemma_ft.log", "config.yaml", "training_inputs.json"} <= {p.name for p in run_dir.iterdir()}
    before = tree_digest(run_dir)
    # Hydra's own run dir (not run.name) bypasses the check before Hydra starts: the run's record and log must
    # still be untouched.
    for args in (overrides(data, "run.name=replaced"), overrides(data, f"hydra.run.dir={run_dir}", "optim.lr=1e-3")):
        refused = run_cli(tmp_path, *args)
        assert refused.returncode == 2 and "holds a finished run" in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
        assert tree_digest(run_dir) == before

    earlier = tree_digest(run_dir, ignore=("gemma_ft.log",))
    args = overrides(data, "run.name=replaced", "run.overwrite=true", "optim.lr=1e-3")

    killed = run_cli(tmp_path, *args, interrupt=("sigkill-after-save", 2))
    assert killed.returncode == -9
    # The killed overwrite's lock, log lines and staging folder aside, the earlier run is whole and still finished.
    from gemma_ft.run_dir import LOCK_FILE, OVERWRITE_STAGING, REPLACED, is_finished

    assert tree_digest(run_dir, ignore=("gemma_ft.log", LOCK_FILE, OVERWRITE_STAGING)) == earlier
    assert is_finished(run_dir) and metrics(run_dir)["learning_rate"] == 2e-4

    again = run_cli(tmp_path, *args)  # the same command continues the overwrite from its own checkpoint
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming from {run_dir / OVERWRITE_STAGING / 'checkpoints' / 'checkpoint-2'}" in again.stdout + again.stderr
    assert metrics(run_dir)["learning_rate"] == 1e-3 and metrics(run_dir)["global_step"] == STEPS
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()
    assert "optim.lr=1e-3" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert not (run_dir / OVERWRITE_STAGING).exists() and not (run_dir / REPLACED).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert tree_digest(run_dir / "adapter") != {k[len("adapter/"):]: v for k, v in earlier.items()
                                                if k.startswith("adapter/")}


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_unless_asked_for(tmp_path):
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    args = overrides(data, "run.name=halfway")
    killed = run_cli(tmp_path, *args, interrupt=("sigkill-after-save", 2))
    assert killed.returncode == -9
    run_dir = tmp_path / "outputs" / "halfway"
    from gemma_ft.run_dir import LOCK_FILE

    before = tree_digest(run_dir)
    assert LOCK_FILE in before  # the killed run's: a refused command does not even clean it up

    changed = run_cli(tmp_path, *args, "optim.lr=1e-3", "train.per_device_train_batch_size=4",
                      "train.eval_steps=1")  # eval_steps changes what is reported, not what is learnt
    assert changed.returncode == 2, changed.stderr[-2000:]
    [line] = [line for line in changed.stderr.splitlines() if "error" in line]
    assert "checkpoint-2 was trained with other settings: optim.lr 0.0002 -> 0.001; " \
           "train.per_device_train_batch_size 2 -> 4; " in line and "run.resume_changed=true" in line
    assert "eval_steps" not in line
    assert tree_digest(run_dir) == before

    other_rows = write_csv(tmp_path / "other.csv", chess_rows(13)[1:])
    moved = run_cli(tmp_path, *overrides(other_rows, "run.name=halfway"))
    assert moved.returncode == 2 and "the data rows (another file or other contents)" in moved.stderr
    assert tree_digest(run_dir) == before

    # The learning rate is restored from the checkpoint's optimizer and scheduler: a new one would never apply,
    # while config.yaml and metrics.json said it did. Refused, with the reason, even with resume_changed.
    ignored = run_cli(tmp_path, *args, "optim.lr=1e-3", "run.resume_changed=true")
    assert ignored.returncode == 2 and "optim.lr 0.0002 -> 0.001 cannot change on resume, even with " \
        "run.resume_changed=true: the checkpoint's optimizer and learning-rate schedule are restored" in ignored.stderr
    assert tree_digest(run_dir) == before

    forced = run_cli(tmp_path, *args, "optim.warmup_steps=0", "run.resume_changed=true")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "with changed settings (run.resume_changed=true): optim.warmup_steps 5 -> 0" \
        in forced.stdout + forced.stderr
    assert "warmup_steps: 5" in (run_dir / "config.before-resume.yaml").read_text()
    assert "warmup_steps: 0" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "training_inputs.before-resume.json").read_text())["optim.warmup_steps"] == 5
    assert json.loads((run_dir / "training_inputs.json").read_text())["optim.warmup_steps"] == 0


def run_until_the_disk_fills(tmp_path: Path, name: str, mode: str, step: int):
    """(the command's arguments, the failed run, its run dir): a run whose save meets a full disk (interrupted_cli)."""
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    args = overrides(data, f"run.name={name}")
    failed = run_cli(tmp_path, *args, interrupt=(mode, step))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    return args, failed, tmp_path / "outputs" / name


@pytest.mark.slow
def test_a_disk_that_fills_while_saving_leaves_nothing_that_blocks_the_rerun(tmp_path):
    args, failed, run_dir = run_until_the_disk_fills(tmp_path, "full", "disk-full-saving-adapter", 0)
    assert "could not save the adapter" in failed.stderr and "No space left on device" in failed.stderr
    assert not (run_dir / ".adapter.tmp").exists() and not (run_dir / "adapter").exists()
    assert not (run_dir / "metrics.json").exists()

    rerun = run_cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"checkpoint-{STEPS}" in rerun.stdout + rerun.stderr and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert metrics(run_dir)["global_step"] == STEPS


@pytest.mark.slow
def test_a_disk_that_fills_while_torch_saves_a_checkpoint_is_one_line_and_leaves_no_half_checkpoint(tmp_path):
    args, failed, run_dir = run_until_the_disk_fills(tmp_path, "full-torch", "disk-full-saving-checkpoint", 4)
    [line] = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert "the disk filled up while writing a checkpoint" in line and "the half-written checkpoint-4 was removed" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    rerun = run_cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert metrics(run_dir)["global_step"] == STEPS


@pytest.mark.slow
def test_a_resumed_run_logs_and_evaluates_at_its_new_cadence(tmp_path):
    """transformers restores logging_steps and eval_steps from the checkpoint's trainer_state.json: the README says
    they may change on resume, so they must apply."""
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    first = overrides(data, "run.name=cadence", "train.logging_steps=1", "train.eval_steps=1")
    killed = run_cli(tmp_path, *first, interrupt=("sigkill-after-save", 2))
    assert killed.returncode == -9
    resumed = run_cli(tmp_path, *overrides(data, "run.name=cadence", "train.logging_steps=4", "train.eval_steps=4"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = json.loads((tmp_path / "outputs" / "cadence" / "history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 4]  # step 3 is not a multiple of 4 any more
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, STEPS])
def test_sigterm_during_an_evaluation_stops_at_the_next_batch_and_the_same_command_finishes(tmp_path, step):
    """An evaluation inside training used to hold a signal until it ended (an hour on a CPU for 10,000 rows); at
    the last step the signal was then forgotten and the run went on to report success."""
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    args = overrides(data, "run.name=evalstop", "data.val_size=4", "train.per_device_eval_batch_size=1",
                     "train.eval_steps=2", "train.save_steps=100")
    stopped = run_cli(tmp_path, *args, interrupt=("sigterm-during-eval", step))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert f"SIGTERM: stopped at step {step} with a checkpoint saved" in stopped.stderr
    run_dir = tmp_path / "outputs" / "evalstop"
    assert not (run_dir / "metrics.json").exists()
    from gemma_ft.run_dir import COMPLETE_MARKER

    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).exists()
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming from {run_dir / 'checkpoints' / f'checkpoint-{step}'}" in again.stdout + again.stderr
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, STEPS + 1))  # no step trained twice
    assert metrics(run_dir)["global_step"] == STEPS


@pytest.mark.slow
def test_sigterm_while_the_trained_model_generates_saves_it_and_the_same_command_finishes(tmp_path):
    data = write_csv(tmp_path / "data.csv", chess_rows(12))
    args = [*overrides(data, "run.name=emstop", "train.save_steps=100"), "train.exact_match_rows=2"]
    stopped = run_cli(tmp_path, *args, interrupt=("sigterm-during-exact-match", 0))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert f"SIGTERM: stopped at step {STEPS} with a checkpoint saved" in stopped.stderr
    run_dir = tmp_path / "outputs" / "emstop"
    assert not (run_dir / "metrics.json").exists()
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, STEPS + 1))
    assert metrics(run_dir)["exact_match_rows"] == 2
