"""gemma_ft's StopVote across the ranks of torchrun (NCCL on GPUs, gloo on CPU): rank 1 votes to stop in round 3
of 5, and every rank must read that vote, and only that one, in round 4 (each round reads the previous vote). On
GPUs, casting a vote must not synchronise with the GPU (torch.cuda.set_sync_debug_mode("error") raises if it does).

    torchrun --nproc_per_node 2 benchmarks/stop_vote_check.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gemma_ft.distributed import StopVote, end_process_group, use_local_gpu


def main() -> None:
    use_local_gpu()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, vote, read = dist.get_rank(), StopVote(), []
    for round_ in range(1, 6):
        read.append(vote.last_result())
        if torch.cuda.is_available():  # casting must not wait for the GPU: torch raises on any synchronising call
            torch.cuda.set_sync_debug_mode("error")
        vote.cast(rank == 1 and round_ == 3)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
    expected = [False, False, False, True, False]
    print(f"rank {rank}: read {read}, {'as expected' if read == expected else f'EXPECTED {expected}'}", flush=True)
    if read != expected:
        raise SystemExit(1)


if __name__ == "__main__":
    try:
        main()
    finally:
        end_process_group()
