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
