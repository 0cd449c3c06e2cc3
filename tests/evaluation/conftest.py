"""Shared fixture: the hand-labelled CASES as a JSONL data file next to their videos."""

from __future__ import annotations

import json

import pytest
from evaluation_helpers import CASES, OPTIONS
from helpers import write_random_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The CASES as a JSONL file next to their videos: q7's is not a video, q8's does not exist."""
    root = tmp_path_factory.mktemp("qa")
    (root / "videos").mkdir()
    records = []
    for i, (record, _, _) in enumerate(CASES):
        record = dict(record, video=f"videos/{record['id']}.mp4")
        if record["answer"] in ("A", "B", "C", "D"):
            record["options"] = OPTIONS
        records.append(record)
        if record["id"] == "q7":
            (root / record["video"]).write_bytes(b"this is not a video" * 20)
        elif record["id"] != "q8":
            write_random_video(root / record["video"], num_frames=4, fps=4, seed=i)
    path = root / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
