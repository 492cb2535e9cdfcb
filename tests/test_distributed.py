"""Several ranks (torchrun; here 2 CPU processes over gloo): one run dir, written by rank 0, same losses as one
process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_ft.distributed import shared_run_dir_overrides
from gemma_ft.pipeline import run
from tests.helpers import TINY, chess_rows, typed_config, write_csv

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run_dir / "history.json").read_text()) if "loss" in e]


def torchrun_module(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m module args...` on 2 CPU processes."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def torchrun(cwd: Path, mode: str, step: int, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m gemma_ft ...` (through the test helper that can interrupt it)."""
    return torchrun_module(cwd, "tests.helpers.interrupted_cli", mode, str(step), *overrides)


@pytest.mark.slow
def test_two_ranks_share_one_run_dir_stop_resume_and_train_like_one_process_with_the_same_global_batch(tmp_path):
    data = write_csv(tmp_path / "chess.csv", chess_rows(64))
    common = [*TINY, f"data.path={data}", "data.val_size=8", "train.sampling=random", f"train.max_steps={STEPS}",
              "train.save_steps=2"]

    # SIGTERM at the end of step 1 (on both ranks, after gemma_ft's callback): one process would stop after step 2;
    # the ranks vote at step 2 and read the vote a step later, so every rank stops after step 3 and saves checkpoint-3.
    stopped = torchrun(tmp_path, "sigterm", 1, *common, "train.per_device_train_batch_size=2")
    assert stopped.returncode != 0 and "resume" in stopped.stderr, stopped.stderr[-3000:]
    assert "SIGTERM: stopped at step 3" in stopped.stderr, stopped.stderr[-3000:]
    # No run.name given: both ranks still chose the same timestamped dir (their launcher's start time).
    [run_dir] = list((tmp_path / "outputs").glob("*/*"))
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth", "gemma_ft_complete"} <= {p.name for p in checkpoint.iterdir()}
    assert not (run_dir / "metrics.json").exists()

    resumed = torchrun(tmp_path, "none", 0, *common, "train.per_device_train_batch_size=2", f"run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stderr + resumed.stdout
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / ".hydra").is_dir()
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS

    # One process with the per-device batch doubled sees the same rows per step: the same loss curve.
    single = tmp_path / "single"
    run(typed_config([*common, "train.per_device_train_batch_size=4"]), run_dir=single)
    two_ranks, one = losses(run_dir), losses(single)
    assert len(two_ranks) == len(one) == STEPS
    assert max(abs(a - b) / b for a, b in zip(two_ranks, one)) < 0.02


def test_run_dir_is_shared_only_under_a_multi_process_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shared_run_dir_overrides([]) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert shared_run_dir_overrides(["run.name=mine"]) == []
    (stamped,) = shared_run_dir_overrides([])
    assert stamped.startswith("hydra.run.dir=outputs/")
    monkeypatch.setenv("RANK", "1")
    assert shared_run_dir_overrides(["run.dir=/x"]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def test_slurm_jobs_start_one_task_per_requested_gpu():
    from hydra import compose, initialize_config_dir

    from gemma_ft.cli_checks import CONF_DIR
    from gemma_ft.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == cfg.hydra.launcher.tasks_per_node == 4


@pytest.mark.parametrize("env, expected", [({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, [1]),
                                           ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, [])])
def test_each_rank_makes_its_own_gpu_current_before_cuda_is_used(monkeypatch, env, expected):
    import torch

    from gemma_ft.distributed import use_local_gpu

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    use_local_gpu()
    assert chosen == expected


@pytest.mark.parametrize("world, cuda, kept", [("2", True, True), ("1", True, False), ("2", False, False)])
def test_unsloth_keeps_its_own_checkpointing_only_under_ddp_on_gpus(monkeypatch, world, cuda, kept):
    import torch

    import unsloth.models.vision as unsloth_vision
    from gemma_ft.distributed import keep_unsloth_checkpointing_under_ddp

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # unsloth's own answer in a distributed run: non-reentrant (this test must notice if it is left in place)
    monkeypatch.setattr(unsloth_vision, "vlm_gradient_checkpointing_reentrant", lambda: False)
    assert keep_unsloth_checkpointing_under_ddp() is kept
    assert unsloth_vision.vlm_gradient_checkpointing_reentrant() is kept


@pytest.mark.parametrize("world, cuda, device", [("2", True, "cuda:1"), ("1", True, None), ("2", False, None)])
def test_a_resumed_rank_loads_its_adapter_onto_its_own_gpu(monkeypatch, world, cuda, device):
    import torch

    from gemma_ft.distributed import load_adapters_on_own_gpu

    class Model:  # records what the Trainer's resume would ask peft for
        def load_adapter(self, model_id, adapter_name, is_trainable=False, torch_device=None):
            self.loaded = (model_id, adapter_name, is_trainable, torch_device)

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    model = Model()
    assert load_adapters_on_own_gpu(model) is (device is not None)
    model.load_adapter("checkpoint-11", "default", is_trainable=True)
    assert model.loaded == ("checkpoint-11", "default", True, device)  # peft's own default (None -> "cuda") else
    model.load_adapter("checkpoint-11", "default", torch_device="cpu")
    assert model.loaded[3] == "cpu"  # a device the caller names wins


def test_a_slurm_job_of_several_tasks_becomes_one_torch_distributed_run(monkeypatch):
    """What a task of a 4-GPU SLURM job (hydra/launcher=slurm) sees: torch's variables, as torchrun would set them."""
    from gemma_ft.distributed import export_submitit_environment

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what the export writes is undone after the test
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu-node-7", "SLURM_PROCID": "2", "SLURM_LOCALID": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert export_submitit_environment()
    exported = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert exported == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu-node-7"}
    assert os.environ["MASTER_PORT"].isdigit()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # every task sees the node's GPUs; LOCAL_RANK picks one


def test_a_run_closes_its_process_group_at_the_end_also_when_stopped(monkeypatch, tmp_path):
    """What each torchrun rank does as `python -m gemma_ft` ends: NCCL warns at exit about a group left open."""
    import torch.distributed as dist

    import gemma_ft.pipeline as pipeline
    from gemma_ft.__main__ import cli

    def stopped(cfg, run_dir, records=None):
        raise pipeline.RunInterrupted("stopped at step 3", "SIGTERM")

    for outcome, code in ((lambda cfg, run_dir, records=None: {"eval_loss": 1.0}, None), (stopped, 143)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{code}", rank=0, world_size=1)
        monkeypatch.setattr(pipeline, "run", outcome)
        monkeypatch.setattr(sys, "argv", ["gemma_ft", f"hydra.run.dir={tmp_path}/run{code}"])
        if code is None:
            cli()
        else:
            with pytest.raises(SystemExit) as exited:
                cli()
            assert exited.value.code == code
        assert not dist.is_initialized()


def test_a_submitit_job_of_several_tasks_closes_its_process_group_and_a_basic_sweep_keeps_it_until_it_ends(
        monkeypatch, tmp_path):
    """A job of several submitit tasks has its processes to itself; the basic launcher's jobs share one (under
    torchrun, one group for every job), and the group is closed as that process ends."""
    import torch.distributed as dist

    import gemma_ft.distributed as distributed
    import gemma_ft.pipeline as pipeline
    from gemma_ft.__main__ import cli

    open_in_jobs = []
    monkeypatch.setattr(pipeline, "run", lambda cfg, run_dir, records=None: open_in_jobs.append(dist.is_initialized()) or
                        {"eval_loss": 1.0})
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store_job", rank=0, world_size=1)
        monkeypatch.setattr(distributed, "export_submitit_environment", lambda: True)
        with distributed.submitit_tasks_as_one_run():
            assert dist.is_initialized()
        assert not dist.is_initialized()

        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store_sweep", rank=0, world_size=1)
        monkeypatch.setattr(distributed, "export_submitit_environment", lambda: False)
        monkeypatch.setattr(sys, "argv", ["gemma_ft", "-m", f"hydra.sweep.dir={tmp_path}/sweep",
                                          "optim.weight_decay=0.001,0.01"])
        cli()
        assert open_in_jobs == [True, True]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_stop_a_step_after_the_signal_and_at_once_in_the_last_step(tmp_path):
    """StopOnSignal's vote (one real StopVote over a one-process gloo group) against one process's immediate stop."""
    import signal
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl

    from gemma_ft.callbacks import StopOnSignal

    def stop(world_size: int, signal_after_step: int, max_steps: int = 6):
        """(step it stopped after, checkpoint asked for, `received`), or None if training ran to the end."""
        callback, args = StopOnSignal(), SimpleNamespace(world_size=world_size)
        callback.on_train_begin(args, None, TrainerControl())
        try:
            for step in range(1, max_steps + 1):
                control = callback.on_step_end(args, SimpleNamespace(global_step=step, max_steps=max_steps),
                                               TrainerControl())
                if control.should_training_stop:
                    return step, control.should_save, callback.received
                if step == signal_after_step:
                    os.kill(os.getpid(), signal.SIGTERM)
            return None
        finally:
            callback.on_train_end(args, None, TrainerControl())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert stop(1, signal_after_step=2) == (3, True, "SIGTERM")  # one process: after the step it was sent in
        assert stop(2, signal_after_step=2) == (4, True, "SIGTERM")  # ranks: the vote cast at step 3 is read at 4
        assert stop(2, signal_after_step=5) == (6, True, "SIGTERM")  # in the last step the vote is read at once
        assert stop(2, signal_after_step=0) is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_stops_with_one_line_naming_the_csv_when_a_rank_read_other_rows(tmp_path):
    data = write_csv(tmp_path / "chess.csv", chess_rows(32))
    run_dir = tmp_path / "run"
    result = torchrun_module(tmp_path, "tests.helpers.uneven_data_cli", *TINY, f"data.path={data}", "data.val_size=4",
                             "train.max_steps=2", f"run.dir={run_dir}")  # rank 1 reads 31 of the 32 rows

    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "read other rows" in line]
    assert len(errors) == 2, result.stderr[-3000:]  # each rank stops with the same line
    assert errors[0] == errors[1] and errors[0].startswith("gemma_ft: error: ")
    assert f"data.path={data}: rank(s) 1 read other rows than rank 0 (rows read, rank 0: 32, rank 1: 31)" in errors[0]
    assert "raise DataError" not in result.stderr  # no traceback of gemma_ft's (torchrun reports the exit codes)
    assert not list(run_dir.glob("checkpoints/checkpoint-*")) and not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_two_ranks_train_and_evaluate_on_packed_bins_of_one_shape(tmp_path):
    """The packed path under torchrun: each rank trains on its own bins, all of the same token budget, and the run
    finishes with its adapter and metrics."""
    data = write_csv(tmp_path / "chess.csv", chess_rows(48))
    run_dir = tmp_path / "packed"
    result = torchrun(tmp_path, "none", 0, *TINY, f"data.path={data}", "data.val_size=8", "train.batching=packed",
                      "train.tokens_per_step=256", "train.max_steps=3", "train.eval_steps=2", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["batching"] == "packed" and metrics["tokens_per_step"] == 256 and metrics["global_step"] == 3
    assert metrics["eval_loss"] > 0 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
