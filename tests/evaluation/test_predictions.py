"""The evaluator's predictions files (`evaluation.predictions`): whole lines appended, a line cut
off by a crash dropped and repaired, shard files merged without duplicates."""

from __future__ import annotations

import json

import pytest

from slowfast_vlm.evaluation.predictions import (
    PredictionWriter,
    merge_predictions,
    prediction_files,
    predictions_path,
    read_predictions,
)


def test_writer_appends_whole_lines(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with PredictionWriter(path) as writer:
        writer.write({"id": "a", "response": "ünïcode"})
    with PredictionWriter(path) as writer:  # a resumed run appends
        writer.write({"id": "b", "response": None})
    assert (
        path.read_text(encoding="utf-8")
        == '{"id": "a", "response": "ünïcode"}\n{"id": "b", "response": null}\n'
    )
    assert read_predictions(path) == [{"id": "a", "response": "ünïcode"}, {"id": "b", "response": None}]


def test_a_cut_off_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resp')
    assert read_predictions(path) == [{"id": "a"}, {"id": "b"}]
    assert path.read_text().endswith('"resp')  # reading alone changes nothing
    assert read_predictions(path, repair=True) == [{"id": "a"}, {"id": "b"}]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'

    path.write_text('{"id": "a"}')  # a whole last record that lost only its newline
    assert read_predictions(path, repair=True) == [{"id": "a"}]
    assert path.read_text() == '{"id": "a"}\n'
    assert read_predictions(tmp_path / "none.jsonl") == []


def test_a_corrupt_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_predictions(path)


def test_shards_merge_into_predictions_once_each(tmp_path):
    assert predictions_path(tmp_path) == tmp_path / "predictions.jsonl"
    assert predictions_path(tmp_path, rank=1, num_processes=2) == tmp_path / "predictions.rank1.jsonl"
    (tmp_path / "predictions.jsonl").write_text('{"id": "a", "n": 1}\n')
    (tmp_path / "predictions.rank1.jsonl").write_text('{"id": "c", "n": 3}\n{"id": "c", "n": 4}\n')
    (tmp_path / "predictions.rank0.jsonl").write_text('{"id": "a", "n": 2}\n{"id": "b", "n": 2}\n')
    assert prediction_files(tmp_path) == [
        tmp_path / "predictions.jsonl",
        tmp_path / "predictions.rank0.jsonl",
        tmp_path / "predictions.rank1.jsonl",
    ]
    expected = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 3}]  # the first of each id
    assert merge_predictions(tmp_path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # shards deleted
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == expected
