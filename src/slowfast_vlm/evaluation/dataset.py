"""Video QA data for the built-in evaluator: rows of a JSON, JSONL or parquet file (`record_files`), with
the field names of VideoMME, MVBench, EgoSchema, NExT-QA and LLaVA-style records, read as `QASample`s."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..record_files import read_record_file
from .answers import answer_letter, parse_options

# Dataset field names, first match wins (VideoMME, MVBench, EgoSchema, NExT-QA, LLaVA-style records).
ID_KEYS = ("id", "question_id", "qid", "uid", "q_uid")
VIDEO_KEYS = ("video", "video_path", "video_id", "videoID", "video_name", "video_idx")
OPTION_KEYS = ("options", "candidates", "choices")
ANSWER_KEYS = ("answer", "answers", "gt_answer")
CATEGORY_KEYS = ("category", "task_type", "question_type")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class QASample:
    """One question about one video. `answer` is an option letter (multiple choice) or reference texts."""

    id: str
    video: str
    prompt: str
    options: dict[str, str] | None
    answer: str | list[str]
    category: str | None = None
    duration: str | None = None


def _first(record: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _video_path(value: str, video_root: Path) -> str:
    """`video_root / value`; a name without a suffix (a VideoMME videoID) gets the first one that exists."""
    path = video_root / value
    if path.suffix or path.exists():
        return str(path)
    found = [path.with_suffix(s) for s in VIDEO_SUFFIXES if path.with_suffix(s).exists()]
    return str(found[0] if found else path)


def _options(record: dict[str, Any]) -> Any:
    options = _first(record, OPTION_KEYS)
    if options is None:  # EgoSchema: "option 0" ... "option 4"
        numbered = sorted((int(k.split()[1]), v) for k, v in record.items() if re.fullmatch(r"option \d+", k))
        options = [v for _, v in numbered] or None
    return options


def sample_from_record(record: dict[str, Any], index: int, where: str, video_root: Path) -> QASample:
    """A `QASample` from one dataset row: row `index` of the file (the fallback id), at `where`
    (`file:line` or `file[index]`, for errors)."""
    sample_id = _first(record, ID_KEYS)
    where = f"{where} (id {sample_id!r})"
    video = _first(record, VIDEO_KEYS)
    if video is None:
        raise ValueError(f"{where}: no video field (one of {', '.join(VIDEO_KEYS)})")
    answer = _first(record, ANSWER_KEYS)
    if answer is None:
        raise ValueError(f"{where}: no answer field (one of {', '.join(ANSWER_KEYS)})")
    raw_options = _options(record)
    options = parse_options(raw_options) if raw_options is not None else None
    if "question" in record:
        prompt = str(record["question"]).strip()
        if options:
            listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
            prompt = f"{prompt}\n{listed}\n{MC_INSTRUCTION}"
        else:
            prompt = f"{prompt}\n{OPEN_INSTRUCTION}"
    elif "conversations" in record:  # LLaVA-style: the human turn is the full prompt
        turn = next((t["value"] for t in record["conversations"] if t.get("from") == "human"), None)
        if turn is None:
            raise ValueError(f"{where}: conversations has no human turn")
        prompt = turn.replace("<video>", "").replace("<image>", "").strip()
    else:
        raise ValueError(f"{where}: no question field (question or conversations)")
    try:
        if options:
            answer = answer_letter(answer, options)
        else:
            answer = [str(a) for a in answer] if isinstance(answer, list) else str(answer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    category, duration = _first(record, CATEGORY_KEYS), record.get("duration")
    return QASample(
        id=str(index if sample_id is None else sample_id),
        video=_video_path(str(video), video_root),
        prompt=prompt,
        options=options,
        answer=answer,
        category=None if category is None else str(category),
        duration=None if duration is None else str(duration),
    )


def load_samples(
    data: str | os.PathLike[str], video_root: str | os.PathLike[str] | None = None
) -> list[QASample]:
    """All samples of a data file; videos are resolved against `video_root` (default: the file's folder)."""
    root = Path(video_root) if video_root is not None else Path(data).parent
    samples = []
    for index, row in enumerate(read_record_file(data)):
        if row.problem is not None:
            raise ValueError(f"{row.where}: {row.problem}")
        samples.append(sample_from_record(row.record, index, row.where, root))
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(
                f"{data}: sample id {sample.id!r} occurs more than once (ids must be unique to resume)"
            )
        seen.add(sample.id)
    return samples
