"""Problems with the model location and the output disk are reported before any model loads."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from gemma_ft.errors import ConfigError
from gemma_ft.models.loading import resolve_model_path
from gemma_ft.pipeline import prepare
from tests.helpers import TINY, chess_rows, typed_config, write_csv


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-model"))


def test_model_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_unknown_builtin_model():
    with pytest.raises(ConfigError, match="builtin:gemma3-270m"):
        resolve_model_path("builtin:gemma9")


def test_hub_model_while_offline_says_so(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="hub is unreachable.*local folder|hub is unreachable.*folder"):
        resolve_model_path("unsloth/gemma-3-1b-it-not-cached")


@pytest.fixture
def data(tmp_path):
    return write_csv(tmp_path / "d.csv", chess_rows(8))


def test_unwritable_run_dir_is_reported_before_the_model_loads(tmp_path, data, monkeypatch):
    import gemma_ft.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="a-file is not a folder; set run.dir to a folder"):
        prepare(typed_config([*TINY, f"data.path={data}", "data.val_size=2"]), run_dir=blocker / "run")


def test_full_disk_is_reported_before_the_model_loads(tmp_path, data, monkeypatch):
    import gemma_ft.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match="GiB free.*checkpoint needs"):
        prepare(typed_config([*TINY, f"data.path={data}", "data.val_size=2"]), run_dir=tmp_path / "run")
