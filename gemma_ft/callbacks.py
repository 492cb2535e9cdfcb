"""Trainer callbacks that make runs crash-safe."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from gemma_ft.distributed import StopVote, wait_for_everyone
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


class EvaluationInterrupted(Exception):
    """SIGINT/SIGTERM arrived during an evaluation inside training: it ends the evaluation."""


class SignalAfterTraining(Exception):
    """SIGINT/SIGTERM arrived after training, during what the run does with the trained model."""


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, stop. `received` names the signal.

    With several ranks, all stop after the same step, one step later than one process would: the ranks agree
    through a StopVote read a step after it is cast, so that no rank waits for the others at every step. At the
    last step the vote is read at once.
    """

    def __init__(self):
        self.received: str | None = None
        self._signal: str | None = None  # what this process was sent; `received` once every rank has agreed
        self._previous = {}
        self._vote = None
        self._at_once = False  # after training: a signal raises SignalAfterTraining where the program is

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            if sig not in self._previous:  # training started over after a step-down: installed already
                self._previous[sig] = signal.signal(sig, self._handle)
        if args.world_size > 1:
            self._vote = StopVote()
        return control

    def _handle(self, signum, frame):
        if self._signal:  # a second Ctrl-C: stop at once
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name
        if self._at_once:
            self.received = self._signal
            raise SignalAfterTraining(self._signal)
        log.warning("%s received: saving a checkpoint after this step, then stopping (again to abort)", self._signal)

    def on_step_end(self, args, state, control, **kwargs):
        if self._vote is None:
            stop = self._signal is not None
        else:  # ranks must stop after the same step, whichever of them saw the signal first
            stop = self._vote.last_result()
            if not stop:
                self._vote.cast(self._signal is not None)
                if state.global_step >= state.max_steps:
                    stop = self._vote.last_result()
        if stop:
            self.received = self._signal or "SIGTERM"
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        # An evaluation inside training can run for an hour on a CPU: a signal ends it at the next batch, and the
        # runner saves the step it had reached (pipeline._run). With several ranks the evaluation runs to its end:
        # they must stop at the same point.
        if self._signal and self._vote is None:
            self.received = self._signal
            raise EvaluationInterrupted(self._signal)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A signal during the evaluation after the last step came after the last on_step_end: not forgotten.
        if self._signal and self.received is None:
            self.received = self._signal
        # What follows training (exact-match generation: minutes) stops at a signal at once; the runner saves the
        # trained weights first (pipeline._run) and restores the handlers when the run ends.
        self._at_once = True
        return control

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class ReportStartupAtFirstStep(TrainerCallback):
    """Marks the trainer's set-up and the first step on the run's StartupClock, then logs where the time went."""

    def __init__(self, clock):
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.mark("trainer set-up")

    def on_step_end(self, args, state, control, **kwargs):
        if "first step" not in self.clock.phases:
            self.clock.mark("first step")
            log.info(self.clock.report())
        return control


class StopOnDivergence(TrainerCallback):
    """A NaN or inf gradient (which a NaN or inf loss always gives) stops training before the optimizer applies it.

    The weights, and every checkpoint already written, stay those of the last good step; nothing is saved or
    evaluated at the diverged step. `diverged_at_step` names the step. Under DDP the gradients are already averaged
    over the ranks here, so every rank stops at the same step.
    """

    def __init__(self):
        self.diverged_at_step: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        if not gradients or bool(torch.stack(torch._foreach_norm(gradients)).isfinite().all()):
            return control
        for parameter in model.parameters():
            parameter.grad = None  # the optimizer leaves a parameter without a gradient as it is
        self.diverged_at_step = state.global_step + 1
        control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.diverged_at_step is not None:
            control.should_save = control.should_evaluate = False
        return control


class CurrentCadenceOnResume(TrainerCallback):
    """A resumed run logs, evaluates and saves at the cadence of its current config: transformers restores
    logging_steps, eval_steps and save_steps from the checkpoint's trainer_state.json, which would keep the old."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)
        return control


class ShareCpuCores(TrainerCallback):
    """Before each training step: this process's torch threads = the cores / the training processes alive here."""

    def __init__(self, seats: Path):
        self.seats = seats
        self.seat = seats / str(os.getpid())
        self.threads: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self.seats.mkdir(parents=True, exist_ok=True)
            self.seat.write_text(f"{os.getpid()}\n")
        except OSError as exc:  # a read-only cache: this process does not take part
            log.debug("no CPU seat in %s: %s", self.seats, exc)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        from gemma_ft.cpu_share import available_cores, live_seats

        threads = max(1, available_cores() // max(1, live_seats(self.seats)))
        if threads != self.threads:
            if self.threads is not None:
                log.info("CPU: %d thread(s) per training process now (cores shared with other trainings)", threads)
            torch.set_num_threads(threads)
            self.threads = threads
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.seat.unlink(missing_ok=True)
        return control
