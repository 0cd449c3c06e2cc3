"""Training data: pre-validation of LLaVA-style records (file:line reporting), token types and labels
against a literal ChatML rendering, truncation, skipped samples in the collator, the modality sampler."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from helpers import tiny_config, tiny_tokenizer
from training_helpers import GOOD_RECORDS, conversation, write_jsonl

from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.training.data import (
    IGNORE_INDEX,
    Collator,
    ConversationDataset,
    DataConfig,
    ModalityGroupedSampler,
    SkippedSample,
    read_records,
)

FAST_TOKENS_4_FRAMES = 8  # 4x4 grid pooled to 2x2; 4 frames -> adaptive pooling to min_fast_frames=2 -> 2 * 4
FAST_TOKENS_IMAGE = 16  # still images are not pooled: 4x4


@pytest.fixture(scope="module")
def processor() -> SlowFastProcessor:
    return SlowFastProcessor.from_model_config(tiny_config(), tiny_tokenizer())


def dataset(tmp_path, media, processor, records, **data) -> tuple[ConversationDataset, list[SkippedSample]]:
    config = DataConfig(
        train=[str(write_jsonl(tmp_path / "d.jsonl", records))], media_root=str(media), num_frames=4, **data
    )
    records, skipped = read_records(config, processor)
    return ConversationDataset(records, processor, config), skipped


@pytest.mark.parametrize(
    "field, value",
    [("num_frames", 0), ("fps", 0.0), ("sampling", "random"), ("max_bad_sample_fraction", 1.5)],
)
def test_data_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"data.{field} is invalid"):
        DataConfig(**{field: value})


def test_fast_token_counts_are_the_closed_form(processor):
    assert processor.num_fast_tokens(4) == FAST_TOKENS_4_FRAMES
    assert processor.num_fast_tokens(1) == FAST_TOKENS_IMAGE


# ----- pre-validation -------------------------------------------------------------------------------
def test_bad_records_are_left_out_with_file_line_and_reason(tmp_path, media, processor):
    lines = [
        GOOD_RECORDS[0],
        {"id": "missing", "video": "nope.mp4", "conversations": conversation("What?", "Nothing.")},
        {"id": "silent", "video": "cat.mp4", "conversations": [{"from": "human", "value": "Hi"}]},
        '{"id": "broken", "video": ',
        {"id": "both", "video": "cat.mp4", "image": "dog.png", "conversations": conversation("Q", "A")},
        {"id": "stray", "conversations": conversation("Q", "A", "<image>\n")},
        {"id": "bot", "conversations": [{"from": "bot", "value": "Q"}]},
        "",
        {"id": "two", "video": "cat.mp4", "conversations": conversation("Q <video> <video>", "A")},
        GOOD_RECORDS[2],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    records, skipped = read_records(DataConfig(train=[str(path)], media_root=str(media)), processor)
    assert [r.id for r in records] == ["cat", "dog"]
    expected = [
        (2, "missing", "video file not found"),
        (3, "silent", "no assistant turn"),
        (4, f"{path}:4", "malformed JSON ("),
        (5, "both", "both 'video' and 'image'"),
        (6, "stray", "has a <image> placeholder but no image file"),
        (7, "bot", "turn 0 must be"),
        (9, "two", "has 2 <video> placeholders for 1 video file(s)"),
    ]
    assert [(s.where, s.id) for s in skipped] == [(f"{path}:{line}", i) for line, i, _ in expected]
    for sample, (_, _, reason) in zip(skipped, expected):
        assert reason in sample.reason


def test_json_array_records_are_named_by_index_and_a_broken_file_is_an_error(tmp_path, media, processor):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD_RECORDS[3], ["not", "a", "record"]]))
    records, skipped = read_records(DataConfig(train=[str(path)], media_root=str(media)), processor)
    assert [r.id for r in records] == ["text"]
    assert skipped[0].where == f"{path}[1]" and skipped[0].reason == "expected a JSON object, got list"
    path.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match=r"d\.json: malformed JSON"):
        read_records(DataConfig(train=[str(path)]), processor)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such data file"):
        read_records(DataConfig(train=[str(tmp_path / "nowhere.jsonl")]), processor)


def test_placeholder_goes_to_the_front_of_the_first_human_turn(tmp_path, media, processor):
    records = [
        {"id": "late", "video": "cat.mp4", "conversations": [{"from": "system", "value": "Be brief."}] + conversation("Q?", "A.")},
        GOOD_RECORDS[0],  # "<image>\n" in a video record marks the video
        GOOD_RECORDS[2],
    ]  # fmt: skip
    ds, _ = dataset(tmp_path, media, processor, records)
    assert ds.records[0].messages[1]["content"] == "<video>\nQ?"
    assert ds.records[1].messages[0]["content"] == "<video>\nWhat happens in this video?"
    assert ds.records[2].messages[0]["content"] == "<image>\nIs there a dog in the image?"
    assert [r.modality for r in ds.records] == ["video", "video", "image"]


# ----- samples ---------------------------------------------------------------------------------------
TWO_TURNS = {
    "id": "cat2",
    "video": "cat.mp4",
    "conversations": conversation("What happens in this video?", "A cat jumps over the fence.")
    + conversation("Is there a dog?", "No."),
}


def reference_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """TWO_TURNS rendered in ChatML by hand; each segment's token count from tokenizing growing prefixes."""
    segments = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", 1),
        ("<video>" * FAST_TOKENS_4_FRAMES, 3),
        ("\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n", 1),
        ("A cat jumps over the fence.<|im_end|>", 2),
        ("\n<|im_start|>user\nIs there a dog?<|im_end|>\n<|im_start|>assistant\n", 1),
        ("No.<|im_end|>", 2),
        ("\n", 1),
    ]
    text, types = "", []
    for segment, kind in segments:
        before = len(tokenizer(text)["input_ids"]) if text else 0
        text += segment
        types += [kind] * (len(tokenizer(text)["input_ids"]) - before)
    return tokenizer(text)["input_ids"], types


def test_token_types_and_labels_match_a_literal_chatml_rendering(tmp_path, media, processor):
    ds, _ = dataset(tmp_path, media, processor, [TWO_TURNS])
    sample = ds[0]
    ids, types = reference_tokens(processor.tokenizer)
    assert sample["input_ids"].tolist() == ids
    assert sample["token_types"].tolist() == types
    assert [v.shape for v in sample["pixel_values_videos"]] == [(4, 3, 32, 32)]

    batch = Collator(pad_token_id=0)([sample])
    expected_labels = [i if t == 2 else IGNORE_INDEX for i, t in zip(ids, types)]
    assert batch["labels"][0].tolist() == expected_labels
    assert (
        processor.tokenizer.decode([i for i in expected_labels if i >= 0])
        == "A cat jumps over the fence.<|im_end|>No.<|im_end|>"
    )


def test_truncation_keeps_the_visual_tokens_or_skips_the_sample(tmp_path, media, processor, caplog):
    ids, types = reference_tokens(processor.tokenizer)
    first_response = types.index(2)
    visual_end = max(i for i, t in enumerate(types) if t == 3)

    ds, _ = dataset(tmp_path, media, processor, [TWO_TURNS], max_length=first_response + 3)
    with caplog.at_level(logging.WARNING, logger="slowfast_vlm.training.data"):
        sample = ds[0]
    assert sample["input_ids"].tolist() == ids[: first_response + 3]
    assert sample["token_types"].tolist() == types[: first_response + 3]
    assert "cat2" in caplog.text and f"{len(ids)} tokens truncated" in caplog.text

    ds, _ = dataset(tmp_path, media, processor, [TWO_TURNS], max_length=visual_end)
    skipped = ds[0]
    assert isinstance(skipped, SkippedSample) and skipped.id == "cat2" and "cut into them" in skipped.reason

    ds, _ = dataset(tmp_path, media, processor, [TWO_TURNS], max_length=first_response)
    skipped = ds[0]
    assert isinstance(skipped, SkippedSample) and "no response token left" in skipped.reason


def test_corrupt_video_is_skipped_and_the_batch_shrinks(tmp_path, media, processor):
    corrupt = {"id": "corrupt", "video": "corrupt.mp4", "conversations": conversation("Q?", "A.")}
    ds, skipped_at_start = dataset(tmp_path, media, processor, [GOOD_RECORDS[0], corrupt])
    assert skipped_at_start == []  # the file exists: only decoding finds the problem
    bad = ds[1]
    assert isinstance(bad, SkippedSample) and bad.id == "corrupt" and "cannot load video" in bad.reason
    assert "corrupt.mp4" in bad.reason

    collate = Collator(pad_token_id=0)
    batch = collate([ds[0], bad])
    assert batch["input_ids"].shape[0] == 1 and len(batch["pixel_values_videos"]) == 1
    assert batch["skipped_samples"] == [bad]
    empty = collate([bad])
    assert empty["input_ids"].shape == empty["labels"].shape == (0, 0) and "pixel_values_videos" not in empty


def test_mixed_batch_is_right_padded(tmp_path, media, processor):
    ds, _ = dataset(tmp_path, media, processor, GOOD_RECORDS[:1] + GOOD_RECORDS[2:])
    samples = [ds[i] for i in range(3)]  # video, image, text
    batch = Collator(pad_token_id=0)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, length, sample in zip(range(3), lengths, samples):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["input_ids"][row, :length].tolist() == sample["input_ids"].tolist()
        assert (batch["input_ids"][row, length:] == 0).all() and (batch["labels"][row, length:] == -100).all()
    assert [v.shape for v in batch["pixel_values_videos"]] == [(4, 3, 32, 32)]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert (batch["input_ids"] == processor.image_token_id).sum() == FAST_TOKENS_IMAGE


# ----- sampler ---------------------------------------------------------------------------------------
MODALITIES = ["video"] * 7 + ["image"] * 3 + ["text"] * 2
LENGTHS = [50, 10, 70, 30, 60, 20, 40, 5, 9, 7, 3, 1]


@pytest.mark.parametrize("batch_size, world_size", [(2, 1), (1, 2), (2, 2)])
def test_sampler_runs_hold_one_modality_and_cover_every_sample(batch_size, world_size):
    sampler = ModalityGroupedSampler(MODALITIES, LENGTHS, batch_size, world_size, seed=3)
    order = list(sampler)
    run = batch_size * world_size
    assert len(order) == len(sampler) and len(order) % run == 0
    runs = [order[i : i + run] for i in range(0, len(order), run)]
    for indices in runs:  # one modality per step, on every rank
        assert len({MODALITIES[i] for i in indices}) == 1
        assert [LENGTHS[i] for i in indices] == sorted((LENGTHS[i] for i in indices), reverse=True)
    assert set(order) == set(range(len(MODALITIES)))
    counts = Counter(order)
    for modality in set(MODALITIES):  # padding repeats a modality's own samples, as few as needed
        members = [i for i, m in enumerate(MODALITIES) if m == modality]
        drawn = sum(counts[i] for i in members)
        assert len(members) <= drawn < len(members) + run


def test_sampler_groups_by_length_and_is_a_function_of_seed_and_epoch():
    sampler = ModalityGroupedSampler(MODALITIES, LENGTHS, batch_size=2, seed=3)
    order = list(sampler)
    video_runs = [order[i : i + 2] for i in range(0, len(order), 2) if MODALITIES[order[i]] == "video"]
    # one length group spans the whole modality: runs do not interleave in length
    spans = sorted((min(LENGTHS[i] for i in r), max(LENGTHS[i] for i in r)) for r in video_runs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert list(ModalityGroupedSampler(MODALITIES, LENGTHS, batch_size=2, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    unsorted = ModalityGroupedSampler(MODALITIES, LENGTHS, batch_size=2, seed=3, group_by_length=False)
    assert sorted(unsorted) == sorted(order)


def test_sampler_order_differs_between_seeds():
    first = list(ModalityGroupedSampler(MODALITIES, LENGTHS, 1, seed=0))
    assert any(list(ModalityGroupedSampler(MODALITIES, LENGTHS, 1, seed=s)) != first for s in (1, 2))
