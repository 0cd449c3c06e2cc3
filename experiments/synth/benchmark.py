"""The benchmark as the experiment uses it: its clip settings, its two question forms, chat conversations."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from slowfast_vlm.synth import (
    CHOICE_INSTRUCTION,
    COLOURS,
    LETTERS,
    OPEN_INSTRUCTION,
    choice_question,
    open_question,
    question_sentence,
)
from slowfast_vlm.synth_spec import CATEGORIES

SIZE, FRAMES, FPS = 32, 64, 8  # every clip: 64 frames of 32 x 32 px at 8 fps

# question form -> (the record's question in that form, the record's answer in that form)
FORMS = {
    "open": (open_question, lambda record: record["answer_text"]),  # "... Answer with the digit." -> "7"
    "choice": (choice_question, lambda record: record["answer"]),  # "... Options: ... letter." -> "C"
}


def conversation(questions: list[str], answers: list[str] | None = None, visual: str = "video") -> list[dict]:
    """Chat messages: the video (or image) with the first question, then one turn per further question."""
    messages = []
    for i, question in enumerate(questions):
        content = [{"type": visual}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answers is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
    return messages


def answer_spans(row: list[int], tokenizer) -> list[tuple[int, int]]:
    """`(first, last)` token positions of every assistant answer of a conversation, its `<|im_end|>` included."""
    answer_start = tokenizer.encode("<|im_start|>assistant\n")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans = []
    for start in range(len(row) - len(answer_start)):
        if row[start : start + len(answer_start)] == answer_start:
            first = start + len(answer_start)
            spans.append((first, row.index(end, first)))
    return spans


def exercise(
    direction: str,
    rng: np.random.Generator,
    any_letters: bool = False,
    preamble_words: int = 0,
    answers: str = "reasoned",
) -> tuple[str, str, list[str]]:
    """One question, its answer, and the 4 answers it is scored among (its letters, the option digits, or
    the 4 digit-first answers). The options are lettered A-D as in the benchmark or, with `any_letters`,
    by 4 distinct capitals drawn at random: then naming any letter of the list beats guessing among all
    26, a first step towards the lookup that A-D (always the same 4) never rewards.

    forward      "Options: ...\nWhich digit is option B?" -> "7"
    reverse      "Which option is the digit 7?\nOptions: ...\nAnswer with the option's letter." -> "B"
    digit-first  "Options: ...\nAnswer with an option's digit, then its letter." -> "7; A. 3 B. 7 ...; B",
                 the option drawn at random: the digit is a guess, the letter after the list the
                 lookup that the multiple-choice form answered digit first needs
                 (`reasoned_choice_answer`).

    With `preamble_words`, the question starts with a `preamble` of up to that many filler words and a
    benchmark question; a digit-first one then closes with the benchmark's `CHOICE_INSTRUCTION`, so that
    it is the multiple-choice question in text (a lookup learnt under the exercise's own instruction is
    not used under the benchmark's: BENCHMARKS.md item 11) and its answer starts with the
    `answer_opening` of the preamble's question for the digit-first form `answers` ("cued": its cue,
    "restated": the question restated), as the video questions' answers of that form do."""
    options = [str(d) for d in rng.choice(10, len(LETTERS), replace=False)]
    letters = (
        [chr(65 + i) for i in rng.choice(26, len(LETTERS), replace=False)] if any_letters else list(LETTERS)
    )
    k = int(rng.integers(len(LETTERS)))
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    before = preamble(rng, preamble_words) if preamble_words else ""
    if direction == "forward":
        return f"{before}Options:\n{listed}\nWhich digit is option {letters[k]}?", options[k], options
    if direction == "digit-first":
        opening = answer_opening(answers, before.splitlines()[1]) if before else ""
        start = reasoned_answer_start(options[k], list(zip(letters, options)), opening)
        instruction = (
            CHOICE_INSTRUCTION if preamble_words else "Answer with an option's digit, then its letter."
        )
        question = f"{before}Options:\n{listed}\n{instruction}"
        return question, f"{start}{letters[k]}", [f"{start}{letter}" for letter in letters]
    question = f"{before}Which option is the digit {options[k]}?\nOptions:\n{listed}\n{CHOICE_INSTRUCTION}"
    return question, letters[k], letters


# words a preamble's filler is drawn from: digits, capitals and the benchmark question's words
FILLER_WORDS = [
    *"0123456789",
    *LETTERS,
    *COLOURS,
    *question_sentence("red", CATEGORIES[0]).rstrip("?").split(),
]


def preamble(rng: np.random.Generator, max_words: int) -> str:
    """Text put before an exercise: 0 to `max_words` filler words (`FILLER_WORDS`, uniform count) on one
    line, then one of the benchmark's questions on the next. An LLM taught the lookup only with the option
    list at the start of its turn loses it once anything comes first (5 filler words halve it; a clip's
    fast tokens, or a question sentence, do too: BENCHMARKS.md item 11), as it does in the benchmark."""
    filler = " ".join(rng.choice(FILLER_WORDS, int(rng.integers(max_words + 1))).tolist())
    question = question_sentence(str(rng.choice(list(COLOURS))), str(rng.choice(CATEGORIES)))
    return f"{filler}\n{question}\n"


def text_chat(question: str, answer: str | None = None) -> list[dict]:
    """A one-turn chat without any image or video."""
    chat = conversation([question], None if answer is None else [answer], visual="image")
    chat[0]["content"] = chat[0]["content"][1:]  # (no image)
    return chat


def reasoned_choice_answer(record: dict) -> str:
    """The multiple-choice form answered digit first, "7; A. 3 B. 7 C. 1 D. 0; B": the digit read from the
    clip, the options listed again, then the letter of the option that holds it. With the digit named
    before a list, finding its letter is the lookup this LLM learns (a listed digit can attend back to
    an equal digit before it: BENCHMARKS.md items 7 and 11); named after the list ("7 (B)") or read
    through the cross-attention (item 10), it is not learnt. The letter closes the answer bare, as
    `extract_choice` reads it: with a bracket or "Answer:" before it the lookup was not learnt in 1500
    text steps (BENCHMARKS.md item 11)."""
    listed = list(zip(LETTERS, record["options"]))
    return f"{reasoned_answer_start(record['answer_text'], listed)}{record['answer']}"


def reasoned_answer_start(digit: str, listed: list[tuple[str, str]], opening: str = "") -> str:
    """A digit-first answer up to its letter, "7; A. 3 B. 7 C. 1 D. 0; ", from the digit named and the
    (letter, option) pairs listed, after its `answer_opening` if it has one."""
    options = " ".join(f"{letter}. {option}" for letter, option in listed)
    return f"{opening}{digit}; {options}; "


def question_cue(sentence: str) -> str:
    """What a benchmark question asks about, restated: "green, touching: " or "green, not touching: "."""
    found = re.fullmatch(r"The (\w+) square .* while (touching|not touching) the wall\?", sentence)
    if found is None:
        raise ValueError(f"not a benchmark question: {sentence!r}")
    return f"{found[1]}, {found[2]}: "


def answer_opening(answers: str, sentence: str) -> str:
    """What a digit-first answer of the form `answers` says before its digit, for the benchmark question
    `sentence`: nothing ("reasoned"), its `question_cue` ("cued"), or the open question restated
    ("restated": the sentence and "Answer with the digit.", each on its own line)."""
    if answers == "cued":
        return question_cue(sentence)
    if answers == "restated":
        return f"{sentence}\n{OPEN_INSTRUCTION}\n"
    return ""


def cued_choice_answer(record: dict) -> str:
    """`reasoned_choice_answer` after a restated `question_cue`: "green, touching: 7; A. 3 ... D. 0; B".
    With the option list between the question and the answer the digit is read at chance among the
    options (25 of 96), where the open form reads 38 of 96 (BENCHMARKS.md item 11); restating the
    square and the wall condition puts what the answer asks about next to the digit. (Its 700-step run
    did not read better in this form, and the cue undid the letter lookup learnt after "7; ": item 11.)"""
    return answer_opening("cued", question_words(record)) + reasoned_choice_answer(record)


def restated_choice_answer(record: dict) -> str:
    """`reasoned_choice_answer` after the open question restated: "The green square ... wall?\nAnswer with
    the digit.\n7; A. 3 B. 7 C. 1 D. 0; B". The digit is then named as far from the (restated)
    question as in the open form, the one place this LLM reads it: asked so, before any training for
    it, the listed-open run's digit at step 450 was the best of the options for 65 of 192 questions
    after the restatement against 47 right after the multiple-choice prompt (BENCHMARKS.md item 11)."""
    return answer_opening("restated", question_words(record)) + reasoned_choice_answer(record)


# how a multiple-choice question is answered in training: the letter alone, the digit and then the letter,
# or that after the question's cue
CHOICE_ANSWERS = {
    "letter": FORMS["choice"][1],
    "reasoned": reasoned_choice_answer,
    "cued": cued_choice_answer,
    "restated": restated_choice_answer,
}
# the forms whose letter is a lookup of a digit named first, and those of them with an `answer_opening`
DIGIT_FIRST_ANSWERS = ("reasoned", "cued", "restated")
OPENED_ANSWERS = ("cued", "restated")
# generated tokens that hold the longest answer, the restated one (up to 53 and <|im_end|> on the test set)
ANSWER_TOKENS = 64


def mixed_turn(
    record: dict, rng: np.random.Generator, choice_answers: str = "letter", listed_open: int = 0
) -> tuple[str, str]:
    """One training turn: the record's question and answer in the open or the multiple-choice form, each
    with probability 1/2 (one draw from `rng`); a multiple-choice answer as `CHOICE_ANSWERS[choice_answers]`,
    an open question with up to `listed_open` random digits listed in it (`listed_open_question`)."""
    if rng.random() < 0.5:
        return choice_question(record), CHOICE_ANSWERS[choice_answers](record)
    question = listed_open_question(record, rng, listed_open) if listed_open else open_question(record)
    return question, record["answer_text"]


def listed_open_question(record: dict, rng: np.random.Generator, max_options: int) -> str:
    """The open form with an option list of 0 to `max_options` random digits (uniform count, drawn from
    `rng`) between the question and "Answer with the digit.", where the multiple-choice form lists its
    options. A model that reads the digit only right after the question reads it at chance among the
    options once the list comes between (BENCHMARKS.md item 11); here the list holds the answer only by
    chance, so copying a listed digit earns nothing and the reading has to work behind the list."""
    count = int(rng.integers(max_options + 1))
    if count == 0:
        return open_question(record)
    question, instruction = open_question(record).rsplit("\n", 1)
    digits = rng.choice(10, count, replace=False)
    listed = "\n".join(f"{letter}. {digit}" for letter, digit in zip(LETTERS, digits))
    return f"{question}\nOptions:\n{listed}\n{instruction}"


def question_words(record: dict) -> str:
    """The question itself ("The red square ... touching the wall?"), the same in both forms: the text
    whose tokens a question-restricted attention map averages over."""
    return open_question(record).split("\n")[0]


def without_digits(frames: np.ndarray, records: list[dict], keep: Sequence[dict] = ()) -> np.ndarray:
    """A clip's frames `(T, H, W, 3)` with the digit frame of each of its `records` not in `keep` replaced by
    the frame before it: the squares move on and no digit shows there. With `keep`, a clip whose only
    digit events are the ones the kept records ask about. (Digit frames are odd, 4j+1 and 4j+3, so the
    frame before one never shows a digit.)"""
    edited = frames.copy()
    for record in records:
        if not any(record is kept for kept in keep):
            for t in record["detail_frames"]:
                edited[t] = frames[t - 1]
    return edited


def one_per_square(clip: list[dict], rng: np.random.Generator) -> list[dict]:
    """One of each square's two questions (a clip lists them square by square: records 2k and 2k + 1), each
    drawn from `rng`: the questions of a clip that keeps one digit per square, told apart by colour."""
    return [clip[2 * k + int(rng.integers(2))] for k in range(len(clip) // 2)]
