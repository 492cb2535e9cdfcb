"""Cross-field checks of the typed config, all reported at once, before any expensive work."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import math

from gemma_ft.config import Config
from gemma_ft.data.formats import FORMATS
from gemma_ft.errors import ConfigError

REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
# Seeds reach numpy, whose seeds are unsigned 32-bit integers.
SEED_RANGE = (0, 2**32 - 1)
# The dtypes a model can be trained in (names of torch dtypes).
TRAINING_DTYPES = ("bfloat16", "float16", "float32")


def optimizer_names() -> list[str]:
    """The optimizers the Trainer knows: transformers' OptimizerNames."""
    return _transformers_enum_values("training_args.py", "OptimizerNames")


def scheduler_names() -> list[str]:
    """The learning-rate schedules the Trainer knows: transformers' SchedulerType."""
    return _transformers_enum_values("trainer_utils.py", "SchedulerType")


@functools.lru_cache(maxsize=None)
def _transformers_enum_values(module_file: str, enum: str) -> list[str]:
    """The string values of an enum class in transformers, read from its source: importing transformers takes
    seconds and prints torch's and bitsandbytes' warnings, which would bury the one-line error."""
    import ast
    from importlib.util import find_spec
    from pathlib import Path

    source = Path(find_spec("transformers").origin).with_name(module_file).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == enum:
            return [statement.value.value for statement in node.body
                    if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)]
    raise LookupError(f"transformers' {module_file} has no enum {enum}")


def non_finite_floats(node, prefix: str = "") -> list[str]:
    """Every float in the config that is inf or nan, as "key=value"."""
    found = []
    for field in dataclasses.fields(node):
        value, key = getattr(node, field.name), prefix + field.name
        if dataclasses.is_dataclass(value):
            found += non_finite_floats(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"{key}={value}")
    return found


def _is_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def problems(cfg: Config, has_cuda: bool | None = None) -> list[str]:
    """Every problem with `cfg`; `has_cuda` (detected when None) decides the GPU-only settings."""
    found = []
    if has_cuda is None:
        has_cuda = _has_cuda()

    def require(ok: bool, message: str) -> None:
        if not ok:
            found.append(message)

    for item in non_finite_floats(cfg):
        found.append(f"{item} must be a finite number")
    require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0 (e.g. 2e-4)")
    optimizers = optimizer_names()
    require(cfg.optim.name in optimizers,
            f"optim.name={cfg.optim.name!r} is not an optimizer transformers knows; choose one of {', '.join(optimizers)}")
    schedulers = scheduler_names()
    require(cfg.optim.lr_scheduler_type in schedulers,
            f"optim.lr_scheduler_type={cfg.optim.lr_scheduler_type!r} is not a scheduler transformers knows; choose one "
            f"of {', '.join(schedulers)}")
    require(not cfg.optim.max_grad_norm < 0,
            f"optim.max_grad_norm={cfg.optim.max_grad_norm} must be >= 0 (0: no clipping)")
    require(cfg.model.dtype is None or cfg.model.dtype in TRAINING_DTYPES,
            f"model.dtype={cfg.model.dtype!r} must be null (unsloth chooses) or one of {', '.join(TRAINING_DTYPES)}")
    require(cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0 (e.g. 0.001)")
    require(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0")
    require(cfg.lora.r > 0, f"lora.r={cfg.lora.r} must be > 0 (e.g. 16)")
    require(cfg.lora.alpha > 0, f"lora.alpha={cfg.lora.alpha} must be > 0 (e.g. equal to lora.r)")
    require(0 <= cfg.lora.dropout < 1, f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    require(bool(cfg.lora.target_modules) or cfg.model.full_finetuning,
            "lora.target_modules is empty; list the projections to adapt (e.g. [q_proj, v_proj])")
    require(cfg.lora.bias in ("none", "all", "lora_only"), f"lora.bias={cfg.lora.bias!r} must be none, all or lora_only")
    t = cfg.train
    for key, seed in (("train.seed", t.seed), ("data.split_seed", cfg.data.split_seed)):
        require(SEED_RANGE[0] <= seed <= SEED_RANGE[1], f"{key}={seed} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    require(not t.num_train_epochs <= 0, f"train.num_train_epochs={t.num_train_epochs} must be > 0")
    require(t.max_new_tokens > 0, f"train.max_new_tokens={t.max_new_tokens} must be > 0")
    require(t.max_steps == -1 or t.max_steps > 0,
            f"train.max_steps={t.max_steps} must be > 0, or -1 to train for train.num_train_epochs")
    require(t.per_device_train_batch_size > 0, f"train.per_device_train_batch_size={t.per_device_train_batch_size} must be > 0")
    require(t.per_device_eval_batch_size > 0, f"train.per_device_eval_batch_size={t.per_device_eval_batch_size} must be > 0")
    require(t.gradient_accumulation_steps > 0, f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must be > 0")
    require(t.max_seq_length >= 32, f"train.max_seq_length={t.max_seq_length} is too small for the chat template; use >= 32")
    require(t.save_steps > 0, f"train.save_steps={t.save_steps} must be > 0")
    require(t.save_total_limit > 0, f"train.save_total_limit={t.save_total_limit} must be > 0")
    require(t.logging_steps > 0, f"train.logging_steps={t.logging_steps} must be > 0")
    require(t.eval_steps >= 0, f"train.eval_steps={t.eval_steps} must be >= 0 (0: evaluate at the end only)")
    require(t.exact_match_rows >= 0, f"train.exact_match_rows={t.exact_match_rows} must be >= 0")
    require(t.sampling in ("random", "group_by_length"), f"train.sampling={t.sampling!r} must be random or group_by_length")
    require(t.batching in ("auto", "padded", "packed"), f"train.batching={t.batching!r} must be auto, padded or packed")
    require(t.tokens_per_step is None or t.tokens_per_step >= t.max_seq_length,
            f"train.tokens_per_step={t.tokens_per_step} must be >= train.max_seq_length={t.max_seq_length} "
            "(a packed step holds the longest row whole), or null to choose it from the GPU's memory")
    require(cfg.lora.use_gradient_checkpointing in ("auto", "unsloth", True, False),
            f"lora.use_gradient_checkpointing={cfg.lora.use_gradient_checkpointing!r} must be auto, unsloth, true or false")
    require(t.report_to in REPORT_TO, f"train.report_to={t.report_to!r} must be one of {', '.join(REPORT_TO)}")
    d = cfg.data
    require(d.val_size > 0, f"data.val_size={d.val_size} must be > 0: the run evaluates on held-out rows")
    require(d.val_size < 1 or float(d.val_size).is_integer(),
            f"data.val_size={d.val_size}: use a fraction in (0, 1) or a whole number of rows")
    require(d.format in FORMATS, f"data.format={d.format!r} must be one of {', '.join(FORMATS)}")
    require(d.on_bad_rows in ("error", "skip"), f"data.on_bad_rows={d.on_bad_rows!r} must be error or skip")
    require(d.control_tokens in ("error", "escape", "strip"),
            f"data.control_tokens={d.control_tokens!r} must be error, escape or strip")
    require(d.delimiter is None or len(d.delimiter) == 1, f"data.delimiter={d.delimiter!r} must be one character")
    require(_is_codec(d.encoding), f"data.encoding={d.encoding!r} is not a text encoding Python knows (e.g. utf-8, "
                                   "latin-1, cp1252)")
    require(not (cfg.model.load_in_4bit and cfg.model.full_finetuning),
            "model.load_in_4bit=true with model.full_finetuning=true: 4-bit weights cannot be fully fine-tuned; "
            "turn one off")
    require(has_cuda or not cfg.model.load_in_4bit,
            "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes) and this machine has none; "
            "set model.load_in_4bit=false (gemma_ft refuses rather than silently training in 16 bit)")
    require(has_cuda or "8bit" not in cfg.optim.name,
            f"optim.name={cfg.optim.name} needs a CUDA GPU (bitsandbytes) and this machine has none; "
            "use optim=adamw (adamw_torch)")
    require(cfg.debug.example_index >= 0, f"debug.example_index={cfg.debug.example_index} must be >= 0")
    return found


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: Config, has_cuda: bool | None = None) -> None:
    found = problems(cfg, has_cuda)
    if found:
        raise ConfigError("; ".join(found))
