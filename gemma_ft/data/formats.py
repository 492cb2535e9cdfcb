"""Records -> conversations, in one of three shapes, checked turn by turn:

- `columns`: one exchange per record, from the fields named by data.columns.system/user/assistant (every CSV);
- `messages`: a list of {"role": system|user|assistant, "content": text} (OpenAI / TRL);
- `sharegpt`: a list of {"from": system|human|gpt, "value": text} under "conversations".

`data.format=auto` picks `messages` or `sharegpt` when the first record has that list, else `columns`.
"""

from __future__ import annotations

import difflib

from gemma_ft.config import DataConfig
from gemma_ft.data.readers import Records
from gemma_ft.errors import DataError

FORMATS = ("auto", "columns", "messages", "sharegpt")
DEFAULT_LIST_FIELD = {"messages": "messages", "sharegpt": "conversations"}
# ShareGPT's speaker names, and the roles themselves, which some ShareGPT exports use.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class BadRecord(ValueError):
    """A record that is not a valid conversation: skipped under data.on_bad_rows=skip, else a DataError."""


def detect_format(records: Records, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    first = records.rows[0][1]
    for fmt in ("messages", "sharegpt"):
        if isinstance(first.get(list_field(cfg, fmt)), list):
            return fmt
    return "columns"


def list_field(cfg: DataConfig, fmt: str) -> str:
    return cfg.columns.messages or DEFAULT_LIST_FIELD[fmt]


def turns_of(record: dict, fmt: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """The record's (role, text) turns, roles normalised to system|user|assistant; BadRecord if malformed."""
    if fmt == "columns":
        return _column_turns(record, cfg)
    field = list_field(cfg, fmt)
    turns = record.get(field)
    if turns is None:
        raise BadRecord(f"has no field {field!r} (data.columns.messages); its fields are {sorted(record)}")
    if not isinstance(turns, list):
        raise BadRecord(f"field {field!r} is a {type(turns).__name__}, not a list of turns")
    role_key, text_key, roles = ("role", "content", MESSAGE_ROLES) if fmt == "messages" else ("from", "value",
                                                                                                 SHAREGPT_ROLES)
    result = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise BadRecord(f"turn {number} of {field!r} is not an object with {role_key!r} and {text_key!r}")
        role, text = turn[role_key], turn[text_key]
        if role not in roles:
            raise BadRecord(f"turn {number} has {role_key} {role!r}; use one of {', '.join(roles)}")
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(f"turn {number} ({role}) has an empty or non-text {text_key!r}; give it text")
        result.append((roles[role], text))
    return result


def _column_turns(record: dict, cfg: DataConfig) -> list[tuple[str, str]]:
    turns = []
    for role in ("system", "user", "assistant"):
        name = getattr(cfg.columns, role)
        if name is None:
            continue
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadRecord(f"has an empty {name!r} (data.columns.{role})")
        turns.append((role, value))
    return turns


def check_columns(records: Records, cfg: DataConfig) -> None:
    """Every configured column must be a field of the file, with the closest field suggested for each missing one."""
    wanted = {role: getattr(cfg.columns, role) for role in ("system", "user", "assistant")}
    missing, fixes = [], []
    for role, name in wanted.items():
        if name is not None and name not in records.fields:
            close = difflib.get_close_matches(name, records.fields, n=1, cutoff=0.5)
            missing.append(f"column {name!r} (data.columns.{role}) is missing")
            fixes.append(f"data.columns.{role}={close[0] if close else '<one of them>'}")
    if missing:
        hint = (" or, for chat data, give each record a 'messages' list (data.format=messages)"
                if records.path.suffix.lower() not in (".csv", ".tsv") else "")
        raise DataError(f"{records.path}: {'; '.join(missing)}; the columns are {records.fields}; "
                        f"set {' '.join(fixes)}{hint}")


def check_turn_order(turns: list[tuple[str, str]], require_reply: bool = True) -> None:
    """An optional system message, then user and assistant turns alternating, from a user turn to an assistant turn
    (to a user turn when `require_reply` is false, as for prompts to answer)."""
    roles = [role for role, _ in turns]
    first = 1 if roles and roles[0] == "system" else 0  # turn numbers below count from the file's first turn
    if "system" in roles[first:]:
        raise BadRecord(f"has a system message at turn {roles.index('system', first) + 1}; only the first turn "
                        "may be one")
    roles = roles[first:]
    if not roles or roles[0] != "user":
        raise BadRecord("does not start with a user turn (after an optional system message)")
    for index, (before, after) in enumerate(zip(roles, roles[1:])):
        if before == after:
            number = index + first + 1
            raise BadRecord(f"has two {after} turns in a row (turns {number} and {number + 1}); user and "
                            "assistant turns must alternate")
    if require_reply and roles[-1] != "assistant":
        raise BadRecord("ends with a user turn; a training conversation ends with the assistant's reply")
