"""Typed schema of the whole config: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Every YAML under conf/<group>/ starts with `defaults: [<group>_schema, _self_]`, so a wrong type or an unknown
key fails when Hydra composes the config and names the key. Cross-field rules live in `validate`, which reports
every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    # A local folder, a hub id, or "builtin:<name>" for a model gemma_ft builds offline (see gemma_ft/models).
    name_or_path: str = MISSING
    load_in_4bit: bool = False
    full_finetuning: bool = False
    # null lets unsloth choose (bf16 where the hardware has it).
    dtype: Optional[str] = None
    # An instruction-tuned model already ends its replies with <end_of_turn>; conf/lora/default.yaml trains the
    # output head only for a base model, which must learn to.
    instruction_tuned: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Train the output head / input embeddings fully (saved whole with the adapter).
    train_lm_head: bool = False
    train_embeddings: bool = False
    bias: str = "none"
    # auto: off on a GPU unless its first step runs out of memory, then unsloth's offloaded one (gemma_ft/batching.py);
    # or unsloth | true | false
    use_gradient_checkpointing: Any = "auto"
    use_rslora: bool = False


@dataclass
class ColumnsConfig:
    system: Optional[str] = "task"
    user: str = "input"
    assistant: str = "expected_output"
    # messages / sharegpt formats: the field holding each conversation's list of turns
    # (null: "messages" for the messages format, "conversations" for ShareGPT).
    messages: Optional[str] = None


@dataclass
class DataConfig:
    # A .csv/.tsv, .jsonl/.json or .parquet file, or a folder written by datasets' save_to_disk; a relative path is
    # resolved against the directory the command was started in. "builtin:NAME" is a sample shipped in the package.
    path: str = "builtin:chess_sample"
    # auto | columns (one exchange per record, data.columns) | messages ([{role, content}]) |
    # sharegpt ([{from, value}]); auto: messages or sharegpt when the first record has that list, else columns.
    format: str = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # Used only when columns.system is null: a fixed system text for every row (null: none).
    system_prompt: Optional[str] = None
    # Held-out validation rows: a fraction in (0, 1) or a row count >= 1.
    val_size: float = 0.1
    split_seed: int = 3407
    encoding: str = "utf-8"
    # null: detect "," ";" or tab from the header line.
    delimiter: Optional[str] = None
    on_bad_rows: str = "error"  # error | skip
    control_tokens: str = "error"  # error | escape | strip


@dataclass
class OptimConfig:
    name: str = "adamw_torch"
    lr: float = 2e-4
    weight_decay: float = 0.001
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 5
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 60
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # random | group_by_length (batches of similar length: far less padding on data with a spread of lengths)
    sampling: str = "group_by_length"
    max_seq_length: int = 512
    # padded: batches of per_device_train_batch_size rows padded to the longest; packed: whole rows packed into
    # bins of tokens_per_step tokens (one fixed shape); auto: packed on a CUDA GPU, padded on a CPU.
    batching: str = "auto"
    # Tokens per packed step and device (null: 16384, halved if the first step runs out of GPU memory).
    tokens_per_step: Optional[int] = None
    logging_steps: int = 5
    eval_steps: int = 20  # 0: evaluate only at the end
    save_steps: int = 500
    save_total_limit: int = 5
    seed: int = 3407
    report_to: str = "tensorboard"  # tensorboard | wandb | mlflow | none
    # Held-out rows answered by generation before and after training (exact match); 0 turns it off.
    exact_match_rows: int = 32
    max_new_tokens: int = 64


@dataclass
class DebugConfig:
    verbose: bool = False
    show_examples: bool = False
    example_index: int = 100
    # Print Python tracebacks for user errors too.
    traceback: bool = False


@dataclass
class RunConfig:
    # A stable name gives the run dir outputs/<name>, so re-running the same command resumes it.
    name: Optional[str] = None
    # An explicit run directory (overrides name and Hydra's dir).
    dir: Optional[str] = None
    # auto: continue from the newest complete checkpoint in the run dir; never: start fresh; or a checkpoint path.
    resume: str = "auto"
    # Replace a finished run's adapter and metrics (otherwise a finished run is never overwritten).
    overwrite: bool = False
    # Resume a checkpoint even though settings that shape training differ from its run's (both are recorded).
    resume_changed: bool = False


@dataclass
class Config:
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = MISSING
    debug: DebugConfig = MISSING
    run: RunConfig = field(default_factory=RunConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "debug": DebugConfig,
}


def register_configs() -> None:
    """Register the schemas and resolvers; idempotent, so tests and the CLI can both call it."""
    # conf/config.yaml names the run dir outputs/<run.name> when a name is given, else by date and time.
    OmegaConf.register_new_resolver("named_or", lambda name, default: name or default, replace=True)
    # conf/lora/default.yaml: train_lm_head follows from model.instruction_tuned.
    OmegaConf.register_new_resolver("not", lambda value: not value, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def to_typed(cfg: Any) -> Config:
    """Turn a composed DictConfig into the typed Config (plain Python values, no OmegaConf nodes)."""
    if isinstance(cfg, Config):
        return cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
