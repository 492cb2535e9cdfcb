"""Talk to a finished run: `python -m gemma_ft.generate run=outputs/<run> [prompt=... | file=prompts.csv]`.

* prompt="..."        answers one prompt, streaming tokens as they come
* file=prompts.csv    answers every row of a CSV into a new column (batch inference), written to `output`
* neither             an interactive chat in the terminal (history kept; /reset clears it, /exit leaves)

The chat template and system prompt are the ones the run trained with; sampling comes from `sampling.*`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gemma_ft.cli_checks import CONF_DIR
from gemma_ft.commands import data_file_problems, guard_command
from gemma_ft.errors import UserError, fail

PROGRAM = "gemma_ft.generate"


@dataclass
class SamplingConfig:
    # The seed notebook's settings for Gemma 3.
    max_new_tokens: int = 125
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    do_sample: bool = True


@dataclass
class GenerateConfig:
    run: str = MISSING
    prompt: Optional[str] = None
    file: Optional[str] = None
    output: Optional[str] = None  # default: <file stem>.answers.csv next to the input
    column: str = "generated"  # the new column that batch inference fills
    system_prompt: Optional[str] = None  # default: the run's fixed system prompt, if it had one
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def sampling_kwargs(s: SamplingConfig, tokenizer) -> dict:
    from gemma_ft.replies import stop_token_ids

    kwargs = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample, "eos_token_id": stop_token_ids(tokenizer),
              "pad_token_id": tokenizer.pad_token_id}
    if s.do_sample:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    return kwargs


def answer(run, messages: list[dict], sampling: SamplingConfig, stream: bool = True) -> str:
    """One reply to a conversation, streamed to stdout as it is generated."""
    import torch
    from transformers import TextStreamer

    from gemma_ft.chat_template import render_text

    tokenizer = run.tokenizer
    inputs = tokenizer(render_text(tokenizer, messages, add_generation_prompt=True), return_tensors="pt")
    inputs = inputs.to(run.model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        out = run.model.generate(**inputs, streamer=streamer, **sampling_kwargs(sampling, tokenizer))
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def opening_turns(system_prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def chat(run, cfg: GenerateConfig, system_prompt: str | None) -> None:
    history = opening_turns(system_prompt)
    print("Chat with the fine-tuned model. /reset clears the history, /exit leaves.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = opening_turns(system_prompt)
            print("(history cleared)")
            continue
        if not line:
            continue
        try:
            check_prompt_control_text(line, run.tokenizer)
        except UserError as exc:
            print(str(exc).replace("prompt= contains", "that message contains"))
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        history.append({"role": "assistant", "content": answer(run, history, cfg.sampling)})


def read_prompts_file(cfg: GenerateConfig, data_cfg, system_prompt: str | None):
    """(path, records, conversations) of `cfg.file`, read as training reads its data: before the model loads, so a
    bad file costs seconds."""
    import dataclasses

    from gemma_ft.data.conversations import conversations_from_records, resolve_data_path
    from gemma_ft.data.readers import read_records

    data = dataclasses.replace(data_cfg, system_prompt=system_prompt)
    path = resolve_data_path(cfg.file)
    records = read_records(path, data.encoding, data.delimiter)
    return path, records, conversations_from_records(records, data, require_reply=False)


def answer_file(run, cfg: GenerateConfig, prompts) -> Path:
    """Batch inference: every conversation of `cfg.file` (in any format training reads; `prompts` from
    read_prompts_file) gets the reply to its last user turn, written beside its fields as `cfg.column`: a CSV in
    gives a CSV out, any other file JSON Lines."""
    import json

    from tqdm import tqdm

    from gemma_ft.data.conversations import apply_control_token_policy
    from gemma_ft.replies import generate_replies

    path, records, conversations = prompts
    conversations = apply_control_token_policy(conversations, run.tokenizer, run.cfg.data.control_tokens, str(path))
    replies = []
    for start in tqdm(range(0, len(conversations), cfg.batch_size), desc=f"Answering {len(conversations)} rows",
                      unit="batch"):
        batch = conversations[start:start + cfg.batch_size]
        replies += generate_replies(run.model, run.tokenizer, batch, cfg.sampling.max_new_tokens,
                                    batch_size=cfg.batch_size, sampling=sampling_kwargs(cfg.sampling, run.tokenizer))
    reply_at = {c.row: reply for c, reply in zip(conversations, replies)}
    answered = [(fields, reply_at[position]) for position, fields in records.rows if position in reply_at]
    as_csv = path.suffix.lower() in (".csv", ".tsv")
    default = path.with_suffix(".answers.csv" if as_csv else ".answers.jsonl")
    output = Path(cfg.output).expanduser().resolve() if cfg.output else default
    tmp = output.with_suffix(output.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        if as_csv:
            writer = csv.writer(handle)
            writer.writerow([*records.fields, cfg.column])
            writer.writerows([*fields.values(), reply] for fields, reply in answered)
        else:
            handle.writelines(json.dumps({**fields, cfg.column: reply}, ensure_ascii=False, default=str) + "\n"
                              for fields, reply in answered)
    tmp.replace(output)
    print(f"Wrote {len(replies)} answers to {output} (field {cfg.column!r})")
    return output


def sampling_problems(cfg: GenerateConfig) -> list[str]:
    """Every out-of-range or non-finite sampling value, as one message each."""
    import math

    s, found = cfg.sampling, []
    if s.max_new_tokens <= 0:
        found.append(f"sampling.max_new_tokens={s.max_new_tokens} must be > 0")
    if not (math.isfinite(s.temperature) and s.temperature > 0):
        found.append(f"sampling.temperature={s.temperature} must be a finite number > 0 (greedy: sampling.do_sample=false)")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        found.append(f"sampling.top_p={s.top_p} must be in (0, 1]")
    if s.top_k < 0:
        found.append(f"sampling.top_k={s.top_k} must be >= 0 (0: no top-k cut)")
    if cfg.batch_size <= 0:
        found.append(f"batch_size={cfg.batch_size} must be > 0")
    if cfg.prompt is not None and cfg.file is not None:
        found.append("give prompt= or file=, not both")
    if cfg.file is not None:
        found += data_file_problems("file", cfg.file)
    if cfg.output is not None:
        found += output_problems(cfg)
    return found


def output_problems(cfg: GenerateConfig) -> list[str]:
    """Where the answers may not go: a run's own files (its metrics.json, adapter/, ...) or the input file."""
    from gemma_ft.run_dir import run_owning

    output = Path(cfg.output).expanduser()
    if cfg.file is None:
        return [f"output={cfg.output} is only used with file=; give file=<data file>"]
    run = run_owning(output)
    if run is not None:
        return [f"output={cfg.output} is one of the files of the run in {run}; write the answers elsewhere, e.g. "
                "output=answers.jsonl"]
    if output.absolute() == Path(cfg.file).expanduser().absolute():
        return [f"output={cfg.output} is the input file; write the answers elsewhere"]
    return []


def generate(cfg: GenerateConfig) -> None:
    from gemma_ft.finished_run import load_finished_run, run_config

    run_cfg = run_config(Path(cfg.run).expanduser().resolve())
    system_prompt = cfg.system_prompt if cfg.system_prompt is not None else run_cfg.data.system_prompt
    prompts = read_prompts_file(cfg, run_cfg.data, system_prompt) if cfg.file is not None else None
    run = load_finished_run(cfg.run)
    if cfg.prompt is not None:
        check_prompt_control_text(cfg.prompt, run.tokenizer)
        answer(run, [*opening_turns(system_prompt), {"role": "user", "content": cfg.prompt}], cfg.sampling)
    elif prompts is not None:
        answer_file(run, cfg, prompts)
    else:
        chat(run, cfg, system_prompt)


def check_prompt_control_text(prompt: str, tokenizer) -> None:
    """A prompt holding the tokenizer's control text (<end_of_turn>, <start_of_turn>model, ...) would forge turns
    of the template, as training and file= refuse it."""
    from gemma_ft.data.conversations import control_token_ids

    control = control_token_ids(tokenizer)
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    found = [prompt[start:end] for token, (start, end) in zip(encoded.input_ids, encoded.offset_mapping)
             if token in control and end > start]
    if found:
        raise UserError(f"prompt= contains the control text {found[0]!r}; remove it: the chat template adds the turn "
                        "markers itself")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg) -> None:
    try:
        generate(OmegaConf.to_object(cfg))
    except UserError as exc:
        fail(PROGRAM, str(exc))


def cli() -> None:
    guard_command(PROGRAM, "generate", GenerateConfig, __doc__, problems=sampling_problems)
    main()


if __name__ == "__main__":
    cli()
