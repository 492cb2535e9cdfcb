"""CSV -> conversations -> seeded train/validation split -> chat-template text.

The CSV is read and checked completely before any model work starts, so a bad file costs seconds, not a model
load. Every problem is a DataError whose message names the file, column or row and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import random
import re
from dataclasses import astuple, dataclass
from importlib.resources import files
from pathlib import Path

from gemma_ft.config import DataConfig
from gemma_ft.errors import DataError

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"
_DELIMITERS = {",": "','", ";": "';'", "\t": "'\\t' (tab)"}
# Added tokens that are text the model reads as such, not control: HTML tags (<b>, </table>) and runs of spaces or
# newlines, which Gemma 3's tokenizer adds as single tokens.
_TEXT_TAG = re.compile(r"</?[a-z][a-z0-9]*>")


@dataclass(frozen=True)
class Conversation:
    row: int  # 1-based line of the record in the CSV (header is line 1)
    system: str | None
    user: str
    assistant: str

    def messages(self, include_reply: bool = True) -> list[dict]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        turns.append({"role": "user", "content": self.user})
        if include_reply:
            turns.append({"role": "assistant", "content": self.assistant})
        return turns


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
        candidate = Path(str(files("gemma_ft.data").joinpath(f"{name}.csv")))
        if not candidate.is_file():
            raise DataError(f"data.path={path!r}: there is no builtin data set {name!r}; try builtin:chess_sample")
        return candidate
    return Path(path).expanduser().resolve()


def load_conversations(cfg: DataConfig) -> list[Conversation]:
    """Read, check and map every row of the CSV named by `cfg.path`."""
    path = resolve_data_path(cfg.path)
    header, rows = read_table(path, cfg.encoding, cfg.delimiter)
    index = _column_indices(path, header, cfg)
    conversations = _map_rows(path, rows, len(header), index, cfg)
    log.info("Read %d conversations from %s", len(conversations), path)
    return conversations


def read_table(path: Path, encoding: str = "utf-8", delimiter: str | None = None):
    """(header, [(line, cells), ...]) of a CSV, with every structural problem reported as a DataError."""
    text = _read_text(path, encoding)
    delimiter = delimiter or _detect_delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records = []
    try:
        start = 1
        for record in reader:
            # line_num is where the record ends; a quoted cell may span lines, so keep where it started.
            records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc}); check the quoting there") from None
    records = [(line, rec) for line, rec in records if any(cell.strip() for cell in rec)]
    if not records:
        raise DataError(f"{path}: the file has no header and no rows; give a CSV with a header line and data rows")
    header_line, header = records[0]
    header = [name.strip().lstrip("\ufeff") for name in header]
    rows = records[1:]
    if not rows:
        raise DataError(f"{path}: the file has a header but no data rows; add rows under {','.join(header)}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names {duplicates}; rename them so each column is unique")
    return header, rows


def _read_text(path: Path, encoding: str) -> str:
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist; point data.path at your CSV file")
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file; point data.path at a CSV file")
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a known encoding; use e.g. utf-8, latin-1, cp1252") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid {encoding} at line {line}, byte offset {exc.start} "
            f"(byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8 or set data.encoding (e.g. latin-1)"
        ) from None


def _detect_delimiter(path: Path, text: str) -> str:
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _column_indices(path: Path, header: list[str], cfg: DataConfig) -> dict[str, int]:
    wanted = {"user": cfg.columns.user, "assistant": cfg.columns.assistant}
    if cfg.columns.system is not None:
        wanted["system"] = cfg.columns.system
    missing, fixes = [], []
    for role, name in wanted.items():
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1, cutoff=0.5)
            missing.append(f"column {name!r} (data.columns.{role}) is missing")
            fixes.append(f"data.columns.{role}={close[0] if close else '<one of them>'}")
    if missing:
        raise DataError(f"{path}: {'; '.join(missing)}; the columns are {header}; set {' '.join(fixes)}")
    return {role: header.index(name) for role, name in wanted.items()}


def _map_rows(path: Path, rows, width: int, index: dict[str, int], cfg: DataConfig) -> list[Conversation]:
    conversations, bad = [], []
    for line, record in rows:
        if len(record) != width:
            raise DataError(
                f"{path}: line {line} has {len(record)} fields, the header has {width}; quote cells that contain "
                f"the delimiter, or set data.delimiter"
            )
        cells = {role: record[i] for role, i in index.items()}
        required = ["user", "assistant"] + (["system"] if "system" in cells else [])
        if any(_is_missing(cells[role]) for role in required):
            bad.append(line)
            continue
        system = cells["system"] if "system" in cells else cfg.system_prompt
        conversations.append(Conversation(line, system or None, cells["user"], cells["assistant"]))
    if bad and cfg.on_bad_rows == "error":
        raise DataError(
            f"{path}: {len(bad)} row(s) have an empty required cell (first at line {bad[0]}); fill them, "
            "or set data.on_bad_rows=skip to drop them"
        )
    if not conversations:
        raise DataError(f"{path}: every row was dropped ({len(bad)} with empty cells); nothing is left to train on")
    return conversations


def _is_missing(value: str) -> bool:
    return value.strip().lower() in ("", "nan", "null", "none", "n/a")


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
    fields = ("system", "user", "assistant")
    texts = [getattr(c, f) or "" for c in conversations for f in fields]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    spans = [[(start, end) for token, (start, end) in zip(ids, offsets) if token in control and end > start]
             for ids, offsets in zip(encoded.input_ids, encoded.offset_mapping)]
    flagged = sorted({conversations[i // len(fields)].row for i, found in enumerate(spans) if found})
    if not flagged:
        return conversations
    if policy == "error":
        first = next(i for i, found in enumerate(spans) if found)
        start, end = spans[first][0]
        raise DataError(
            f"{source}: {len(flagged)} row(s) contain the tokenizer's control text such as "
            f"{texts[first][start:end]!r} (first at line {flagged[0]}); remove it, or set data.control_tokens=escape "
            "or strip"
        )
    result = []
    for index, conversation in enumerate(conversations):
        changes = {}
        for offset, field in enumerate(fields):
            i = index * len(fields) + offset
            if spans[i]:
                changes[field] = _neutralise(texts[i], spans[i], policy)
        result.append(dataclasses.replace(conversation, **changes) if changes else conversation)
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
