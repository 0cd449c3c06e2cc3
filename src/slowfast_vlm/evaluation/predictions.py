"""The evaluator's predictions files: one JSON line per answered sample, appended and fsynced as it
is written (a crash loses nothing), read back on resume; under a multi-process launch one shard
file per process, merged by the main process."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
_SHARD_PREDICTIONS = "predictions.rank{rank}.jsonl"
_SHARD_GLOB = "predictions.rank*.jsonl"


class PredictionWriter:
    """Appends one JSON line per prediction, flushed and fsynced, so a crash loses nothing written."""

    def __init__(self, path: str | os.PathLike[str]):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_predictions(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """Records of a predictions file; a truncated last line (a crash mid-write) is ignored.

    With `repair`, the truncated line is also cut from the file so that appending can go on.
    A bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_end, offset = [], 0, 0
    for number, line in enumerate(lines, 1):
        end = offset + len(line)
        offset = end + 1
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            good_end = min(end + 1, len(data))
        except json.JSONDecodeError as e:
            if number != len(lines):  # only an unterminated last line can be a cut-off write
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({e}); only the last line may be cut"
                ) from e
            logger.warning("%s: ignoring the truncated last line %d (interrupted write)", path, number)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if repair and good_end and not data[:good_end].endswith(b"\n"):
        with open(path, "ab") as f:  # a complete last record without its newline
            f.write(b"\n")
    return records


def predictions_path(output_dir: str | os.PathLike[str], rank: int = 0, num_processes: int = 1) -> Path:
    """Where process `rank` of `num_processes` writes: predictions.jsonl alone, else its shard file."""
    name = PREDICTIONS if num_processes == 1 else _SHARD_PREDICTIONS.format(rank=rank)
    return Path(output_dir) / name


def prediction_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The merged predictions file and any per-process shard files, in a fixed order."""
    output_dir = Path(output_dir)
    return [output_dir / PREDICTIONS, *sorted(output_dir.glob(_SHARD_GLOB))]


def merge_predictions(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Append the shard files' records not yet in predictions.jsonl to it, delete the shards, return all."""
    merged_path, *shards = prediction_files(output_dir)
    merged = read_predictions(merged_path, repair=True)
    seen = {record["id"] for record in merged}
    with PredictionWriter(merged_path) as writer:
        for shard in shards:
            for record in read_predictions(shard):
                if record["id"] not in seen:
                    writer.write(record)
                    merged.append(record)
                    seen.add(record["id"])
    for shard in shards:
        shard.unlink()
    return merged
