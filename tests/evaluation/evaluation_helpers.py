"""The hand-labelled video QA cases shared by the evaluator's tests: each record, the scripted
response the stand-in model gives, and whether that response is correct."""

from __future__ import annotations

OPTIONS = ["a red car", "the dog sleeps", "two cats", "nothing happens"]
# (record, scripted response, correct?); None = the video fails, the sample is not scored
CASES = [
    (
        dict(id="q1", question="What moves?", answer="B", category="action", duration="short"),
        "The answer is (B).",
        True,
    ),
    (dict(id="q2", question="Who sleeps?", answer="C", category="action", duration="short"), "b", False),
    (
        dict(id="q3", question="What is red?", answer="A", category="object", duration="long"),
        "a red car",
        True,
    ),
    (
        dict(id="q4", question="How many?", answer="D", category="object", duration="long"),
        "I am not sure.",
        False,
    ),
    (
        dict(id="q5", question="Which animal?", answer="dog", category="open", duration="short"),
        "A dog.",
        True,
    ),
    (
        dict(id="q6", question="How many cats?", answer=["two", "2"], category="open", duration="long"),
        "three",
        False,
    ),
    (dict(id="q7", question="Broken clip?", answer="A", category="action", duration="short"), None, None),
    (dict(id="q8", question="Lost clip?", answer="A", category="object", duration="long"), None, None),
]
RESPONSES = {record["question"]: response for record, response, _ in CASES if response is not None}
EXPECTED = {record["id"]: correct for record, _, correct in CASES}
