"""Shared fixtures: composing the real configs, the tiny model, and small CSVs written by the tests."""

from __future__ import annotations

import unsloth  # noqa: F401, I001  (unsloth patches transformers, trl and peft: import it first, as the runner does)

import csv
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.config import register_configs, to_typed


def pytest_configure(config) -> None:
    share_the_cores_between_test_workers()


def share_the_cores_between_test_workers() -> None:
    """Under pytest-xdist, each worker (and the runs it starts) gets its share of the cores rather than torch's
    default of all of them, which puts two workers' threads on each core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the runs the tests start as subprocesses
        torch.set_num_threads(threads)


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


def pytest_collection_modifyitems(items):
    """The slowest tests first: on 2 workers, a long test that starts last finishes the suite alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from gemma_ft.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-gemma3")


@pytest.fixture(scope="session")
def gemma_tokenizer(tiny_model_dir):
    """The real Gemma 3 tokenizer with the chat template applied, as the runner prepares it."""
    from gemma_ft.chat_template import apply_gemma3_template
    from gemma_ft.models.loading import load_tokenizer

    return apply_gemma3_template(load_tokenizer(str(tiny_model_dir)))
