"""The commands that use a finished run (generate, evaluate, export) and the `gemma-ft` console script: a mistake
gets one line and exit status 2 before torch loads, --help lists the command's own options, and a wheel install
runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # -X importtime lists every module imported: torch must not be among them when the arguments are wrong.
    return subprocess.run([sys.executable, "-X", "importtime", "-m", f"gemma_ft.{name}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error:" in line]


@pytest.mark.parametrize("name, args, expected", [
    ("generate", ["prompt=hi"], "missing run=<folder of a finished training run>"),
    ("evaluate", ["run={missing}"], "missing file=<data file>"),
    ("generate", ["run={missing}", "sampling.temprature=0.5"], "did you mean sampling.temperature?"),
    ("generate", ["run={missing}", "prompt=hi"], "does not exist"),
    ("export", ["run={missing}", "fromat=gguf"], "did you mean format?"),
    ("export", ["run={empty}", "format=onnx", "gguf.type=q4"],
     "has no adapter/ (its training has not finished); point run at a finished gemma_ft run directory"),
    ("export", ["run={empty}", "format=onnx"], "format='onnx' must be one of merged, gguf"),
    ("evaluate", ["run={empty}", "file=nope.jsonl"], "file=nope.jsonl: no such file"),
    ("generate", ["run={empty}", "sampling.top_k=many"], "sampling.top_k"),
    ("generate", ["outputs/run"], "unexpected argument 'outputs/run': options are given as key=value"),
])
def test_a_mistake_is_one_line_and_exit_2_before_torch_loads_and_creates_nothing(name, args, expected, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    result = command(name, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result)
    assert line.startswith(f"gemma_ft.{name}: error:") and expected in line, line
    assert "Traceback" not in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "unsloth" not in imported
    assert not (tmp_path / "missing").exists()  # Hydra's run dir is never created for a missing run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not list((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("name, own, foreign", [
    ("generate", ["sampling:", "temperature: 1.0", "prompt:", "batch_size:"], ["lora", "optim", "model:"]),
    ("evaluate", ["file: ???", "max_new_tokens:"], ["sampling", "optim", "model:"]),
    ("export", ["format: merged", "gguf:", "type: q8_0"], ["sampling", "optim", "model:"]),
])
def test_help_lists_the_commands_own_options_only(name, own, foreign, tmp_path):
    result = command(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(("Talk to", "Evaluate", "Export"))
    for text in own:
        assert text in result.stdout
    options = result.stdout.split("Options of", 1)[1]
    for text in foreign:
        assert text not in options


def test_console_script_dispatches_commands_and_suggests_a_misspelt_one(monkeypatch, capsys):
    from gemma_ft import cli

    called = []
    monkeypatch.setattr("gemma_ft.export.cli", lambda: called.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["gemma-ft", "export", "run=x", "format=gguf"])
    cli.main()
    assert called == [["gemma-ft export", "run=x", "format=gguf"]]

    monkeypatch.setattr(sys, "argv", ["gemma-ft", "exprt", "run=x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "gemma-ft: error: unknown command 'exprt'; did you mean export?"


@pytest.mark.slow
def test_a_built_wheel_installs_and_trains_the_tiny_model_from_another_directory(tmp_path):
    import shutil

    wheel_dir, site, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: pip builds in the source tree, and its build/ folder must not appear in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".*", "outputs", "multirun", "build", "*.egg-info", "__pycache__", "benchmarks", "tests", "docs"))
    import importlib.util

    # Without setuptools here, pip builds in an isolated environment it fetches from PyPI.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w",
                            str(wheel_dir), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = wheel_dir.glob("gemma_ft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gemma_ft/conf/config.yaml", "gemma_ft/conf/model/tiny.yaml", "gemma_ft/conf/hydra/launcher/slurm.yaml",
            "gemma_ft/data/chess_sample.csv"} <= names
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    # The installed package, not this checkout: the checkout is neither the working directory nor on the path.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import gemma_ft; print(gemma_ft.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "gemma_ft" / "__init__.py")
    result = subprocess.run([sys.executable, str(site / "bin" / "gemma-ft"), *TINY, "train.max_steps=2",
                             "train.eval_steps=0", "run.name=from_wheel"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "outputs" / "from_wheel" / "metrics.json").is_file()
