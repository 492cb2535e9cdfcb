"""Tokenizer and model loading through unsloth (GPU backend on CUDA, its CPU backend elsewhere)."""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_ft.config import LoraConfig, ModelConfig
from gemma_ft.errors import ConfigError
from gemma_ft.models.builtin import is_builtin, resolve_builtin

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for every model: builtin ones are built, hub ones downloaded (or found in the hub cache)."""
    if is_builtin(name_or_path):
        return str(resolve_builtin(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path!r} is a folder without config.json; "
                              "point it at a Hugging Face model folder")
        return str(local.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ConfigError(f"model.name_or_path={name_or_path!r} does not exist; point it at a local model folder, "
                          "a hub id such as unsloth/gemma-3-270m-it, or builtin:gemma3-270m")
    return _download(name_or_path)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    log.info("Fetching %s from the Hugging Face hub (or its local cache) ...", repo_id)
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except RepositoryNotFoundError:
        raise ConfigError(f"model.name_or_path={repo_id!r} is not a model on the Hugging Face hub (or needs a "
                          "login: set HF_TOKEN); check the name") from None
    except Exception as exc:  # offline, DNS, proxy, timeouts: all mean the hub cannot be reached
        raise ConfigError(
            f"model.name_or_path={repo_id!r}: the Hugging Face hub is unreachable ({type(exc).__name__}) and the "
            "model is not in the local cache; download it where the hub is reachable and set model.name_or_path "
            "to that folder, or use model=gemma3_270m (embedded, offline)"
        ) from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def load_model(cfg: ModelConfig, name_or_path: str, max_seq_length: int):
    """The base model via unsloth's FastModel (its own tokenizer is dropped: ours carries the checked template)."""
    from unsloth import FastModel

    import torch

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model, _ = FastModel.from_pretrained(
        model_name=name_or_path,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=cfg.load_in_4bit,
        full_finetuning=cfg.full_finetuning,
    )
    return model


def check_target_modules(model_path: str, cfg: LoraConfig) -> None:
    """Every lora.target_modules name must be a linear layer of the model, checked on its config alone (an empty
    skeleton on the meta device, no weights) before the run writes anything: PEFT would only refuse it after the
    model has loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    wanted = [name for name in cfg.target_modules if name != "all-linear"]
    if not wanted:
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    except Exception as exc:  # an architecture transformers cannot build here: PEFT checks it at load time
        log.debug("lora.target_modules not checked before loading: %s", exc)
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear) and name})
    unknown = [name for name in wanted if name not in linear]
    if unknown:
        raise ConfigError(f"lora.target_modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                          f"linear layer of {model_path}; its linear layers are {linear}")


def add_lora_adapters(model, cfg: LoraConfig, seed: int, gradient_checkpointing):
    """Wrap the model in LoRA adapters as `cfg` says, with the checkpointing the batch plan chose; plain Python
    values only (OmegaConf nodes break saving)."""
    from unsloth import FastModel

    modules_to_save = []
    if cfg.train_lm_head:
        modules_to_save.append("lm_head")
    if cfg.train_embeddings:
        modules_to_save.append("embed_tokens")
    return FastModel.get_peft_model(
        model,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias=cfg.bias,
        use_gradient_checkpointing=gradient_checkpointing,
        random_state=seed,
        use_rslora=cfg.use_rslora,
        modules_to_save=modules_to_save or None,
    )
