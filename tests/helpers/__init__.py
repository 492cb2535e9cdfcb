"""What the tests share: the fast settings of a tiny-model run, the configs as the CLI composes them, small data
files, and folders built once per test session."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.config import register_configs, to_typed

ROOT = Path(__file__).resolve().parents[2]
# Gemma 3's token ids that tests check outputs against (tests/test_chat_template.py checks them on the tokenizer).
EOS_ID, START_OF_TURN_ID, END_OF_TURN_ID = 1, 105, 106

# Fast settings for tiny-model runs; tests add what they check.
TINY = [
    "model=tiny",
    "train.max_steps=4",
    "train.per_device_train_batch_size=2",
    "train.logging_steps=1",
    "train.exact_match_rows=2",
    "train.max_new_tokens=4",
    "train.report_to=none",
    "train.max_seq_length=128",
]


def compose_config(overrides: list[str] = ()):
    """The config exactly as `python -m gemma_ft <overrides>` composes it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def typed_config(overrides: list[str] = ()):
    return to_typed(compose_config(overrides))


def write_csv(path: Path, rows: list[list[str]], header=("task", "input", "expected_output"), **kwargs) -> Path:
    with path.open("w", newline="", encoding=kwargs.pop("encoding", "utf-8")) as handle:
        writer = csv.writer(handle, **kwargs)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def chess_rows(n: int) -> list[list[str]]:
    from gemma_ft.data.make_chess_sample import make_rows

    return [[r["task"], r["input"], r["expected_output"]] for r in make_rows(n, seed=1)]


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build` fills once per test session: under pytest-xdist the first worker to ask builds it and
    the others wait for it, instead of each repeating a training run (pytest-xdist's recipe for fixtures that must
    run once). Unlike the model cache (gemma_ft.models.builtin._cached) it builds in place, not in a staging folder
    renamed at the end: the runs built here record their absolute paths (data.path, run dir), which tests read back."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def run_cli(cwd: Path, *args: str, interrupt: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """`python -m gemma_ft <args>` in a fresh process, or tests.helpers.interrupted_cli with (MODE, STEP)."""
    module = ["-m", "tests.helpers.interrupted_cli", interrupt[0], str(interrupt[1])] if interrupt else ["-m", "gemma_ft"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, *module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
