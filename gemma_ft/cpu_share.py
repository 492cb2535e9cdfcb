"""Training processes on one CPU machine share its cores instead of fighting over them.

Each process starts one thread per core, and OpenMP's threads spin while they wait: two trainings on 2 cores took
8.0x the time of one (the embedded 270M, 8 steps, 203.7 s against 25.6 s), where a fair share is 2x. So on a machine
without a CUDA GPU, every training process takes a seat (a file named by its pid under
<GEMMA_FT_CACHE>/cpu_seats) and, before each step, sets its threads to the cores divided by the live seats; and a
process that starts while another trains tells the OpenMP runtime to sleep rather than spin while it waits
(`OMP_WAIT_POLICY=PASSIVE`, which must be set before torch loads). A user's own OMP_NUM_THREADS or OMP_WAIT_POLICY
wins. Measured: benchmarks/cpu_contention.py. This
module imports nothing heavy (the CLI calls it before torch loads); the callback is gemma_ft.callbacks.ShareCpuCores.
"""

from __future__ import annotations

import os
from pathlib import Path


def seats_dir() -> Path:
    from gemma_ft.models.builtin import cache_dir

    return cache_dir() / "cpu_seats"


def sleep_while_waiting() -> None:
    """Before torch loads, when another training already runs here: OpenMP threads sleep instead of spinning
    between parallel regions (unless the user set OMP_WAIT_POLICY). Alone, a process keeps OpenMP's default: the
    sleeping policy cost a lone run 20% (22.0 s against 18.3 s for 8 steps of the 270M on 2 cores, 2026-12-08)."""
    if live_seats(seats_dir()) > 0:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def live_seats(seats: Path) -> int:
    """The training processes that hold a seat and are still running (a seat left by a killed one is removed)."""
    alive = 0
    for seat in seats.glob("[0-9]*") if seats.is_dir() else []:
        try:
            os.kill(int(seat.name), 0)
        except ProcessLookupError:
            seat.unlink(missing_ok=True)
            continue
        except (PermissionError, ValueError):
            pass
        alive += 1
    return alive


def manages_threads() -> bool:
    """Only on a machine without a CUDA GPU, and only when the user has not fixed the threads."""
    import torch

    return not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ
