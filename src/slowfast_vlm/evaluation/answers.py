"""Reading answers out of model responses: option letters for multiple choice, normalised text otherwise.

Options arrive in the shapes the public video QA sets use (a list, a ``{letter: text}`` dict, or
``"A. text"`` strings) and are turned into one ``{letter: text}`` dict by :func:`parse_options`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

LETTERS = string.ascii_uppercase

# "A. text", "(A) text", "A) text", "A: text", "[A] text"
_LABELLED_OPTION = re.compile(r"^\s*[(\[]?([A-Z])[)\].:]\s*(.*)$", re.DOTALL)
# "answer is (B)", "Answer: B", "the correct option is B", "choice B" (the letter must be a capital)
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:：]?\s*[(\[]?([A-Z])(?![A-Za-z])")
_BRACKETED_LETTER = re.compile(r"[(\[]([A-Z])[)\]]")
_LEADING_LETTER = re.compile(r"^([A-Z])(?:[.):]|$)")
# "...; B", "..., so B." (a capital closing the response after a separator: the conclusion of a reasoned answer)
_CLOSING_LETTER = re.compile(r"(?:[;,]\s*|\bso\s+)([A-Z])\.?$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def parse_options(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Options as ``{letter: text}``, letters A, B, C, ... in order.

    Accepts a list of plain texts (lettered in order), a list of ``"A. text"`` / ``"(A) text"``
    strings (their own letters, which must run A, B, C, ...), or a dict keyed by letters (any case)
    or by anything else (lettered in order).
    """
    if isinstance(options, Mapping):
        keys = [str(k).strip().upper() for k in options]
        if keys == list(LETTERS[: len(keys)]):
            return {k: str(v).strip() for k, v in zip(keys, options.values())}
        return {LETTERS[i]: str(v).strip() for i, v in enumerate(options.values())}
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(f"options must be a list or a dict, got {type(options).__name__}: {options!r}")
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    texts = [str(option).strip() for option in options]
    labelled = [_LABELLED_OPTION.match(text) for text in texts]
    if texts and all(labelled) and [m.group(1) for m in labelled] == list(LETTERS[: len(texts)]):
        return {m.group(1): m.group(2).strip() for m in labelled}
    return {LETTERS[i]: text for i, text in enumerate(texts)}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD-style)."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_choice(response: str, options: Mapping[str, str]) -> str | None:
    """The option letter a response picks, or None if it names none.

    Tried in order: the whole response is one letter in any case ("b", "B."); an answer phrase
    ("The answer is (B)", "Answer: B"); a bracketed capital ("(B)"); a leading capital followed by
    ".", ")", ":" or the end ("B. a dog"); a capital closing the response after ";", "," or "so"
    ("7; A. 3 B. 7; B"); the text of exactly one option. Only letters of ``options`` count.
    """
    text = response.strip()
    bare = text.strip(" \t\n\"'`*.:)(").upper()
    if len(bare) == 1 and bare in options:
        return bare
    for pattern in (_ANSWER_PHRASE, _BRACKETED_LETTER):
        for match in pattern.finditer(text):
            if match.group(1) in options:
                return match.group(1)
    for match in (_LEADING_LETTER.match(text), _CLOSING_LETTER.search(text)):
        if match and match.group(1) in options:
            return match.group(1)
    said = normalize_answer(text)
    texts = {letter: normalize_answer(option) for letter, option in options.items()}
    exact = [letter for letter, option in texts.items() if option and option == said]
    if len(exact) == 1:
        return exact[0]
    contained = [letter for letter, option in texts.items() if option and f" {option} " in f" {said} "]
    return contained[0] if len(contained) == 1 else None


def answer_letter(answer: str | int, options: Mapping[str, str]) -> str:
    """The letter a dataset's answer field means: a letter, an option's text, or a 0-based index."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(options):
            return LETTERS[answer]
        raise ValueError(f"answer index {answer} is out of range for {len(options)} options")
    text = str(answer).strip()
    match = _LABELLED_OPTION.match(text)
    letter = text.upper() if len(text) == 1 else (match.group(1) if match else None)
    if letter in options:
        return letter
    wanted = normalize_answer(text)
    matches = [letter for letter, option in options.items() if normalize_answer(option) == wanted]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"answer {answer!r} is neither an option letter nor the text of one option of {dict(options)}"
    )


def is_correct_free_form(response: str, answers: str | Sequence[str]) -> bool:
    """Normalised exact match of a free-form response against one or several reference answers."""
    references = [answers] if isinstance(answers, str) else list(answers)
    said = normalize_answer(response)
    return any(said == normalize_answer(str(reference)) for reference in references)
