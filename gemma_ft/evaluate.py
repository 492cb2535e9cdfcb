"""Evaluate a finished run on a data file: `python -m gemma_ft.evaluate run=outputs/<run> file=test.csv`.

Reads any format training reads (CSV, JSONL, Parquet, ...), with the run's column mapping and chat template; reports the loss on the assistant's replies (token-weighted
mean, the same masking as training) and the exact match of greedy answers; writes <run>/eval_<file stem>.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.commands import data_file_problems, guard_command
from gemma_ft.errors import UserError, fail

PROGRAM = "gemma_ft.evaluate"


@dataclass
class EvaluateConfig:
    run: str = MISSING
    file: str = MISSING
    max_new_tokens: int = 64
    batch_size: int = 8


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def masked_loss(model, tokenizer, conversations, max_seq_length: int) -> float:
    """Mean cross-entropy over the reply tokens (labels masked exactly as in training)."""
    import torch
    from tqdm import tqdm

    from gemma_ft.data.encoding import IGNORE_INDEX, encode_conversations

    rows = encode_conversations(tokenizer, conversations, max_seq_length)
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in zip(rows.input_ids, rows.labels)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in tqdm(dataset, desc="Eval loss", unit="row"):
            labels = torch.tensor(row["labels"][1:], device=model.device)
            if (labels != IGNORE_INDEX).sum() == 0:
                continue
            logits = model(input_ids=torch.tensor([row["input_ids"]], device=model.device)).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_run(run_dir: str | Path, file: str, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    from gemma_ft.data.conversations import apply_control_token_policy, load_conversations
    from gemma_ft.finished_run import load_finished_run, run_config
    from gemma_ft.run_dir import atomic_write_text

    # The file is read before the model loads (seconds on the tiny model, minutes on a 27B): a bad file costs seconds.
    conversations = load_conversations(dataclasses.replace(run_config(Path(run_dir).expanduser().resolve()).data,
                                                           path=file))
    run = load_finished_run(run_dir)
    from gemma_ft.replies import exact_match, generate_replies

    conversations = apply_control_token_policy(conversations, run.tokenizer, run.cfg.data.control_tokens, file)
    replies = generate_replies(run.model, run.tokenizer, conversations, max_new_tokens, batch_size=batch_size)
    result = {
        "file": str(Path(file).resolve()),
        "rows": len(conversations),
        "eval_loss": masked_loss(run.model, run.tokenizer, conversations, run.cfg.train.max_seq_length),
        "exact_match": exact_match(replies, conversations),
    }
    out = run.run_dir / f"eval_{Path(file).stem}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"Written to {out}")
    return result


def evaluate_problems(cfg: EvaluateConfig) -> list[str]:
    found = data_file_problems("file", cfg.file)
    for key in ("max_new_tokens", "batch_size"):
        if getattr(cfg, key) <= 0:
            found.append(f"{key}={getattr(cfg, key)} must be > 0")
    return found


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg) -> None:
    cfg = OmegaConf.to_object(cfg)
    try:
        evaluate_run(cfg.run, cfg.file, cfg.max_new_tokens, cfg.batch_size)
    except UserError as exc:
        fail(PROGRAM, str(exc))


def cli() -> None:
    guard_command(PROGRAM, "evaluate", EvaluateConfig, __doc__, required=("run", "file"), problems=evaluate_problems)
    main()


if __name__ == "__main__":
    cli()
