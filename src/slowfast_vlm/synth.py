"""Write the synthetic fine-detail video QA benchmark: digits flashed for one frame by bouncing squares.

Each clip shows three coloured squares bouncing on a black background. Each square flashes two white
digits in two frames of one 4-frame pooling window: one while it touches a wall, one while it does not.
Questions ask for one of them. The digit frames are never picked by the 16-frame samplers, and the
two digits of a square share one fast-token pooling window, so only a model that sees every frame
separately can answer. See docs/synth.md for the rules.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .processing.video import fps_sample_indices, uniform_sample_indices, write_video
from .synth_spec import CATEGORIES, MIN_FRAMES, NUM_OBJECTS, QUESTIONS_PER_CLIP, SPLITS

POOL = 4  # fast_temporal_pooling_stride: frames 4j..4j+3 are averaged into fast frame j
BASELINE_FRAMES = 16  # frame count of the self-attention-only baseline
GUARDED_TARGET_FPS = (1.0, 2.0, 4.0)  # fps-sampler targets whose picks never show a digit
LETTERS = "ABCD"
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 40),
    "blue": (50, 80, 230),
    "orange": (220, 120, 20),
    "purple": (160, 60, 200),
}  # luma 88-138: white digits (luma 255) stay the only bright pixels
CHOICE_INSTRUCTION = "Answer with the option's letter."  # closes every multiple-choice question
OPEN_INSTRUCTION = "Answer with the digit."  # closes every open question
INK_LUMA = 170  # a pixel brighter than this is digit ink
CRF = 12  # h264 quality: the digits survive compression with no lost ink pixel
FONT_5X7 = {
    0: "01110 10001 10011 10101 11001 10001 01110",
    1: "00100 01100 00100 00100 00100 00100 01110",
    2: "01110 10001 00001 00010 00100 01000 11111",
    3: "11111 00010 00100 00010 00001 10001 01110",
    4: "00010 00110 01010 10010 11111 00010 00010",
    5: "11111 10000 11110 00001 00001 10001 01110",
    6: "00110 01000 10000 11110 10001 10001 01110",
    7: "11111 00001 00010 00100 01000 01000 01000",
    8: "01110 10001 10001 01110 10001 10001 01110",
    9: "01110 10001 10001 01111 00001 00010 01100",
}


def glyph_scale(size: int) -> int:
    """Pixels per font cell: 2 at 64 px, so a digit is 10 x 14 px on a 16 px square."""
    return size // 32


def glyph(digit: int, scale: int) -> np.ndarray:
    """(7 * scale, 5 * scale) bool mask of a digit."""
    rows = [[c == "1" for c in row] for row in FONT_5X7[digit].split()]
    return np.kron(np.array(rows), np.ones((scale, scale), dtype=bool))


def guarded_frames(num_frames: int, fps: float) -> set[int]:
    """Every frame a 16-frame baseline may see: uniform sampling and fps sampling at each guarded target."""
    picked = set(uniform_sample_indices(num_frames, BASELINE_FRAMES))
    for target in GUARDED_TARGET_FPS:
        picked.update(fps_sample_indices(num_frames, fps, BASELINE_FRAMES, target))
    return picked


def event_windows(num_frames: int, fps: float) -> list[int]:
    """Pooling windows j whose frames 4j+1 and 4j+3 (the two digit frames) are both unguarded."""
    guarded = guarded_frames(num_frames, fps)
    return [
        j for j in range(num_frames // POOL) if POOL * j + 1 not in guarded and POOL * j + 3 not in guarded
    ]


def _check_args(seed: int, split: str, frames: int, size: int, fps: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if frames < MIN_FRAMES:
        raise ValueError(f"frames must be >= {MIN_FRAMES} (16 fast-token pooling windows of 4), got {frames}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32 (h264 yuv420p, 5x7 digits), got {size}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    windows = event_windows(frames, fps)
    if len(windows) < NUM_OBJECTS:
        raise ValueError(
            f"frames={frames}, fps={fps}: only {len(windows)} pooling windows avoid every frame the 16-frame "
            f"samplers pick, need {NUM_OBJECTS}; use fps >= 8"
        )


def _bounce(unfolded: np.ndarray, span: int) -> np.ndarray:
    """Position in [0, span] of a point moving along `unfolded` between two walls (a triangle wave)."""
    return span - np.abs(span - np.mod(unfolded, 2 * span))


def _clip_rng(clip: int, seed: int, split: str) -> np.random.Generator:
    # One independent stream per (seed, split, clip): clips never depend on how many others are written.
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), clip]))


def _object_track(
    rng: np.random.Generator, touch: int, away: int, frames: int, scale: int, span: int
) -> np.ndarray:
    """(T, 2) integer (x, y) of a square that touches one wall at frame `touch` and none at frame `away`.

    On the contact axis the square moves `v` px per frame and is at the wall exactly at `touch`, so it is
    `2 v` px (>= 3 scale) off that wall at `away`; on the other axis it stays >= 2 scale px off both walls
    at both frames, so "touching the wall" is unambiguous.
    """
    t = np.arange(frames)
    axis = int(rng.integers(2))
    wall = int(rng.integers(2)) * span
    speed = int(rng.integers(math.ceil(1.5 * scale), 2 * scale + 1))
    track = np.empty((frames, 2), dtype=np.int64)
    track[:, axis] = _bounce(wall + speed * (t - touch), span)
    while True:
        other = _bounce(rng.integers(2 * span) + rng.integers(1, 2 * scale + 1) * t, span)
        if all(2 * scale <= other[f] <= span - 2 * scale for f in (touch, away)):
            track[:, 1 - axis] = other
            return track


def question_sentence(colour: str, category: str) -> str:
    """The question about one square's digit, without its options: "The red square showed ... wall?"."""
    condition = "touching" if category == "digit_touching_wall" else "not touching"
    return f"The {colour} square showed two digits near a wall. Which digit did it show while {condition} the wall?"


def generate_clip(
    clip: int, seed: int = 0, split: str = "train", frames: int = 64, size: int = 64, fps: float = 8.0
) -> tuple[np.ndarray, list[dict]]:
    """Render clip `clip` of a split and its `QUESTIONS_PER_CLIP` records (2 questions per square).

    Returns RGB uint8 frames `(T, size, size, 3)` and the records, in question order (square k's
    "touching" question, then its "not touching" question). Deterministic per (seed, split, clip).
    """
    _check_args(seed, split, frames, size, fps)
    rng = _clip_rng(clip, seed, split)
    scale = glyph_scale(size)
    side = 7 * scale + 2  # the glyph plus a 1 px margin above and below
    offset = np.array([scale + 1, 1])  # (x, y) of the glyph inside its square
    span = size - side
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), NUM_OBJECTS, replace=False)]
    digits = rng.choice(10, 2 * NUM_OBJECTS, replace=False).reshape(2, NUM_OBJECTS)  # (touching/away, k)
    windows = rng.choice(event_windows(frames, fps), NUM_OBJECTS, replace=False)
    events = []  # per square: (touch frame, away frame)
    tracks = []
    for window in windows:
        touch, away = POOL * int(window) + rng.permutation([1, 3])
        events.append((int(touch), int(away)))
        tracks.append(_object_track(rng, touch, away, frames, scale, span))

    shown = {}  # frame -> (square, digit): at most one square shows a digit in any frame
    for k, (touch, away) in enumerate(events):
        shown[touch] = (k, int(digits[0, k]))
        shown[away] = (k, int(digits[1, k]))
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        flashing, digit = shown.get(t, (None, None))
        for k in sorted(range(NUM_OBJECTS), key=lambda k: k == flashing):  # the flashing square on top
            x, y = tracks[k][t]
            video[t, y : y + side, x : x + side] = COLOURS[colours[k]]
        if flashing is not None:
            x, y = tracks[flashing][t] + offset
            mask = glyph(digit, scale)
            video[t, y : y + mask.shape[0], x : x + mask.shape[1]][mask] = 255

    clip_id = f"{split}-{seed}-{clip:06d}"
    records = []
    for k in range(NUM_OBJECTS):
        for c, category in enumerate(CATEGORIES):
            answer = int(digits[c, k])
            others = [int(d) for d in digits[:, np.arange(NUM_OBJECTS) != k].ravel()]
            options = [answer, int(digits[1 - c, k]), *rng.choice(others, 2, replace=False).tolist()]
            options = [str(d) for d in rng.permutation(options)]
            letter = LETTERS[options.index(str(answer))]
            frame, distractor = events[k] if c == 0 else events[k][::-1]
            x0, y0 = (tracks[k][frame] + offset).tolist()
            listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
            prompt = f"<video>\n{question_sentence(colours[k], category)}\nOptions:\n{listed}\n{CHOICE_INSTRUCTION}"
            records.append(
                {
                    "id": f"{clip_id}-q{len(records)}",
                    "video": f"videos/{clip_id}.mp4",
                    "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": letter}],
                    "options": options,
                    "answer": letter,
                    "answer_text": str(answer),
                    "category": category,
                    "detail_frames": [frame],
                    "detail_box": [x0, y0, x0 + 5 * scale, y0 + 7 * scale],
                    "distractor_frames": [distractor],
                }
            )
    return video, records


def open_question(record: dict) -> str:
    """The open-ended form of a record's question: no option list, answered with the digit itself
    (`answer_text`); scored as multiple choice by comparing the four options' digits."""
    question = record["conversations"][0]["value"].removeprefix("<video>\n").split("\nOptions:")[0]
    return f"{question}\n{OPEN_INSTRUCTION}"


def choice_question(record: dict) -> str:
    """The benchmark's multiple-choice form of a record's question without its `<video>` placeholder: the
    question, its option list and "Answer with the option's letter." (answered with `answer`, a letter)."""
    return record["conversations"][0]["value"].removeprefix("<video>\n")


def generate_sample(
    index: int, seed: int = 0, split: str = "train", frames: int = 64, size: int = 64, fps: float = 8.0
) -> tuple[np.ndarray, dict]:
    """Sample `index` of a split: question `index % QUESTIONS_PER_CLIP` of clip `index // QUESTIONS_PER_CLIP`.

    Returns the clip's RGB uint8 frames `(T, size, size, 3)` and the record.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    video, records = generate_clip(index // QUESTIONS_PER_CLIP, seed, split, frames, size, fps)
    return video, records[index % QUESTIONS_PER_CLIP]


def write_split(
    out: str | Path,
    num: int,
    split: str = "train",
    seed: int = 0,
    frames: int = 64,
    size: int = 64,
    fps: float = 8.0,
    progress: bool = True,
) -> Path:
    """Write samples 0..num-1 of a split: `out/videos/<clip id>.mp4` and `out/<split>.jsonl`.

    Every clip is rendered and encoded once; its records are consecutive lines. Returns the JSONL path.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    _check_args(seed, split, frames, size, fps)
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    num_clips = -(-num // QUESTIONS_PER_CLIP)
    for clip in tqdm(
        range(num_clips), desc=f"synth {split}", unit="clip", file=sys.stderr, disable=not progress
    ):
        video, records = generate_clip(clip, seed, split, frames, size, fps)
        write_video(out / records[0]["video"], video, fps, crf=CRF)
        lines += [json.dumps(r) for r in records[: num - clip * QUESTIONS_PER_CLIP]]
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def find_digit(frames: np.ndarray, digit: int, max_mismatch: int = 0) -> list[tuple[int, int, int]]:
    """Where a digit is drawn: `(frame, x, y)` of every glyph-sized window whose ink matches its mask.

    Ink is luma > `INK_LUMA`; a window matches if at most `max_mismatch` of its pixels differ
    from the digit's mask (0 for rendered frames; a few for decoded ones).
    """
    ink = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) > INK_LUMA
    mask = glyph(digit, glyph_scale(frames.shape[2]))
    inked = np.flatnonzero(ink.any(axis=(1, 2)))  # only a few frames show a digit at all
    windows = np.lib.stride_tricks.sliding_window_view(ink[inked], mask.shape, axis=(1, 2))
    mismatches = (windows != mask).sum(axis=(-2, -1))  # (frames with ink, H - h + 1, W - w + 1)
    return [(int(inked[i]), int(x), int(y)) for i, y, x in zip(*np.nonzero(mismatches <= max_mismatch))]


def check_detail(frames: np.ndarray, record: dict, max_mismatch: int = 0) -> None:
    """Raise ValueError unless the asked-about digit is drawn exactly at `detail_box` in the
    `detail_frames` and nowhere in any other frame."""
    x0, y0 = record["detail_box"][:2]
    found = find_digit(frames, int(record["answer_text"]), max_mismatch)
    expected = [(t, x0, y0) for t in record["detail_frames"]]
    if found != expected:
        raise ValueError(
            f"{record['id']}: digit {record['answer_text']} found at {found}, expected {expected}"
        )


def main(args: argparse.Namespace) -> int:
    try:
        path = write_split(args.out, args.num, args.split, args.seed, args.frames, args.size, args.fps)
    except ValueError as error:
        print(f"slowfast-vlm synth: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} samples to {path}")
    return 0
