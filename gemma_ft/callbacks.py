"""Trainer callbacks that make runs crash-safe."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from transformers import TrainerCallback

from gemma_ft.distributed import any_rank_received, wait_for_everyone
from gemma_ft.run_dir import COMPLETE_MARKER

log = logging.getLogger(__name__)


class MarkCheckpointComplete(TrainerCallback):
    """Writes the completion marker once the trainer has finished writing a checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()  # with several ranks, every rank's share (its RNG state) is written before the marker
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                (path / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
        return control


class LogEveryFinalStep(TrainerCallback):
    """Logs the last step too, so the logged losses cover every step (the run's true mean is computed from them)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, stop. `received` names the signal."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return control

    def _handle(self, signum, frame):
        if self.received:  # a second Ctrl-C: stop at once
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping (again to abort)", self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:  # ranks must stop after the same step, whichever of them saw the signal first
            self.received = any_rank_received(self.received)
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return control
