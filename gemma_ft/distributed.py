"""Several GPUs through torchrun (or a SLURM job of several tasks): one run dir, rank 0 writes the results.

Every rank runs the same pipeline; transformers' Trainer wraps the model in DDP and shards the batches. These
helpers keep the parts that are not the Trainer's (run dir, summaries, exact-match generation) on rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _ranks_on_gpus() -> bool:
    """Several processes (torchrun, a SLURM job of several tasks) on a machine with CUDA GPUs."""
    if world_size() <= 1:
        return False
    import torch

    return torch.cuda.is_available()


def use_local_gpu() -> None:
    """Under torchrun, make this rank's own GPU (LOCAL_RANK) the current one before anything touches CUDA.

    Otherwise the first CUDA call (importing unsloth queries the GPU) opens a context on GPU 0 from every rank:
    on two H100s, rank 1 held 716 MiB of GPU 0 for its whole run.
    """
    if "LOCAL_RANK" in os.environ and _ranks_on_gpus():
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def keep_unsloth_checkpointing_under_ddp() -> bool:
    """Under torchrun on GPUs, keep unsloth's own (offloaded, re-entrant) gradient checkpointing, as on one GPU.

    Call after importing unsloth and before loading the model. unsloth otherwise switches every model loaded in a
    distributed run to torch's non-reentrant checkpointing with saved-tensor offload hooks (unsloth PR #3751, for
    vision models, where DDP searches for unused parameters and a re-entrant backward marks a weight ready twice;
    the PR itself calls the switch a slower stop-gap). gemma_ft trains text models with that search off
    (training.py), so each trainable weight gets its gradient once per step either way. On 2 x H200 the switch
    cost 0.08 s of host time per (host-bound) step; keeping unsloth's checkpointing took the two-GPU speed-up from
    1.39x to 1.87x (benchmarks/results/2026-11-27-2xh200-ddp/, docs/multi-gpu.md). Returns whether unsloth's choice was overridden.
    """
    if not _ranks_on_gpus():  # unsloth's CPU backend checkpoints the stock way, with or without this
        return False
    import unsloth.models.vision as unsloth_vision

    if not callable(getattr(unsloth_vision, "vlm_gradient_checkpointing_reentrant", None)):
        return False  # another unsloth version: leave its choice alone
    unsloth_vision.vlm_gradient_checkpointing_reentrant = lambda: True
    return True


def load_adapters_on_own_gpu(model) -> bool:
    """Under torchrun on GPUs, make `model.load_adapter` (what the Trainer calls to resume a LoRA run) load the
    weights onto this rank's GPU.

    peft loads to device "cuda" by default, and safetensors reads a bare "cuda" as GPU 0, not the current device:
    on 2 x H200, rank 1 of a resumed run opened a context on GPU 0 there and held 518 MiB of it for the rest of
    the run. Returns whether `model.load_adapter` was wrapped.
    """
    if not (hasattr(model, "load_adapter") and _ranks_on_gpus()):
        return False
    import torch

    load_adapter = model.load_adapter
    own_gpu = f"cuda:{torch.cuda.current_device()}"

    def load_adapter_on_own_gpu(*args, torch_device=None, **kwargs):
        return load_adapter(*args, torch_device=torch_device or own_gpu, **kwargs)

    model.load_adapter = load_adapter_on_own_gpu
    return True


def wait_for_everyone() -> None:
    """A barrier across ranks (a no-op in a single process); starts the process group if nobody has yet."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def gather_from_ranks(value) -> list:
    """Every rank's `value`, in rank order, on every rank; [value] in a single process.

    Starts the process group if nobody has yet (the Trainer does when it is created).
    """
    if world_size() <= 1:
        return [value]
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_every_rank_read_the_same_rows(data_path: str, split) -> None:
    """Raise a DataError on every rank if any rank read other rows than rank 0 (a no-op in a single process).

    Each rank reads the CSV itself. One that reads it while it is still being written, or another copy on another
    node, would otherwise train on other rows (and hold out others) without a word: on 2026-11-27 one rank of a
    two-GPU benchmark run read 1,989 of 3,000 rows of a CSV that the other rank was still writing.
    """
    if world_size() <= 1:  # nothing to compare: no digest of the whole data set at every start
        return
    from gemma_ft.data.conversations import split_digest
    from gemma_ft.errors import DataError

    read = gather_from_ranks((split_digest(split), len(split.train) + len(split.validation)))
    differing = [rank for rank, (digest, _) in enumerate(read) if digest != read[0][0]]
    if differing:
        counts = ", ".join(f"rank {rank}: {read[rank][1]}" for rank in [0, *differing])
        raise DataError(f"data.path={data_path}: rank(s) {', '.join(map(str, differing))} read other rows than rank 0 "
                        f"(rows read, {counts}); every rank must read the same file: start the run once it is "
                        "completely written, and give every node the same copy")


def end_process_group() -> None:
    """Close torch.distributed at the end of a torchrun run (a no-op when it was never started).

    Without it every two-GPU run that ended on its own printed NCCL's "destroy_process_group() was not called
    before program exit, which can leak resources" (2 x H200, 2026-11-27); in one stopped run (2026-11-27)
    rank 0 was still exiting 2.4 s after that, when torchrun, seeing rank 1 gone, killed it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopVote:
    """The ranks' agreement on whether any of them was asked to stop, read one step after they vote.

    Every rank must vote at every step. Reading a vote at once would hold each rank's host, at every step, until
    both its GPU and every other rank had finished that step: a meeting where the faster rank waits for the slower,
    which DDP's own collectives do not impose on the host. Read a step later, the vote has long arrived.
    """

    def __init__(self):
        import torch

        on_gpu = torch.cuda.is_available()
        self._device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self._result = None  # the last vote: its value on the host (pinned), and on GPUs the event of its copy
        self._arrived = None

    def cast(self, stop: bool) -> None:
        import torch
        import torch.distributed as dist

        # Filled on the device: torch.tensor([...], device=cuda) copies from the host and waits for the GPU to finish
        # everything queued before it (a blocking copy synchronises its stream), the very wait the vote avoids.
        flag = torch.full((1,), 1 if stop else 0, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self._device.type == "cpu":  # gloo's all_reduce has returned with the result
            self._result = flag
            return
        if self._result is None:
            self._result = torch.zeros(1, dtype=flag.dtype, pin_memory=True)
            self._arrived = torch.cuda.Event()
        self._result.copy_(flag, non_blocking=True)
        self._arrived.record()

    def last_result(self) -> bool:
        """Whether any rank voted to stop in the last vote (False before the first); waits for it if needed."""
        if self._result is None:
            return False
        if self._arrived is not None:
            self._arrived.synchronize()
        return bool(self._result.item())


def launcher_start_time() -> float:
    """When this rank's launcher (torchrun's agent: every local rank's parent) started, in seconds since the epoch.

    Hydra would stamp each rank's run dir with that rank's own start time; the launcher's is the same for all.
    """
    ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def shared_run_dir_overrides(overrides: list[str]) -> list[str]:
    """Extra Hydra overrides that make every rank of a torchrun launch use one run dir and write it once."""
    if world_size() <= 1:
        return []
    extra = []
    if not any(o.split("=", 1)[0].lstrip("+~") in ("run.dir", "run.name", "hydra.run.dir") for o in overrides):
        extra.append("hydra.run.dir=outputs/" + time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(launcher_start_time())))
    if not is_main_process():
        # Rank 0 writes .hydra/ and the run's log file; the other ranks log to the console only.
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def export_submitit_environment() -> bool:
    """In a submitit job of several tasks (hydra/launcher=slurm with tasks_per_node > 1, or submitit_local), set
    torch's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the job's own variables, as torchrun would.
    Returns whether it did."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    # Every task keeps seeing all of the node's GPUs: LOCAL_RANK picks its own.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


@contextmanager
def submitit_tasks_as_one_run():
    """Around a sweep job: a submitit job of several tasks (GPUs) becomes one torch.distributed run, written by rank 0.

    Every task sets up Hydra's job logging, so each line reached the job's log file once per task: the other ranks
    log to their task's stderr (submitit's *_log.err) instead, as torchrun's other ranks get hydra/job_logging=stdout.
    Each such job has its processes to itself, so its process group is closed at the end; jobs of the basic launcher
    share one process (and, under torchrun, its group), which `cli` closes when the sweep ends.
    """
    if not export_submitit_environment():
        yield
        return
    if not is_main_process():
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    try:
        yield
    finally:
        end_process_group()
