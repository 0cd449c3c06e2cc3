"""Answer extraction: option formats, letters out of free text, answer keys, free-form matching.

Every expected value is written out by hand."""

from __future__ import annotations

import pytest

from slowfast_vlm.evaluation.answers import (
    answer_letter,
    extract_choice,
    is_correct_free_form,
    normalize_answer,
    parse_options,
)

OPTIONS = {"A": "a red car", "B": "the dog sleeps", "C": "two cats", "D": "nothing happens"}


@pytest.mark.parametrize(
    "options, expected",
    [
        (["red", "green"], {"A": "red", "B": "green"}),
        (["A. red", "B. green"], {"A": "red", "B": "green"}),
        (["(A) red", "(B) green", "(C) blue"], {"A": "red", "B": "green", "C": "blue"}),
        (["A) red", "B: green"], {"A": "red", "B": "green"}),
        ({"a": "red", "b": "green"}, {"A": "red", "B": "green"}),
        ({"option 0": "red", "option 1": "green"}, {"A": "red", "B": "green"}),
        # labels that do not run A, B, ... are part of the text
        (["B. red", "A. green"], {"A": "B. red", "B": "A. green"}),
    ],
)
def test_parse_options(options, expected):
    assert parse_options(options) == expected


def test_parse_options_rejects_a_string():
    with pytest.raises(ValueError, match="options must be a list or a dict"):
        parse_options("A. red B. green")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("The answer is (B).", "B"),
        ("The best answer is D", "D"),
        ("Answer: C", "C"),
        ("I think the correct option is A because the car is red.", "A"),
        ("B. the dog sleeps", "B"),
        ("C) two cats", "C"),
        ("Looking closely, (D) fits.", "D"),
        ("The dog sleeps on a mat; B", "B"),  # a reasoned answer's closing letter
        ("Not a car, so D.", "D"),
        ("the dog sleeps", "B"),  # option text
        ("Two cats.", "C"),  # option text, any case and punctuation
        ("In the video, the dog sleeps on a mat.", "B"),  # exactly one option's text inside
        ("E", None),  # not an option
        ("A cat and a dog", None),  # the article "A" is not a letter answer
        ("It looks like plan B", None),  # a closing capital without a separator is a word
        ("Nothing of it; E", None),  # closing, but not an option
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response, OPTIONS) == expected


def test_extract_choice_reads_the_letter_closing_a_digit_first_answer():
    # the synthetic benchmark's reasoned answer: the digit, the options listed again, the letter
    options = parse_options(["3", "7", "1", "0"])
    assert extract_choice("7; A. 3 B. 7 C. 1 D. 0; B", options) == "B"
    assert extract_choice("7; A. 3 B. 7 C. 1 D. 0; D", options) == "D"  # the letter named, right or not


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("c", "C"),
        ("D.", "D"),
        ("(A) a red car", "A"),
        ("two cats", "C"),
        ("The dog sleeps", "B"),
        (3, "D"),
    ],
)
def test_answer_letter(answer, expected):
    assert answer_letter(answer, OPTIONS) == expected


def test_answer_letter_of_digit_options_is_the_matching_text():
    assert answer_letter("3", {"A": "1", "B": "3"}) == "B"


@pytest.mark.parametrize("answer", ["E", "a blue car", 4, -1])
def test_answer_letter_rejects_an_unknown_answer(answer):
    with pytest.raises(ValueError, match="answer"):
        answer_letter(answer, OPTIONS)


def test_free_form_match_is_normalised_exact_match():
    assert normalize_answer("  The Dog, sleeps! ") == "dog sleeps"
    assert is_correct_free_form("A dog.", "dog")
    assert is_correct_free_form("Dogs", ["cat", "dogs"])
    assert not is_correct_free_form("a big dog", "dog")
    assert not is_correct_free_form("", "dog")
