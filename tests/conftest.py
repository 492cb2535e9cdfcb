"""pytest hooks and fixtures: cores shared between workers, slow tests first, the tiny model and its tokenizer.

The helpers the tests import live in tests/helpers."""

from __future__ import annotations

import unsloth  # noqa: F401, I001  (unsloth patches transformers, trl and peft: import it first, as the runner does)

import os
from pathlib import Path

import pytest


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


def pytest_collection_modifyitems(items):
    """The slowest tests first: on 2 workers, a long test that starts last finishes the suite alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
