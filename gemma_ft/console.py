"""What a run prints: one line per stage, one bar for training (the latest losses beside it), one for each evaluation
and one for exact match, then the metrics. The libraries' own progress bars (dataset maps, weight loading), their
info logs and the warnings that ask nothing of the user are silenced; `debug.verbose=true` shows them all."""

from __future__ import annotations

import logging
import warnings

# Loggers of the libraries under the runner: at INFO (Hydra's default for the run's log) they repeat what our own
# stage lines say, or report internals ("Disabling Tensorflow because USE_TORCH is set").
LIBRARY_LOGGERS = ("datasets", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes",
                   "torch", "filelock", "httpx", "huggingface_hub")

# Warnings that ask nothing of a gemma_ft user, each with why.
UNINFORMATIVE_WARNINGS = (
    # peft, when the trained output head is tied to the input embedding: the merged and GGUF exports untie it
    # themselves (gemma_ft.export.merged_model).
    r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
    # bitsandbytes on a CPU without the optional `kernels` package: 4-bit is refused on a CPU anyway.
    r".*gemm_4bit_forward.*",
    # torch, about enums that unsloth registers for torch.compile.
    r".*is an Enum subclass and is now natively supported by torch.compile.*",
)


class ConsoleFormatter(logging.Formatter):
    """A record's message alone, led by "Warning:" or "Error:" above INFO (conf/config.yaml's console handler)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"Error: {message}"
        return f"Warning: {message}" if record.levelno >= logging.WARNING else message


class RunLogFileHandler(logging.Handler):
    """The run's log file (conf/config.yaml's file handler), opened only once the run owns its directory.

    Until `open_run_logs` is called, records wait in memory: a command refused by a check (a finished run, a run dir
    in use, a resume with other settings) leaves the directory byte for byte as it was, its log included.
    """

    MAX_WAITING = 10_000  # records kept before the file opens; a refused command logs a handful

    def __init__(self, filename: str, mode: str = "a", encoding: str = "utf-8"):
        super().__init__()
        self.filename, self.mode, self.encoding = filename, mode, encoding
        self.waiting: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.waiting) < self.MAX_WAITING:
            self.waiting.append(record)

    def open(self) -> None:
        if self.file is not None:
            return
        self.file = logging.FileHandler(self.filename, mode=self.mode, encoding=self.encoding)
        self.file.setFormatter(self.formatter)
        self.file.setLevel(self.level)
        for record in self.waiting:
            self.file.emit(record)
        self.waiting.clear()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.waiting.clear()
        super().close()


def open_run_logs() -> None:
    """Start writing the run's log file (see RunLogFileHandler); without Hydra's logging set up, nothing to do."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFileHandler):
            handler.open()


def quiet_libraries(verbose: bool) -> None:
    """Before the libraries load: silence what they print that tells the user nothing, unless `verbose`."""
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    for message in UNINFORMATIVE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_library_progress(verbose: bool) -> None:
    """Once the libraries are imported: their own progress bars off (ours and the trainer's stay)."""
    if verbose:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def progress_callback(verbose: bool):
    """The trainer's progress bar: with `verbose` as transformers draws it (every log printed as a dict), else with
    the latest train and eval loss shown on the bar itself."""
    from transformers.trainer_callback import ProgressCallback

    class LossesOnTheBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            shown = {key: f"{logs[key]:.4g}" for key in ("loss", "eval_loss") if key in logs}
            if shown:
                self.losses = {**getattr(self, "losses", {}), **shown}
                self.training_bar.set_postfix(self.losses, refresh=True)

    return ProgressCallback() if verbose else LossesOnTheBar()
