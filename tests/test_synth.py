"""Tests of the synthetic fine-detail benchmark (slowfast_vlm.synth).

The frame samplers of the 16-frame baseline and the fast-token pooling windows are re-derived here
from architecture sections 1.1 and 1.3 (docs/architecture.md), not taken from the generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from slowfast_vlm import SlowFastConfig, build_fast_tokens
from slowfast_vlm.cli import main as cli_main
from slowfast_vlm.synth import (
    CATEGORIES,
    QUESTIONS_PER_CLIP,
    check_detail,
    generate_clip,
    generate_sample,
    glyph,
    open_question,
    write_split,
)

FIELDS = {"id", "video", "conversations", "options", "answer", "answer_text", "category"}
FIELDS |= {"detail_frames", "detail_box", "distractor_frames"}


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def baseline_frames(total: int, video_fps: float) -> set[int]:
    """Every frame a 16-frame baseline sees: uniform, and fps sampling at 1, 2 and 4 fps (architecture 1.1)."""
    seen = set(np.linspace(0, total - 1, 16).astype(int).tolist())
    for target_fps in (1, 2, 4):
        step = max(1, round(video_fps / target_fps))
        candidates = list(range(0, total, step))
        n = len(candidates)
        picks = range(n) if n <= 16 else [round((i + 1) * n / 16 - 1) for i in range(16)]
        seen.update(candidates[p] for p in picks)
    return seen


def pooling_weights(total: int, sampling_stride: int) -> np.ndarray:
    """(fast frames, T): how much each frame contributes to each fast frame, via build_fast_tokens."""
    config = SlowFastConfig(fast_temporal_sampling_stride=sampling_stride)
    one_hot = torch.eye(total).unsqueeze(1)  # (T, 1 token, D = T)
    return build_fast_tokens(one_hot, (1, 1), config).numpy()


def contrast(region: np.ndarray, mask: np.ndarray) -> float:
    """Mean luma on the digit's strokes minus mean luma around them."""
    return float(region[mask].mean() - region[~mask].mean())


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_split(out, 2 * QUESTIONS_PER_CLIP, "val", seed=5, progress=False)
    return out


def test_jsonl_fields(written):
    records = read_jsonl(written / "val.jsonl")
    assert len(records) == 2 * QUESTIONS_PER_CLIP
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == FIELDS
        assert (written / r["video"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"] == r["answer"]
        assert human["value"].startswith("<video>\n") and human["value"].endswith(
            "Answer with the option's letter."
        )
        for letter, option in zip("ABCD", r["options"]):
            assert f"\n{letter}. {option}\n" in human["value"]
        assert len(r["options"]) == len(set(r["options"])) == 4
        assert r["options"]["ABCD".index(r["answer"])] == r["answer_text"]
        assert r["category"] in CATEGORIES
        x0, y0, x1, y1 = r["detail_box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_open_question_drops_the_options():
    _, records = generate_clip(0, seed=0, split="val")
    for r in records:
        question = open_question(r)
        colour = next(
            c for c in ("red", "green", "blue", "orange", "purple") if f"The {c} square" in question
        )
        condition = "while not touching" if r["category"] == "digit_away_from_wall" else "while touching"
        assert question == (
            f"The {colour} square showed two digits near a wall. Which digit did it show {condition} the wall?"
            "\nAnswer with the digit."
        )
        assert r["answer_text"] not in question  # no option list left to copy the answer from


def test_deterministic(written, tmp_path):
    write_split(tmp_path, 2 * QUESTIONS_PER_CLIP, "val", seed=5, progress=False)
    assert (tmp_path / "val.jsonl").read_bytes() == (written / "val.jsonl").read_bytes()
    records = read_jsonl(written / "val.jsonl")
    for r in records[::QUESTIONS_PER_CLIP]:
        np.testing.assert_array_equal(decode(tmp_path / r["video"]), decode(written / r["video"]))
    # The in-memory API gives the same samples.
    frames, record = generate_sample(QUESTIONS_PER_CLIP + 4, seed=5, split="val")
    assert record == records[QUESTIONS_PER_CLIP + 4]
    np.testing.assert_array_equal(frames, generate_clip(1, seed=5, split="val")[0])


def test_splits_and_seeds_disjoint():
    seen: dict[bytes, tuple] = {}
    for split, seed in [("train", 0), ("val", 0), ("test", 0), ("train", 1)]:
        for clip in range(4):
            frames, records = generate_clip(clip, seed, split)
            key = frames.tobytes()
            assert key not in seen, f"{(split, seed, clip)} repeats {seen[key]}"
            seen[key] = (split, seed, clip)
            assert records[0]["id"].startswith(f"{split}-{seed}-")


def test_answers_depend_on_the_question():
    for clip in range(5):
        _, records = generate_clip(clip, seed=2, split="train")
        # Six questions of one clip: six different answers (2 per square x 3 squares).
        assert len({r["answer_text"] for r in records}) == QUESTIONS_PER_CLIP
        for touching, away in zip(records[::2], records[1::2]):
            assert (touching["category"], away["category"]) == CATEGORIES
            # Same square: the questions differ only by "not", the options hold both answers.
            question = touching["conversations"][0]["value"].split("\n")[1]
            assert away["conversations"][0]["value"].split("\n")[1] == question.replace("while", "while not")
            assert {touching["answer_text"], away["answer_text"]} <= set(touching["options"]) & set(
                away["options"]
            )
            assert touching["detail_frames"] == away["distractor_frames"]


@pytest.mark.parametrize("total", [64, 128])
def test_detail_missed_by_16_frame_samplers_and_shares_a_pooling_window(total):
    seen = baseline_frames(total, video_fps=8.0)
    window_of = pooling_weights(total, sampling_stride=1)
    for clip in range(6):
        _, records = generate_clip(clip, seed=0, split="test", frames=total)
        for r in records:
            (detail,), (distractor,) = r["detail_frames"], r["distractor_frames"]
            assert detail not in seen and distractor not in seen
            # Both digits go into one fast frame, each with weight 1/4: no fast frame shows one alone.
            (fast,) = np.nonzero(window_of[:, detail])[0]
            assert window_of[fast, detail] == window_of[fast, distractor] == pytest.approx(0.25)
    # The released 128-frame s2t4 model keeps even frames only: digits never reach its fast tokens.
    if total == 128:
        assert all(d % 2 == 1 for r in records for d in r["detail_frames"] + r["distractor_frames"])
        assert not pooling_weights(total, sampling_stride=2)[:, 1::2].any()


def test_rendered_detail_only_in_detail_frames():
    frames, records = generate_clip(3, seed=1, split="train")
    ink = luma(frames) > 200  # the digits are the only white pixels
    digit_frames = {d for r in records for d in r["detail_frames"]}
    assert set(np.nonzero(ink.any(axis=(1, 2)))[0]) == digit_frames
    for r in records:
        (t,), (x0, y0, x1, y1) = r["detail_frames"], r["detail_box"]
        assert ink[t, y0:y1, x0:x1].sum() == ink[t].sum()  # the box holds all ink of the frame
        np.testing.assert_array_equal(ink[t, y0:y1, x0:x1], glyph(int(r["answer_text"]), 2))
        check_detail(frames, r)
    # The checker notices the digit in an extra frame, and a wrong frame list.
    r = records[0]
    (t,), (x0, y0, x1, y1) = r["detail_frames"], r["detail_box"]
    bad = frames.copy()
    bad[t + 2, y0:y1, x0:x1] = frames[t, y0:y1, x0:x1]
    with pytest.raises(ValueError, match="found at"):
        check_detail(bad, r)
    with pytest.raises(ValueError, match="found at"):
        check_detail(frames, {**r, "detail_frames": [t + 1]})


def test_detail_survives_h264_and_not_4_frame_averaging(written):
    for r in read_jsonl(written / "val.jsonl"):
        clip = int(r["id"].split("-")[2])
        rendered = generate_clip(clip, seed=5, split="val")[0]
        decoded = decode(written / r["video"])
        assert decoded.shape == rendered.shape == (64, 64, 64, 3)
        (t,), (x0, y0, x1, y1) = r["detail_frames"], r["detail_box"]
        mask = glyph(int(r["answer_text"]), 2)
        box = np.s_[y0:y1, x0:x1]
        single = contrast(luma(decoded[t])[box], mask)
        assert single > 100  # white strokes on a mid-dark square
        assert np.abs(luma(decoded[t])[box] - luma(rendered[t])[box]).mean() < 16
        check_detail(decoded, r)  # every ink pixel survives: exact glyph, only in its frame
        window = slice(t - t % 4, t - t % 4 + 4)  # the fast-token pooling window
        pooled = contrast(luma(decoded[window]).mean(axis=0)[box], mask)
        assert pooled < 0.5 * single


def test_bad_input():
    with pytest.raises(ValueError, match="split"):
        generate_clip(0, split="dev")
    with pytest.raises(ValueError, match="frames"):
        generate_clip(0, frames=32)
    with pytest.raises(ValueError, match="size"):
        generate_clip(0, size=63)
    with pytest.raises(ValueError, match="fps"):
        generate_clip(0, fps=4.0)  # the 4 fps sampler would then pick every 4th frame from frame 3
    with pytest.raises(ValueError, match="index"):
        generate_sample(-1)
    with pytest.raises(ValueError, match="num"):
        write_split("unused", 0)


def test_cli(tmp_path, capsys):
    assert (
        cli_main(["synth", "--out", str(tmp_path / "a"), "--num", "7", "--split", "test", "--seed", "2"]) == 0
    )
    write_split(tmp_path / "b", 7, "test", seed=2, progress=False)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    assert len(list((tmp_path / "a" / "videos").glob("*.mp4"))) == 2
    assert "synth test" in capsys.readouterr().err  # progress bar on stderr
    assert cli_main(["synth", "--out", str(tmp_path / "c"), "--num", "6", "--frames", "40"]) == 2
    assert "frames must be >= 64" in capsys.readouterr().err
