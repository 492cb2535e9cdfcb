"""Data file -> conversations -> seeded train/validation split.

The file is read and checked completely before any model work starts, so a bad file costs seconds, not a model
load. Every problem is a DataError whose message names the file, line (or record) and field, and how to fix it.
Reading is `gemma_ft.data.readers`; the shapes a conversation may take are `gemma_ft.data.formats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import re
from dataclasses import astuple, dataclass
from importlib.resources import files
from pathlib import Path

from gemma_ft.config import DataConfig
from gemma_ft.data.formats import BadRecord, check_columns, check_turn_order, detect_format, turns_of
from gemma_ft.data.readers import Records, read_records
from gemma_ft.errors import DataError

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"
BUILTIN_SUFFIXES = (".csv", ".jsonl")
# Added tokens that are text the model reads as such, not control: HTML tags (<b>, </table>) and runs of spaces or
# newlines, which Gemma 3's tokenizer adds as single tokens.
_TEXT_TAG = re.compile(r"</?[a-z][a-z0-9]*>")


@dataclass(frozen=True)
class Conversation:
    """One conversation: earlier exchanges, then the last user turn and the reply to it (the one exact match and
    generation compare against). Every assistant turn, earlier ones included, is trained on."""

    row: int  # 1-based position of the record in its file: the CSV line (header = line 1), the JSONL line, ...
    system: str | None
    user: str
    assistant: str
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) exchanges, oldest first

    def messages(self, include_reply: bool = True) -> list[dict]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        turns.append({"role": "user", "content": self.user})
        if include_reply:
            turns.append({"role": "assistant", "content": self.assistant})
        return turns

    def texts(self) -> list[str]:
        """Every text of the conversation, in order: system (or ""), then user and assistant turns."""
        return [self.system or "", *(text for pair in self.history for text in pair), self.user, self.assistant]

    def with_texts(self, texts: list[str]) -> Conversation:
        """The same conversation with its texts replaced, in the order `texts()` gives them."""
        pairs = tuple((texts[i], texts[i + 1]) for i in range(1, len(texts) - 2, 2))
        return dataclasses.replace(self, system=texts[0] or None, history=pairs, user=texts[-2], assistant=texts[-1])


@dataclass(frozen=True)
class Split:
    train: list[Conversation]
    validation: list[Conversation]


def split_digest(split: Split) -> str:
    """A fingerprint of the rows in each part of the split, in order: equal only for the same rows and split."""
    digest = hashlib.sha256()
    for part in (split.train, split.validation):
        digest.update(json.dumps([astuple(c) for c in part]).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def resolve_data_path(path: str) -> Path:
    """A builtin sample, or a path; relative paths resolve against the directory the command started in."""
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        for suffix in BUILTIN_SUFFIXES:
            candidate = Path(str(files("gemma_ft.data").joinpath(f"{name}{suffix}")))
            if candidate.is_file():
                return candidate
        raise DataError(f"data.path={path!r}: there is no builtin data set {name!r}; try builtin:chess_sample or "
                        "builtin:multi_turn_sample")
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link that leads back to itself, among others
        raise DataError(f"data.path={path!r} cannot be followed ({exc}); point data.path at the file itself") from None


def load_conversations(cfg: DataConfig, require_reply: bool = True) -> list[Conversation]:
    """Read, check and map every record of the file named by `cfg.path`.

    `require_reply=False` reads prompts to answer: a conversation may end with a user turn (its reply is then "")
    and the columns format needs no assistant column."""
    path = resolve_data_path(cfg.path)
    return conversations_from_records(read_records(path, cfg.encoding, cfg.delimiter), cfg, require_reply)


def conversations_from_records(records: Records, cfg: DataConfig, require_reply: bool = True) -> list[Conversation]:
    path = records.path
    fmt = detect_format(records, cfg)
    if fmt == "columns":
        if not require_reply:  # prompts to answer: no reply column, and the system column only where the file has it
            system = cfg.columns.system if cfg.columns.system in records.fields else None
            cfg = dataclasses.replace(cfg, columns=dataclasses.replace(cfg.columns, assistant=None, system=system))
        check_columns(records, cfg)
    elif path.suffix.lower() in (".csv", ".tsv"):
        raise DataError(f"{path}: data.format={fmt} needs JSON turns; a CSV holds one exchange per row "
                        "(data.format=columns), or write the conversations as JSON Lines")
    conversations, bad = [], []
    for position, record in records.rows:
        try:
            turns = turns_of(record, fmt, cfg)
            check_turn_order(turns, require_reply)
        except BadRecord as problem:
            bad.append((position, str(problem)))
            continue
        conversations.append(_conversation(position, turns, cfg.system_prompt))
    if bad and cfg.on_bad_rows == "error":
        position, problem = bad[0]
        raise DataError(
            f"{path}: {records.unit} {position} {problem} ({len(bad)} bad record(s) in all); fix them, or set "
            "data.on_bad_rows=skip to drop them"
        )
    if bad:
        log.warning("Skipped %d bad record(s) of %s (data.on_bad_rows=skip), first %s %d: %s", len(bad), path,
                    records.unit, *bad[0])
    if not conversations:
        raise DataError(f"{path}: every record was dropped ({len(bad)} bad); nothing is left to train on")
    replies = sum(len(c.history) + 1 for c in conversations)
    log.info("Read %d conversations (%s format, %d replies) from %s", len(conversations), fmt, replies, path)
    return conversations


def _conversation(position: int, turns: list[tuple[str, str]], system_prompt: str | None) -> Conversation:
    system = system_prompt
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    texts = [text for _, text in turns]
    if len(texts) % 2:  # a prompt still to be answered
        texts.append("")
    pairs = [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]
    return Conversation(position, system or None, pairs[-1][0], pairs[-1][1], tuple(pairs[:-1]))


def control_token_ids(tokenizer) -> set[int]:
    """The tokenizer's control tokens: every token it marks special (<bos>, <start_of_turn>, <unused12>, ...) and
    every other token added to it (image markers, [multimodal], ...) except HTML tags and whitespace runs."""
    ids = {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    for token_id, token in tokenizer.added_tokens_decoder.items():
        text = token.content
        if token.special or (text.replace("\u2581", " ").strip() and not _TEXT_TAG.fullmatch(text)):
            ids.add(token_id)
    return ids


def apply_control_token_policy(conversations: list[Conversation], tokenizer, policy: str,
                               source: str) -> list[Conversation]:
    """Control tokens inside the data's own text would become special tokens or turn boundaries: refuse them
    (policy "error", naming the row), or neutralise them ("escape": a zero-width joiner after their first
    character, so they stay readable but match no token; "strip": removed). Found by tokenising every cell."""
    control = control_token_ids(tokenizer)
    per_row = [c.texts() for c in conversations]
    texts = [text for row in per_row for text in row]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    spans = [[(start, end) for token, (start, end) in zip(ids, offsets) if token in control and end > start]
             for ids, offsets in zip(encoded.input_ids, encoded.offset_mapping)]
    owner = [index for index, row in enumerate(per_row) for _ in row]  # text -> its conversation
    flagged = sorted({conversations[owner[i]].row for i, found in enumerate(spans) if found})
    if not flagged:
        return conversations
    if policy == "error":
        first = next(i for i, found in enumerate(spans) if found)
        start, end = spans[first][0]
        raise DataError(
            f"{source}: {len(flagged)} row(s) contain the tokenizer's control text such as "
            f"{texts[first][start:end]!r} (first at row {flagged[0]}); remove it, or set data.control_tokens=escape "
            "or strip"
        )
    result, i = [], 0
    for conversation, row in zip(conversations, per_row):
        changed = [_neutralise(text, spans[i + k], policy) if spans[i + k] else text for k, text in enumerate(row)]
        i += len(row)
        # Stripped to nothing, a reply would train the model to answer with nothing (a user turn, to ask nothing).
        emptied = [k for k, text in enumerate(changed) if k > 0 and row[k].strip() and not text.strip()]
        if emptied:
            kind = "reply" if emptied[0] % 2 == 0 else "user turn"
            raise DataError(
                f"{source}: row {conversation.row}: a {kind} is nothing but control text, so "
                "data.control_tokens=strip leaves it empty; remove that row, or set data.control_tokens=escape")
        result.append(conversation.with_texts(changed) if changed != row else conversation)
    return result


def _neutralise(text: str, spans: list[tuple[int, int]], policy: str) -> str:
    for start, end in sorted(spans, reverse=True):
        replacement = "" if policy == "strip" else text[start] + "\u200d" + text[start + 1:end]
        text = text[:start] + replacement + text[end:]
    return text


def split_conversations(conversations: list[Conversation], val_size: float, seed: int) -> Split:
    """Seeded hold-out: the same rows for the same seed and file in every run and every sweep job."""
    n = len(conversations)
    n_val = int(val_size) if val_size >= 1 else math.ceil(n * val_size)
    if n_val <= 0 and val_size > 0:
        n_val = 1
    if n_val >= n:
        raise DataError(
            f"data.val_size={val_size} holds out {n_val} of {n} rows and leaves none to train on; lower it"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    return Split(
        train=[c for i, c in enumerate(conversations) if i not in held_out],
        validation=[c for i, c in enumerate(conversations) if i in held_out],
    )
