"""`python -m gemma_ft` as a user runs it: mistakes give one line and exit status 2; a run finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, chess_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


def gemma_ft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "gemma_ft", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args, expected", [
    (["optim.weight_deacy=0.01"], "did you mean optim.weight_decay?"),
    (["model=tinyy"], "choose one of"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["optim.lr=0", "lora.r=0"], "lora.r=0 must be > 0"),
    (["data.path=missing.csv"], "does not exist"),
    # an added key is checked like any other: it would otherwise be dropped and the run go on without it
    (["+optim.weight_deacy=0.1"], "unknown config key 'optim.weight_deacy'; did you mean optim.weight_decay?"),
    (["~optim.lr"], "~optim.lr: a config key cannot be deleted"),
    (["train.seed=${oc.env:GEMMA_FT_UNSET_VARIABLE}"], "train.seed: KeyError raised while resolving interpolation"),
    (["train.max_steps=${train.nope}"], "train.max_steps: Interpolation key 'train.nope' not found"),
    (["data.delimiter=;"], "must be quoted for Hydra and the shell"),
    (["model=tiny", "-m", "optim.lr=1e-4,2e-4"], "-m (--multirun) must come before the overrides"),
    (["run.name=" + "a" * 300], "is 300 bytes, longer than this file system allows"),
    # Hydra's own run dir is checked as run.dir is, before Hydra creates it
    (["hydra.run.dir=/proc/gemma_ft_run"], "hydra.run.dir=/proc/gemma_ft_run: run directory /proc/gemma_ft_run is "
                                           "on proc, a virtual filesystem"),
    (["hydra.run.dir=/dev/null"], "/dev/null is not a folder"),
    # every swept value is checked before Hydra starts and claims a sweep folder
    (["-m", "model=tiny", "optim.lr=1e-4,abc"], "in the sweep, optim.lr: Value 'abc' of type 'str' could not be "
                                                "converted to Float"),
    (["-m", "model=tiny", "optim.lr=1e-4,2e-4", "lora.r=4,four"], "in the sweep, lora.r: Value 'four' of type 'str' "
                                                                   "could not be converted to Integer"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, expected):
    result = gemma_ft(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gemma_ft: error:")]
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.json"))
    assert not (tmp_path / "outputs" / "multirun").exists()  # a refused sweep claims no folder


def test_a_valid_sweep_passes_the_value_checks():
    from gemma_ft.cli_checks import check_overrides, sweep_variants, parse_overrides

    check_overrides(["-m", "model=tiny", "optim.weight_decay=0.001,0.01", "lora.r=4,8"])
    variants = sweep_variants(parse_overrides(["model=tiny", "optim.weight_decay=0.001,0.01", "lora.r=4,8"]))
    assert sorted(map(tuple, variants)) == sorted([
        ("model=tiny", "lora.r=4", "optim.weight_decay=0.001"), ("model=tiny", "lora.r=4", "optim.weight_decay=0.01"),
        ("model=tiny", "optim.weight_decay=0.001", "lora.r=4"), ("model=tiny", "optim.weight_decay=0.001", "lora.r=8")])


@pytest.mark.slow
def test_cli_run_with_relative_data_path_and_override(tmp_path):
    write_csv(tmp_path / "data.csv", chess_rows(12))
    result = gemma_ft(*TINY, "data.path=data.csv", "data.val_size=2", "optim.weight_decay=0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics_file] = (tmp_path / "outputs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["weight_decay"] == 0.01
    run_dir = metrics_file.parent
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "adapter" / "adapter_config.json").exists()
    # A quiet console: a line per stage, our bars, the result; no library progress bars, info logs or dict logs.
    console = result.stdout + result.stderr
    for stage in ("Data: 12 rows", "Chat template: Gemma 3", "Model: ", "LoRA: r=16", "Training: 4 steps", "Done in"):
        assert stage in result.stdout
    for noise in ("Truncating", "Dropping fully masked", "Map", "Loading weights", "{'loss'", "tie_word_embeddings",
                  "Disabling Tensorflow", "[INFO]"):
        assert noise not in console
    assert "[INFO]" in (run_dir / "gemma_ft.log").read_text()  # the log file keeps times and sources


def test_an_error_line_reaches_stderr_in_one_write_so_ranks_sharing_stderr_do_not_run_lines_together(monkeypatch):
    from gemma_ft.errors import USER_ERROR_EXIT, fail

    class RecordingStream:
        def __init__(self):
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            self.writes.append("<flush>")

    stream = RecordingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(SystemExit) as exit_info:
        fail("gemma_ft", "data.path=x.csv: rank(s) 1 read other rows than rank 0")
    assert exit_info.value.code == USER_ERROR_EXIT
    assert stream.writes == ["gemma_ft: error: data.path=x.csv: rank(s) 1 read other rows than rank 0\n", "<flush>"]
