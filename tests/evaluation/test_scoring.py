"""Scoring (`evaluation.scoring`): a response against its sample, the record written for it, and the
metrics, checked against hand counts."""

from __future__ import annotations

import pytest

from slowfast_vlm.evaluation.dataset import QASample
from slowfast_vlm.evaluation.scoring import compute_metrics, prediction_record, score

OPTIONS = {"A": "a red car", "B": "the dog sleeps", "C": "two cats"}
S1 = QASample(id="s1", video="v1.mp4", prompt="What is red?", options=OPTIONS, answer="A", category="x")
S2 = QASample(id="s2", video="v2.mp4", prompt="Who sleeps?", options=OPTIONS, answer="B", category="x")
S3 = QASample(
    id="s3", video="v3.mp4", prompt="Colour?", options=None, answer=["red", "dark red"], category="y"
)
S4 = QASample(id="s4", video="v4.mp4", prompt="How many?", options=OPTIONS, answer="C", category="y")


def test_score_reads_the_letter_or_matches_the_text():
    assert score(S1, "The answer is (A).") == ("A", True)
    assert score(S1, "the dog sleeps") == ("B", False)
    assert score(S2, "I am not sure.") == (None, False)
    assert score(S3, "Dark red.") == ("Dark red.", True)
    assert score(S3, "blue") == ("blue", False)


def test_a_failed_sample_is_recorded_unscored():
    assert prediction_record(S4, error="FileNotFoundError: v4.mp4") == {
        "id": "s4",
        "video": "v4.mp4",
        "prompt": "How many?",
        "options": OPTIONS,
        "answer": "C",
        "category": "y",
        "duration": None,
        "response": None,
        "extracted": None,
        "correct": None,
        "error": "FileNotFoundError: v4.mp4",
    }
    record = prediction_record(S1, "A")
    assert (record["response"], record["extracted"], record["correct"], record["error"]) == (
        "A",
        "A",
        True,
        None,
    )


def test_metrics_match_a_hand_count():
    predictions = [
        prediction_record(S3, "Red."),  # right
        prediction_record(S1, "A"),  # right
        prediction_record(S4, error="FileNotFoundError: v4.mp4"),  # failed: counted, not scored
        prediction_record(S2, "no idea"),  # names no option: unanswered, wrong
    ]
    metrics = compute_metrics([S1, S2, S3, S4], predictions)
    counts = (
        "num_samples",
        "num_scored",
        "num_failed",
        "num_correct",
        "accuracy",
        "accuracy_failed_as_wrong",
    )
    per_category = metrics.pop("per_category")
    assert {name: tuple(group[k] for k in counts) for name, group in per_category.items()} == {
        "x": (2, 2, 0, 1, 0.5, 0.5),
        "y": (2, 1, 1, 1, 1.0, 0.5),
    }
    assert all(set(group) == set(counts) for group in per_category.values())
    assert metrics == {  # no sample has a duration: no per_duration
        "num_samples": 4,
        "num_scored": 3,
        "num_failed": 1,
        "num_correct": 2,
        "accuracy": 2 / 3,
        "accuracy_failed_as_wrong": 2 / 4,
        "num_unanswered": 1,
        "failed": {"s4": "FileNotFoundError: v4.mp4"},
    }


def test_a_sample_without_prediction_is_an_error():
    with pytest.raises(RuntimeError, match=r"1 samples have no prediction \(first: \['s2'\]\)"):
        compute_metrics([S1, S2], [prediction_record(S1, "A")])
