"""No traceback for any bad value: every leaf of the schema, given a wrong-typed, a non-finite or an out-of-range
value, ends the command with one line and exit status 2, before anything is written; a run that diverges stops."""

from __future__ import annotations

import dataclasses
import sys
import typing

import pytest

from gemma_ft.config import Config
from tests.helpers import TINY, chess_rows, typed_config, write_csv

# Free text that any string satisfies; a wrong one is found when it is used (a path that does not exist, a column
# the CSV lacks: tests/test_data.py, tests/test_environment_errors.py).
FREE_TEXT = {"model.name_or_path", "data.path", "data.columns.system", "data.columns.user", "data.columns.assistant",
             "data.columns.messages",
             "data.system_prompt", "run.name", "run.dir"}


def leaves(schema=Config, prefix: str = ""):
    """(dotted key, type) of every leaf of the typed config."""
    for name, kind in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):
            yield from leaves(kind, f"{prefix}{name}.")
        else:
            yield prefix + name, kind


def bad_values(kind) -> list[str]:
    """A wrong-typed, a non-finite and an out-of-range value for a leaf of this type, as override text."""
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
    if base is bool:
        return ["bogus"]
    if base is int:
        return ["bogus", "inf", "-5"]
    if base is float:
        return ["bogus", "inf", "nan", "-5"]
    if typing.get_origin(base) is list:
        return ["bogus", "[]"]
    return ["bogus"]  # strings with a fixed set of values, and `Any` (lora.use_gradient_checkpointing)


CASES = [(key, value) for key, kind in leaves() if key not in FREE_TEXT for value in bad_values(kind)]


def test_every_leaf_but_free_text_is_covered():
    assert {key for key, _ in CASES} | FREE_TEXT == {key for key, _ in leaves()}
    assert len(CASES) > 80


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_bad_value_is_one_line_and_exit_2_before_anything_is_written(key, value, tmp_path, monkeypatch, capsys):
    import gemma_ft.__main__ as entry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gemma_ft", f"{key}={value}"])
    monkeypatch.setattr(entry, "main", lambda: pytest.fail(f"{key}={value} was accepted"))
    with pytest.raises(SystemExit) as stop:
        entry.cli()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma_ft: error: ") and "Traceback" not in err
    assert key.rsplit(".", 1)[-1] in lines[0]  # the message names the key
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("run_dir,reason", [("/dev/null/run", "is not a folder"),
                                            ("/proc/gemma_ft_run", "virtual filesystem"),
                                            ("/sys/gemma_ft_run", "virtual filesystem")])
def test_a_run_dir_that_cannot_hold_a_run_is_one_line_and_exit_2(run_dir, reason, tmp_path, monkeypatch, capsys):
    import gemma_ft.__main__ as entry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gemma_ft", f"run.dir={run_dir}"])
    monkeypatch.setattr(entry, "main", lambda: pytest.fail("accepted"))
    with pytest.raises(SystemExit) as stop:
        entry.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and reason in err[0] and run_dir in err[0]


def test_an_unwritable_run_dir_is_refused(tmp_path, monkeypatch):
    import os

    from gemma_ft.errors import ConfigError
    from gemma_ft.run_dir import check_run_dir_location

    locked = tmp_path / "locked"
    locked.mkdir()
    # What the system answers for a folder this user may not write (root may write anywhere, so it is simulated).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == locked else real_access(path, mode))
    with pytest.raises(ConfigError, match="locked is not writable; set run.dir to a writable folder"):
        check_run_dir_location(locked / "run")


def test_every_reply_cut_off_is_a_data_error_before_the_model_loads(tmp_path, monkeypatch):
    import gemma_ft.models.loading as loading
    from gemma_ft.errors import DataError
    from gemma_ft.pipeline import prepare

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rows = [["A long system prompt. " * 30, "question", "answer"] for _ in range(8)]
    path = write_csv(tmp_path / "long.csv", rows)
    with pytest.raises(DataError, match="every training row was dropped: train.max_seq_length=64 .* raise "
                                        "train.max_seq_length"):
        prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=2", "train.max_seq_length=64"]),
                run_dir=tmp_path / "run")


def test_a_lora_target_that_is_not_a_layer_of_the_model_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import gemma_ft.models.loading as loading
    from gemma_ft.errors import ConfigError
    from gemma_ft.pipeline import prepare

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write_csv(tmp_path / "d.csv", chess_rows(12))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"lora.target_modules: foo_proj is not a linear layer of .*; its linear "
                                          r"layers are \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj'"):
        prepare(typed_config([*TINY, f"data.path={path}", "data.val_size=2", "lora.target_modules=[foo_proj,q_proj]"]),
                run_dir=run_dir)
    from gemma_ft.run_dir import LOCK_FILE

    assert {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}  # no record, no log (the CLI releases the lock)


def test_a_run_whose_loss_becomes_nan_stops_at_that_step_and_keeps_its_last_good_checkpoint(tmp_path):
    from gemma_ft.pipeline import RunDiverged, run

    path = write_csv(tmp_path / "d.csv", chess_rows(20))
    run_dir = tmp_path / "run"
    # lr 1e30 without clipping: the first update sends the weights to ~1e30, and the second step's loss is not finite
    with pytest.raises(RunDiverged, match=r"training diverged at step 2: .* lower optim.lr \(now 1e\+30\)"):
        run(typed_config([*TINY, f"data.path={path}", "data.val_size=4", "optim.lr=1e30", "optim.warmup_steps=0",
                          "optim.max_grad_norm=0", "train.save_steps=1", "train.max_steps=6"]), run_dir=run_dir)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_final_eval_loss_that_is_not_finite_fails_the_run_and_saves_no_result(tmp_path):
    """The last step's gradients were finite, but the weights it left give a NaN eval loss: not a success."""
    from gemma_ft.pipeline import RunDiverged, run

    path = write_csv(tmp_path / "d.csv", chess_rows(20))
    run_dir = tmp_path / "run"
    with pytest.raises(RunDiverged, match=r"the eval loss after step 1 is nan: .* lower optim.lr \(now 10000000000.0\)"):
        run(typed_config([*TINY, f"data.path={path}", "data.val_size=4", "optim.lr=1e10", "optim.warmup_steps=0",
                          "train.max_steps=1", "train.exact_match_rows=0"]), run_dir=run_dir)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()


@pytest.mark.parametrize("key,value", [("max_new_tokens", "-5"), ("temperature", "inf"), ("temperature", "nan"),
                                       ("temperature", "0.0"), ("top_p", "1.5"), ("top_p", "nan"), ("top_k", "-1")])
def test_a_bad_sampling_value_is_refused_before_the_run_loads(key, value, tmp_path):
    from gemma_ft.commands import check_command_arguments
    from gemma_ft.errors import ConfigError
    from gemma_ft.generate import GenerateConfig, sampling_problems

    args = [f"run={tmp_path / 'no-such-run'}", "prompt=hi", f"sampling.{key}={value}"]
    with pytest.raises(ConfigError, match=f"sampling.{key}="):
        check_command_arguments("generate", GenerateConfig, args, ("run",), sampling_problems)
    assert not (tmp_path / "no-such-run").exists()
