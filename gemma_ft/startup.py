"""Where the time to the first training step goes: a clock the runner marks as each phase ends.

It imports nothing heavy, so the runner can start it before torch and unsloth load (unsloth must be imported
before transformers, trl and peft; gemma_ft.callbacks imports transformers).
"""

from __future__ import annotations

import os
import time


class StartupClock:
    """Phases in the order they ended, each with its seconds; "process start" is the interpreter and the imports
    before the runner."""

    def __init__(self):
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {"process start": process_age_s()}
        self.compile_cache_was_warm: bool | None = None  # a cold start compiles every kernel; set by the runner

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self._last
        self._last = now

    def total(self) -> float:
        return sum(self.phases.values())

    def report(self) -> str:
        detail = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases.items())
        return f"Time to the first step: {sum(self.phases.values()):.1f} s ({detail})"


def process_age_s() -> float:
    """Seconds since this process started, 0.0 where the system does not say."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
