"""Scoring the evaluator's predictions: a response against its sample's answer, the prediction
record written for each sample, and accuracy overall, per category and per duration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .answers import extract_choice, is_correct_free_form
from .dataset import QASample


def score(sample: QASample, response: str) -> tuple[str | None, bool]:
    """`(extracted answer, correct)`: the option letter for multiple choice, else the response itself."""
    if sample.options:
        letter = extract_choice(response, sample.options)
        return letter, letter == sample.answer
    return response, is_correct_free_form(response, sample.answer)


def prediction_record(
    sample: QASample, response: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """The predictions-file record of `sample`: its fields, the response, and its score; a failed
    sample (`error` set) is not scored (`extracted` and `correct` are None)."""
    extracted, correct = score(sample, response) if error is None else (None, None)
    return {
        **asdict(sample),
        "response": response,
        "extracted": extracted,
        "correct": correct,
        "error": error,
    }


def accuracy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and accuracy of prediction records: over the scored ones, and with failures as wrong."""
    failed = [r for r in records if r["error"] is not None]
    scored = [r for r in records if r["error"] is None]
    correct = sum(bool(r["correct"]) for r in scored)
    return {
        "num_samples": len(records),
        "num_scored": len(scored),
        "num_failed": len(failed),
        "num_correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "accuracy_failed_as_wrong": correct / len(records) if records else None,
    }


def compute_metrics(samples: Sequence[QASample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per category and per duration; failed samples are counted, never scored.

    `accuracy` is over the scored samples; `accuracy_failed_as_wrong` counts failures as wrong.
    `num_unanswered` counts multiple-choice responses naming no option (scored wrong).
    """
    by_id = {record["id"]: record for record in predictions}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no prediction (first: {missing[:5]})")
    records = [by_id[s.id] for s in samples]
    metrics = accuracy(records)
    metrics["num_unanswered"] = sum(
        r["error"] is None and bool(r["options"]) and r["extracted"] is None for r in records
    )
    for field in ("category", "duration"):
        groups: dict[str, list] = {}
        for record in records:
            if record[field] is not None:
                groups.setdefault(record[field], []).append(record)
        if groups:
            metrics[f"per_{field}"] = {name: accuracy(group) for name, group in sorted(groups.items())}
    metrics["failed"] = {r["id"]: r["error"] for r in records if r["error"] is not None}
    return metrics
