"""Scoring a model of the synthetic experiment: accuracy in both question forms, where its cross-attention
peaks (averaged over every query token, and over the question's own tokens), clips from a fresh seed,
and what it answers about a clip that shows no digit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmark import (
    ANSWER_TOKENS,
    CHOICE_ANSWERS,
    FORMS,
    FPS,
    FRAMES,
    SIZE,
    answer_opening,
    conversation,
    question_cue,
    question_words,
    reasoned_answer_start,
    without_digits,
)

from slowfast_vlm.attention_maps import span_attention_map, video_attention_map
from slowfast_vlm.inference import answer, compute_attention_map, load_model, text_span
from slowfast_vlm.processing.video import load_video, write_video
from slowfast_vlm.synth import CATEGORIES, CRF, LETTERS, generate_clip


def chooses_answer(digit_scores: torch.Tensor, record: dict) -> bool:
    """Open form scored as multiple choice: of the record's 4 option digits, is the one with the best of
    `digit_scores` `(10,)` (the digit tokens' logits) its answer?"""
    options = [int(option) for option in record["options"]]
    return options[int(digit_scores[options].argmax())] == int(record["answer_text"])


def best_letter(letter_scores: torch.Tensor) -> str:
    """Multiple-choice form: the letter (A-D) with the best of `letter_scores` `(4,)`."""
    return LETTERS[int(letter_scores.argmax())]


def chooses_letter(letter_scores: torch.Tensor, record: dict) -> bool:
    """Multiple-choice form: is the letter with the best of `letter_scores` `(4,)` (A-D) the record's answer?"""
    return best_letter(letter_scores) == record["answer"]


OPEN_ANSWER_KINDS = (
    "right",
    "same square",
    "other square, same wall",
    "other square, other wall",
    "not in clip",
)


def open_answer_kind(digit: str, record: dict, clip: list[dict]) -> str:
    """Which of the clip's digits an open-form answer `digit` names (`OPEN_ANSWER_KINDS`): the right one, the
    asked square's other one (right colour, other wall contact), another square's with the asked wall
    contact or with the other, or none of the clip's."""
    if digit == record["answer_text"]:
        return "right"
    shown = next((other for other in clip if other["answer_text"] == digit), None)
    if shown is None:
        return "not in clip"
    # (colour, "touching: " or "not touching: ") of the question asked and of the one whose answer was named
    asked, named = (question_cue(question_words(r)).split(", ") for r in (record, shown))
    if asked[0] == named[0]:
        return "same square"
    return "other square, same wall" if asked[1] == named[1] else "other square, other wall"


def question_prefixes(prompt: str, record: dict) -> tuple[str, str]:
    """`prompt` cut just before and just after the record's question words."""
    words = question_words(record)
    start = prompt.index(words)
    return prompt[:start], prompt[: start + len(words)]


def token_ids(tokenizer, symbols: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(symbol) for symbol in symbols]


@torch.no_grad()
def score_clip(
    model, processor, frames: np.ndarray, clip: list[dict], answers: str = "reasoned"
) -> list[dict]:
    """Per question of a clip (`frames` `(T, H, W, 3)` as the model samples them): is it answered in the
    open and in the multiple-choice form (the best option at the answer position), and in the
    multiple-choice form answered digit first, "7; A. 3 B. 7 C. 1 D. 0; B" (`reasoned_*`: the best of
    the 10 digits at the answer position, then the best letter after "<that digit>; <the options>; "),
    and, for a slow-fast model, does the cross-attention peak on the asked-about digit's frame, averaged
    over every query token of the open-form prompt (`peak_all`) and over the question's own words only
    (`peak_question`). `answers`: the digit-first form, whose `answer_opening` ("cued", "restated")
    comes before the digit; the digit is read after it."""
    has_slow = bool(model.config.hybrid_layer_indices)
    prompts = {
        form: [
            processor.apply_chat_template(conversation([ask(record)]), add_generation_prompt=True)
            for record in clip
        ]
        for form, (ask, _) in FORMS.items()
    }
    texts = prompts["open"] + prompts["choice"]
    if has_slow:  # + each open prompt cut before and after its question words
        texts += [
            cut for prompt, record in zip(prompts["open"], clip) for cut in question_prefixes(prompt, record)
        ]
    openings = [answer_opening(answers, question_words(record)) for record in clip]
    opened = any(openings)
    digit_rows = range(len(texts), len(texts) + len(clip)) if opened else range(len(clip), 2 * len(clip))
    if opened:  # each multiple-choice prompt followed by its answer's opening: where the digit is named
        texts += [prompt + opening for prompt, opening in zip(prompts["choice"], openings)]
    inputs = processor(
        text=texts, videos=[frames] * len(texts), padding=True, padding_side="right", return_tensors="pt"
    )
    outputs = model(**inputs, record_slow_attention=has_slow)
    lengths = inputs["attention_mask"].sum(1)
    scores = outputs.logits[torch.arange(len(texts)), lengths - 1]  # (rows, vocab): the answer position
    digits, letters = token_ids(processor.tokenizer, "0123456789"), token_ids(processor.tokenizer, LETTERS)
    grid = (len(frames), *model.model.visual_grid(len(frames)))
    named = [str(int(scores[row, digits].argmax())) for row in digit_rows]
    starts = [
        reasoned_answer_start(digit, list(zip(LETTERS, r["options"])), opening)
        for digit, r, opening in zip(named, clip, openings)
    ]
    reasoned = reasoned_letters(model, processor, frames, prompts["choice"], starts)
    results = []
    for b, record in enumerate(clip):
        letter = best_letter(scores[len(clip) + b, letters])
        result = {
            "category": record["category"],
            "open": chooses_answer(scores[b, digits], record),
            "open_answer": open_answer_kind(str(int(scores[b, digits].argmax())), record, clip),
            "choice": letter == record["answer"],
            "choice_letter": letter,
            "reasoned_digit": named[b] == record["answer_text"],
            "reasoned_choice": reasoned[b] == record["answer"],
            # did the letter name the option holding the digit named? (None: that digit is no option)
            "reasoned_lookup": (
                LETTERS[record["options"].index(named[b])] == reasoned[b]
                if named[b] in record["options"]
                else None
            ),
        }
        if has_slow:
            start, end = 2 * len(clip) + 2 * b, 2 * len(clip) + 2 * b + 1
            ids = inputs["input_ids"]
            if not all(torch.equal(ids[row, : lengths[row]], ids[b, : lengths[row]]) for row in (start, end)):
                raise RuntimeError(
                    f"{record['id']}: the cut prompts do not tokenize as the prompt's prefixes"
                )
            detail = record["detail_frames"][0]
            result["peak_all"] = video_attention_map(outputs.slow_cache, b, grid).peak_frame == detail
            result["peak_question"] = (
                span_attention_map(outputs.slow_cache, end, start, grid).peak_frame == detail
            )
        results.append(result)
    return results


@torch.no_grad()
def reasoned_letters(
    model, processor, frames: np.ndarray, prompts: list[str], starts: list[str]
) -> list[str]:
    """Per multiple-choice prompt (a chat ending in the assistant's turn), the best letter (A-D) after its
    digit-first answer's start ("7; A. 3 B. 7 C. 1 D. 0; ", `benchmark.reasoned_answer_start`)."""
    texts = [prompt + start for prompt, start in zip(prompts, starts)]
    inputs = processor(
        text=texts, videos=[frames] * len(texts), padding=True, padding_side="right", return_tensors="pt"
    )
    lengths = inputs["attention_mask"].sum(1)
    scores = model(**inputs).logits[torch.arange(len(texts)), lengths - 1]
    return [best_letter(row[token_ids(processor.tokenizer, LETTERS)]) for row in scores]


def accuracy_report(results: list[dict]) -> dict:
    """Accuracy in both forms, overall and per category, and the attention-peak rates, of `score_clip` results.

    Keys: `accuracy` and `<category>` (open form), `choice_accuracy` and `choice_<category>`,
    `choice_letters` (the share of the multiple-choice answers naming each letter: a model that has not
    learnt the form names one letter), for the digit-first answer `reasoned_choice_accuracy` (the letter),
    `reasoned_digit_accuracy` (the digit, of 10), `open_answers` (the share of open-form answers, the best of
    the 10 digits, of each `OPEN_ANSWER_KINDS`: whose digit of the clip they name), and `reasoned_lookup_accuracy` (the letter is the one
    of the option holding the digit named, over answers naming an option's digit; None if none did), and for a slow-fast model `attention_peak_on_detail_frame` (every query token) and
    `question_attention_peak_on_detail_frame` (the question's words)."""
    report = {"questions": len(results)}
    for form, prefix in (("open", ""), ("choice", "choice_")):
        report[f"{prefix}accuracy"] = float(np.mean([r[form] for r in results]))
        for category in CATEGORIES:
            report[f"{prefix}{category}"] = float(
                np.mean([r[form] for r in results if r["category"] == category])
            )
    letters = [r["choice_letter"] for r in results]
    report["choice_letters"] = {letter: letters.count(letter) / len(letters) for letter in LETTERS}
    report["reasoned_choice_accuracy"] = float(np.mean([r["reasoned_choice"] for r in results]))
    report["reasoned_digit_accuracy"] = float(np.mean([r["reasoned_digit"] for r in results]))
    if "open_answer" in results[0]:
        kinds = [r["open_answer"] for r in results]
        report["open_answers"] = {kind: kinds.count(kind) / len(kinds) for kind in OPEN_ANSWER_KINDS}
    looked_up = [r["reasoned_lookup"] for r in results if r["reasoned_lookup"] is not None]
    report["reasoned_lookup_accuracy"] = float(np.mean(looked_up)) if looked_up else None
    if "peak_all" in results[0]:
        report["attention_peak_on_detail_frame"] = float(np.mean([r["peak_all"] for r in results]))
        report["question_attention_peak_on_detail_frame"] = float(
            np.mean([r["peak_question"] for r in results])
        )
    return report


def test_accuracy(model, processor, data: Path, clips: list[list[dict]], answers: str = "reasoned") -> dict:
    """`accuracy_report` on test clips, each decoded from its mp4 with the model's own sampling (as `ask`
    does); `answers` as `score_clip`."""
    was_training = model.training
    model.eval()
    results = []
    for clip in clips:
        frames, _ = load_video(data / clip[0]["video"], **processor.sampling_defaults())
        results += score_clip(model, processor, frames, clip, answers)
    model.train(was_training)
    return accuracy_report(results)


def round_trip(rendered: np.ndarray, processor) -> np.ndarray:
    """A rendered clip `(T, S, S, 3)` as the model sees the test set's: through the mp4 (CRF 12) and back,
    sampled with the model's own defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_video(path, rendered, FPS, crf=CRF)
        frames, _ = load_video(path, **processor.sampling_defaults())
    return frames


def no_digit_answers(model, processor, seed: int) -> dict:
    """What the model answers (greedy, as `ask`) to the 6 questions of clip 0 of `seed`, in both forms,
    when the clip is all black and when it shows the squares but no digit frame."""
    rendered, records = generate_clip(0, seed, "test", FRAMES, SIZE, FPS)
    videos = {"black": np.zeros_like(rendered), "squares_without_digits": without_digits(rendered, records)}
    findings = {}
    for name, video in videos.items():
        frames = round_trip(video, processor)
        findings[name] = {
            form: [
                answer(model, processor, frames, ask(r), max_new_tokens=ANSWER_TOKENS).text for r in records
            ]
            for form, (ask, _) in FORMS.items()
        }
    return findings


def score(checkpoint: Path, seed: int = 7, clips: int = 20, answers: str = "reasoned") -> dict:
    """A checkpoint on `clips` clips of a fresh synthetic seed (rendered, through the mp4 round trip):
    `accuracy_report` (`answers` as `score_clip`), and its answers about clips without any digit
    (`no_digit_answers`)."""
    model, processor = load_model(checkpoint, "cpu", "float32")
    results = []
    for index in range(clips):
        rendered, records = generate_clip(index, seed, "test", FRAMES, SIZE, FPS)
        results += score_clip(model, processor, round_trip(rendered, processor), records, answers)
    report = {"checkpoint": str(checkpoint), "seed": seed, "clips": clips, **accuracy_report(results)}
    return report | {"no_digit": no_digit_answers(model, processor, seed)}


def demo_question(
    model, processor, data: Path, clips: list[list[dict]], choice_answers: str = "letter"
) -> dict | None:
    """The first test question the model answers correctly in both forms through `ask`'s code path (greedy
    `answer`; the multiple-choice form answered as `CHOICE_ANSWERS[choice_answers]`) while the map
    `ask --attention-map` draws for the open form (the cross-attention of the question's own tokens)
    peaks on the digit's frame (None if none)."""
    for clip in clips:
        frames, _ = load_video(data / clip[0]["video"], **processor.sampling_defaults())
        for record in clip:
            expected = {"open": record["answer_text"], "choice": CHOICE_ANSWERS[choice_answers](record)}
            replies = {
                form: answer(model, processor, frames, ask(record), max_new_tokens=ANSWER_TOKENS)
                for form, (ask, _) in FORMS.items()
            }
            if any(replies[form].text != expected[form] for form in FORMS):
                continue
            span = text_span(processor, replies["open"].prompt, FORMS["open"][0](record), len(frames))
            shown = compute_attention_map(model, replies["open"].output, replies["open"].video, span)
            if shown.peak_frame == record["detail_frames"][0]:
                return record
    return None
