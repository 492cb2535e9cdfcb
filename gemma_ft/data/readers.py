"""Data files -> records: one reader per kind of file, each naming the file and line (or record) of any problem.

A record is a dict of field -> value with its position in the file. Which fields make a conversation (columns,
`messages` or ShareGPT `conversations`) is decided afterwards, in `gemma_ft.data.formats`, the same way for every
kind of file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gemma_ft.errors import DataError

_DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Records:
    path: Path
    unit: str  # how a position is named in messages: "line" (CSV, JSON Lines) or "record" (JSON list, Parquet, ...)
    rows: list[tuple[int, dict]]  # (1-based position, fields)
    fields: list[str]  # the fields of the first record (CSV: the header), for error messages


def read_records(path: Path, encoding: str = "utf-8", delimiter: str | None = None) -> Records:
    """Every record of the file or saved-dataset folder at `path`, by the reader its kind calls for."""
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist; point data.path at your data file")
    if path.is_dir():
        return _read_saved_dataset(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"data.path: {path} has the extension {path.suffix or '(none)'!r}; gemma_ft reads "
                        f"{', '.join(sorted(READERS))} files and folders written by datasets' save_to_disk")
    return reader(path, encoding, delimiter)


def read_text(path: Path, encoding: str) -> str:
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


def read_table(path: Path, encoding: str = "utf-8", delimiter: str | None = None):
    """(header, [(line, cells), ...]) of a CSV, with every structural problem reported as a DataError."""
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file; point data.path at a CSV file")
    text = read_text(path, encoding)
    delimiter = delimiter or _detect_delimiter(text)
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
    header = [name.strip().lstrip("\ufeff") for name in records[0][1]]
    rows = records[1:]
    if not rows:
        raise DataError(f"{path}: the file has a header but no data rows; add rows under {','.join(header)}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names {duplicates}; rename them so each column is unique")
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(cells)} fields, the header has {len(header)}; quote cells that "
                "contain the delimiter, or set data.delimiter"
            )
    return header, rows


def _detect_delimiter(text: str) -> str:
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _read_csv(path: Path, encoding: str, delimiter: str | None) -> Records:
    header, rows = read_table(path, encoding, delimiter)
    return Records(path, "line", [(line, dict(zip(header, cells))) for line, cells in rows], header)


def _not_a_number(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _loads(path: Path, where: str, text: str):
    """json.loads without Python's extensions (NaN, Infinity: a reply would become the text "nan") and with a
    nesting too deep for the parser as a DataError naming `where`."""
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        raise DataError(f"{path}: {where}: {exc} (JSON has no NaN or Infinity); write the value as a string or "
                        "leave the field out") from None
    except RecursionError:
        raise DataError(f"{path}: {where}: nested too deeply to read; a record is an object of fields, with "
                        "messages as a list of objects") from None


def _read_json(path: Path, encoding: str, delimiter: str | None) -> Records:
    """A JSON list of records; a .json file holding one record per line is read as JSON Lines."""
    text = read_text(path, encoding).lstrip("\ufeff")  # a byte-order mark, as .jsonl and .csv accept it
    try:
        data = _loads(path, "the file", text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several values: JSON Lines under a .json name
            return _json_lines(path, text)
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "fix it there, or write one JSON object per line in a .jsonl file") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: the file holds a JSON {type(data).__name__}; give a list of conversations "
                        "(objects), or one object per line in a .jsonl file")
    return _checked(path, "record", list(enumerate(data, start=1)))


def _read_jsonl(path: Path, encoding: str, delimiter: str | None) -> Records:
    return _json_lines(path, read_text(path, encoding))


def _json_lines(path: Path, text: str) -> Records:
    rows = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, _loads(path, f"line {number}", line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one JSON object") from None
    return _checked(path, "line", rows)


def _read_parquet(path: Path, encoding: str, delimiter: str | None) -> Records:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-write it with pandas or datasets") from None
    return _checked(path, "record", list(enumerate(table.to_pylist(), start=1)))


def _read_saved_dataset(path: Path) -> Records:
    """A folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict whose "train" split is used."""
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DataError(f"data.path: {path} is a folder but not one written by datasets' save_to_disk "
                        "(no dataset_info.json or dataset_dict.json); point data.path at a file or such a folder")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"data.path: {path}: datasets cannot load it ({exc}); save it again with save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"data.path: {path} holds the splits {sorted(dataset)} and no 'train'; point data.path "
                            f"at one split's folder, e.g. {path / sorted(dataset)[0]}")
        dataset = dataset["train"]
    return _checked(path, "record", list(enumerate(dataset.to_list(), start=1)))


def _checked(path: Path, unit: str, rows: list[tuple[int, object]]) -> Records:
    if not rows:
        raise DataError(f"{path}: the file holds no records; add conversations to it")
    for number, record in rows:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {unit} {number} is a JSON {type(record).__name__}, not an object; each "
                            "conversation must be an object such as {\"messages\": [...]}")
    return Records(path, unit, rows, list(rows[0][1]))


READERS: dict[str, Callable[[Path, str, str | None], Records]] = {
    ".csv": _read_csv, ".tsv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
}
