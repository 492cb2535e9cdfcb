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

from tests.helpers import TINY, write_csv

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


def tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def finished_looking_run(tmp_path) -> Path:
    """A folder with what marks a finished run (the guard checks it before any model loads)."""
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "config.yaml").write_text("model: {}\n")
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run_dir / "merged_by_hand").mkdir()
    (run_dir / "merged_by_hand" / "weights.bin").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    return run_dir


@pytest.mark.parametrize("args, expected", [
    (["output=."], "would hold the run directory itself"),
    (["output=.."], "would hold the run directory itself"),
    (["output=adapter"], "inside the run's adapter/"),
    (["output=checkpoints/checkpoint-4/merged", "format=gguf"], "inside the run's checkpoints/"),
    (["output=merged_by_hand"], "already exists and was not written by gemma_ft.export"),
    (["output={elsewhere}"], "already exists and was not written by gemma_ft.export"),
    # another run's adapter/ or checkpoints/, given as an absolute path
    (["output={other_run}/adapter/merged"], "is inside the files of the run in"),
    (["output={other_run}/checkpoints/x"], "is inside the files of the run in"),
])
def test_export_never_deletes_or_replaces_what_it_did_not_create(finished_looking_run, args, expected, tmp_path):
    other_run = tmp_path / "runs" / "r2"
    (other_run / "adapter").mkdir(parents=True)
    (other_run / "config.yaml").write_text("model: {}\n")
    (other_run / "training_inputs.json").write_text("{}")
    before = tree_digest(tmp_path / "runs") | {"elsewhere": str(tree_digest(tmp_path / "elsewhere"))}
    args = [a.format(elsewhere=tmp_path / "elsewhere", other_run=other_run) for a in args]
    result = command("export", f"run={finished_looking_run}", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result)
    assert expected in line, line
    assert tree_digest(tmp_path / "runs") | {"elsewhere": str(tree_digest(tmp_path / "elsewhere"))} == before


def test_export_replaces_only_its_own_earlier_export_and_only_when_told(finished_looking_run):
    from gemma_ft.export import EXPORT_MARKER, ExportConfig, target_problem

    run = str(finished_looking_run)
    assert target_problem(ExportConfig(run=run)) is None  # merged/ does not exist yet
    (finished_looking_run / "merged").mkdir()
    (finished_looking_run / "merged" / EXPORT_MARKER).write_text("merged\n")
    assert "add overwrite=true" in target_problem(ExportConfig(run=run))
    assert target_problem(ExportConfig(run=run, overwrite=True)) is None
    assert "not written by gemma_ft.export" in target_problem(ExportConfig(run=run, output="merged_by_hand",
                                                                           overwrite=True))


@pytest.mark.parametrize("output, expected", [
    ("{run}/metrics.json", "is one of the files of the run in"),
    ("{run}/adapter/answers.jsonl", "is one of the files of the run in"),
    ("{run}/config.yaml", "is one of the files of the run in"),
    ("{prompts}", "is the input file"),
])
def test_generate_never_writes_its_answers_over_a_runs_files_or_its_input(finished_looking_run, output, expected,
                                                                          tmp_path):
    prompts = write_csv(tmp_path / "p.csv", [["", "e2e4", ""]])
    before = tree_digest(tmp_path)
    output = output.format(run=finished_looking_run, prompts=prompts)
    result = command("generate", f"run={finished_looking_run}", f"file={prompts}", f"output={output}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result)
    assert expected in line and "Traceback" not in result.stderr
    assert tree_digest(tmp_path) == before


def test_a_run_whose_config_is_not_valid_yaml_is_one_line(finished_looking_run, tmp_path):
    (finished_looking_run / "config.yaml").write_text("model: {name: [unclosed\n")
    result = command("generate", f"run={finished_looking_run}", "prompt=hi", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result)
    assert "its config.yaml is not valid YAML at line" in line and "Traceback" not in result.stderr
