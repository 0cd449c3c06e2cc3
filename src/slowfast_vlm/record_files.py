"""Data files of records, as training and evaluation read them: a `.json` list of objects, a `.jsonl` file
(one object a line) or a `.parquet` table (needs pandas + pyarrow).

Each record comes with where it stands (`file:line` in JSONL, `file[index]` otherwise), so that every
message about it names the file and the line. A record that is not a JSON object, or a JSONL line that is
not JSON, is a bad record: its `Row` says why, and the caller refuses it (evaluation) or skips it
(training). A file that cannot be read as a whole raises.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

SUFFIXES = (".json", ".jsonl", ".parquet")


class Row(NamedTuple):
    """One record of a data file: the object, or None and the problem that makes it no record."""

    where: str  # "file:line" (JSONL) or "file[index]" (JSON list, parquet table)
    record: dict[str, Any] | None
    problem: str | None = None


def _row(where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        return Row(where, None, f"expected a JSON object, got {type(value).__name__}")
    return Row(where, value)


def _indexed_rows(path: Path, values: list[Any]) -> list[Row]:
    return [_row(f"{path}[{index}]", value) for index, value in enumerate(values)]


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # "\n" only: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append(_row(f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append(Row(f"{path}:{number}", None, f"malformed JSON ({e})"))
    return rows


def _text_rows(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, text)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(values, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(values).__name__}")
    return _indexed_rows(path, values)


def _parquet_rows(path: Path) -> list[Row]:
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            f"{path}: reading parquet needs pandas and pyarrow (pip install pandas pyarrow)"
        ) from e
    # through JSON so that numpy scalars and arrays become plain Python values
    return _indexed_rows(path, json.loads(pd.read_parquet(path).to_json(orient="records")))


def read_record_file(path: str | os.PathLike[str]) -> list[Row]:
    """The rows of a `.json`, `.jsonl` or `.parquet` data file, in file order (blank JSONL lines skipped).

    Raises `FileNotFoundError` for a missing file and `ValueError` (naming the file) for one that is not
    UTF-8, not one JSON list (`.json`), of another format, or without any record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported data format {path.suffix!r} (use {', '.join(SUFFIXES)})")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _text_rows(path)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows
