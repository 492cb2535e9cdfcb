"""One owner per run directory and per sweep directory: a second run or sweep into one is refused, and a lock left
by a process that is gone is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, chess_rows, typed_config, write_csv


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    from gemma_ft.run_dir import LOCK_FILE

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 0}))
    return lock


def ended_process_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_into_a_run_dir_in_use_is_refused_before_writing_anything(tmp_path):
    from gemma_ft.errors import ConfigError
    from gemma_ft.pipeline import prepare

    data = write_csv(tmp_path / "d.csv", chess_rows(12))
    run_dir = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = write_lock(run_dir, other.pid)
        before = sorted(p.name for p in run_dir.iterdir()), lock.read_text()
        with pytest.raises(ConfigError, match=rf"{run_dir} is in use by another gemma_ft run \(pid {other.pid} on "):
            prepare(typed_config([*TINY, f"data.path={data}", "data.val_size=2"]), run_dir=run_dir)
        assert (sorted(p.name for p in run_dir.iterdir()), lock.read_text()) == before  # no config.yaml written
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_taken_over_from_a_process_that_is_gone_and_released_at_the_end(tmp_path, caplog):
    from gemma_ft.run_dir import acquire_run_lock, release_run_lock

    stale = write_lock(tmp_path, ended_process_pid())
    lock = acquire_run_lock(tmp_path)
    assert lock == stale and json.loads(lock.read_text())["pid"] == os.getpid()
    assert "is gone" in caplog.text
    assert acquire_run_lock(tmp_path) == lock  # this process again (a notebook's retry, a sweep's next job)
    release_run_lock(lock)
    assert not lock.exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    from gemma_ft.errors import ConfigError
    from gemma_ft.run_dir import acquire_run_lock

    write_lock(tmp_path, 12345, host="some-other-node")
    with pytest.raises(ConfigError, match="pid 12345 on some-other-node"):
        acquire_run_lock(tmp_path)


def test_a_finished_run_leaves_no_lock_behind(tmp_path):
    from gemma_ft.pipeline import run
    from gemma_ft.run_dir import LOCK_FILE

    data = write_csv(tmp_path / "d.csv", chess_rows(12))
    run(typed_config([*TINY, f"data.path={data}", "data.val_size=2", "train.max_steps=1", "train.eval_steps=0"]),
        run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_second_sweep_into_a_sweep_dir_is_refused_and_the_default_dir_is_unique_per_sweep(tmp_path, capsys):
    from gemma_ft.sweep import claim_sweep_dir

    claim_sweep_dir(tmp_path / "sweep")
    (tmp_path / "sweep" / "0").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        claim_sweep_dir(tmp_path / "sweep")
    assert exit_info.value.code == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".gemma_ft_sweep", "0"]

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gemma_ft.cli_checks import CONF_DIR
    from gemma_ft.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    # Microseconds: sweeps started in the same second get two folders.
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"].endswith("${now:%H-%M-%S-%f}")


def folder_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_a_run_never_goes_into_a_folder_holding_files_it_did_not_write(tmp_path):
    """A folder with someone's config.yaml and history.json: the run used to replace both and exit 0."""
    from gemma_ft.errors import ConfigError
    from gemma_ft.pipeline import prepare

    path = write_csv(tmp_path / "d.csv", chess_rows(12))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("mine: true\n")
    (theirs / "history.json").write_text("[1, 2, 3]\n")
    before = folder_digest(theirs)
    with pytest.raises(ConfigError, match=r"already holds files that gemma_ft did not write \(config.yaml, "
                                          r"history.json\); a run goes only into a new or empty folder"):
        prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=4"]), run_dir=theirs)
    assert folder_digest(theirs) == before
    # run.name=.. is the working directory itself: refused before anything loads, nothing written there
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me\n")
    before = folder_digest(work)
    result = subprocess.run([sys.executable, "-m", "gemma_ft", "model=tiny", f"data.path={path}", "run.name=.."],
                            cwd=work, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 2 and "already holds files that gemma_ft did not write (notes.txt" in result.stderr
    assert "Traceback" not in result.stderr and folder_digest(work) == before


@pytest.mark.slow
def test_a_sweep_job_whose_folder_holds_another_run_writes_nothing_there_and_takes_none_of_its_metrics(tmp_path):
    """hydra.sweep.dir pointed at a folder whose 0/ is a finished run: job 0 is refused before it writes anything
    into 0/, the summary marks it failed without that run's metrics, and job 1 runs."""
    path = write_csv(tmp_path / "d.csv", chess_rows(12))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    fast = [*TINY, f"data.path={path}", "data.val_size=4", "train.max_steps=1", "train.exact_match_rows=0"]
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "gemma_ft", *fast, f"run.dir={sweep_dir / '0'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    before = folder_digest(sweep_dir / "0")
    sweep = subprocess.run([sys.executable, "-m", "gemma_ft", "-m", *fast, f"hydra.sweep.dir={sweep_dir}",
                            "optim.weight_decay=0.5,0.01"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900, env=env)
    assert sweep.returncode == 1, sweep.stderr[-3000:]
    assert folder_digest(sweep_dir / "0") == before  # no .hydra/, status.json or log line added to that run
    rows = {row["job"]: row for row in __import__("csv").DictReader((sweep_dir / "summary.csv").open())}
    assert rows["0"]["status"] == "failed" and "holds a finished run" in rows["0"]["error"]
    assert rows["0"]["final_eval_loss"] == "" and rows["0"]["optim.weight_decay"] == "0.5"
    assert rows["1"]["status"] == "ok" and float(rows["1"]["final_eval_loss"]) > 0
