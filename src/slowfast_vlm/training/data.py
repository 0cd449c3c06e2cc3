"""Training data: LLaVA-style conversations over videos, images or text -> model inputs.

A record (one JSON object, from a `.json` array or one line of a `.jsonl` file):

    {"id": "v_001", "video": "clips/v_001.mp4",              # or "image": path, or neither
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A cat jumps over a fence."}]}

`role` / `content` keys and `user` / `assistant` / `system` roles are accepted too. In a video
record an `<image>` placeholder stands for the video (the LLaVA-Video-178K convention); a missing
placeholder is put at the front of the first human turn.

Bad samples are never replaced by other samples. They are found in two places:

1. `read_records` (startup, no decoding): malformed lines, records without an assistant turn,
   placeholders that do not match the media, missing media files. Those records are left out of
   the dataset and reported.
2. `ConversationDataset.__getitem__` (in the dataloader workers): videos/images that fail to
   decode, samples too long to truncate. The item is a `SkippedSample`; `Collator` drops it from
   the batch (the batch shrinks, possibly to zero samples) and passes it on in
   `batch["skipped_samples"]`, so that the trainer, in the main process, logs and counts it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

from ..processing.processor import SlowFastProcessor
from ..record_files import read_record_file

logger = logging.getLogger(__name__)

# Token types (architecture 1.4).
PROMPT, RESPONSE, VISUAL, PAD = 1, 2, 3, 4
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MODALITIES = ("video", "image", "text")


@dataclass
class DataConfig:
    """What to train on and how samples are built.

    Args:
        train: data files (`.json` lists, `.jsonl`, `.parquet`: `record_files`), each a path or
            `{"path": ..., "media_root": ...}`.
        media_root: folder that relative `video` / `image` paths are resolved against.
        num_frames: most frames per video; `fps`, `sampling`: as in `load_video` (training samples at 4 fps).
        max_length: longest token sequence; longer samples are truncated after their visual tokens.
        max_bad_sample_fraction: the run stops once more than this fraction of all records is unusable.
        group_by_length: batch samples of similar length together (always one modality per batch).
    """

    train: list[str | dict[str, str]] = field(default_factory=list)
    media_root: str = "."
    num_frames: int = 64
    fps: float = 4.0
    sampling: str = "fps"
    max_length: int = 3072
    max_bad_sample_fraction: float = 0.01
    group_by_length: bool = True

    def __post_init__(self):
        checks = {
            "num_frames": self.num_frames >= 1,
            "fps": self.fps > 0,
            "sampling": self.sampling in ("fps", "uniform"),
            "max_length": self.max_length >= 1,
            "max_bad_sample_fraction": 0 <= self.max_bad_sample_fraction <= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"data.{name} is invalid: {getattr(self, name)!r}")


@dataclass(frozen=True)
class Record:
    """A pre-validated training record."""

    id: str
    where: str  # "file:line" (JSONL) or "file[index]" (JSON), for messages
    messages: tuple[dict[str, str], ...]  # {"role", "content"} with exactly one placeholder per media file
    modality: str  # "video" | "image" | "text"
    media: tuple[str, ...]  # paths of the videos / images
    length: int  # estimated token count, for length grouping


@dataclass(frozen=True)
class SkippedSample:
    """A sample that cannot be used, and why."""

    id: str
    where: str
    reason: str


class BadRecord(ValueError):
    """A record that cannot be turned into a training sample; the message says why."""


class TooManyBadSamples(RuntimeError):
    """More distinct records are unusable than `max_bad_sample_fraction` allows; the run stops."""


# ----- reading and pre-validation -------------------------------------------------------------------
def _as_paths(value: Any, key: str) -> list[str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise BadRecord(f"{key!r} must be a path or a non-empty list of paths, got {value!r}")
    return paths


def parse_record(
    raw: Any, where: str, media_root: str, processor: SlowFastProcessor, num_frames: int
) -> Record:
    """Validate one raw record without decoding anything; raise `BadRecord` naming the problem."""
    if not isinstance(raw, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(raw).__name__}")
    sample_id = str(raw.get("id", where))
    if "video" in raw and "image" in raw:
        raise BadRecord("has both 'video' and 'image'; one sample trains on one modality")
    modality = "video" if "video" in raw else "image" if "image" in raw else "text"
    media = [] if modality == "text" else _as_paths(raw[modality], modality)
    media = [os.path.join(media_root, p) for p in media]
    missing = [p for p in media if not os.path.isfile(p)]
    if missing:
        raise BadRecord(f"{modality} file not found: {missing[0]}")

    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("'conversations' must be a non-empty list")
    messages = []
    for number, turn in enumerate(turns):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise BadRecord(
                f"turn {number} must be {{'from': 'human'|'gpt'|'system', 'value': str}}, got {turn!r}"
            )
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no assistant turn with text: nothing to learn from")

    video_token, image_token = processor.video_token, processor.image_token
    if modality == "video":  # LLaVA-Video data marks the video with <image>
        for m in messages:
            m["content"] = m["content"].replace(image_token, video_token)
    token = {"video": video_token, "image": image_token}.get(modality)
    found = {t: sum(m["content"].count(t) for m in messages) for t in (video_token, image_token)}
    wrong = [t for t, n in found.items() if n and t != token]
    if wrong:
        raise BadRecord(f"has a {wrong[0]} placeholder but no {wrong[0][1:-1]} file")
    if token is not None and found[token] == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadRecord("no human turn to put the visual placeholder in")
        first_user["content"] = f"{token}\n" * len(media) + first_user["content"]
    elif token is not None and found[token] != len(media):
        raise BadRecord(f"has {found[token]} {token} placeholders for {len(media)} {modality} file(s)")

    frames = {"video": num_frames, "image": 1}.get(modality)  # of each visual item, at most
    visual_tokens = len(media) * processor.num_fast_tokens(frames) if frames else 0
    words = sum(len(m["content"].split()) for m in messages)
    return Record(
        id=sample_id,
        where=where,
        messages=tuple(messages),
        modality=modality,
        media=tuple(media),
        length=words + visual_tokens,
    )


def read_records(
    config: DataConfig, processor: SlowFastProcessor
) -> tuple[list[Record], list[SkippedSample]]:
    """All records of `config.train`, split into usable ones and the ones left out (with reasons)."""
    if not config.train:
        raise ValueError("data.train is empty: give at least one .json / .jsonl file")
    records, skipped = [], []
    for source in config.train:
        source = {"path": source} if isinstance(source, str) else dict(source)
        path, media_root = source["path"], source.get("media_root", config.media_root)
        for row in read_record_file(path):
            try:
                if row.problem is not None:
                    raise BadRecord(row.problem)
                records.append(parse_record(row.record, row.where, media_root, processor, config.num_frames))
            except BadRecord as e:
                sample_id = str(row.record.get("id", row.where)) if row.record is not None else row.where
                skipped.append(SkippedSample(sample_id, row.where, str(e)))
    return records, skipped


# ----- samples ---------------------------------------------------------------------------------------
def token_types(input_ids: Sequence[int], tokenizer, visual_ids: Sequence[int]) -> list[int]:
    """Design 1.4 token types of a ChatML sequence: `RESPONSE` for the content and closing `<|im_end|>`
    of assistant turns, `VISUAL` for placeholders, `PROMPT` for everything else."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    types = [PROMPT] * len(input_ids)
    position = 0
    while position < len(input_ids):
        if input_ids[position] != im_start:
            position += 1
            continue
        header_end = position + 1  # the role name runs up to the first token holding a newline
        while header_end < len(input_ids) and "\n" not in tokenizer.decode([input_ids[header_end]]):
            header_end += 1
        turn_end = header_end + 1
        while turn_end < len(input_ids) and input_ids[turn_end] != im_end:
            turn_end += 1
        if tokenizer.decode(input_ids[position + 1 : header_end + 1]).strip() == "assistant":
            end = min(turn_end + 1, len(input_ids))
            types[header_end + 1 : end] = [RESPONSE] * (end - header_end - 1)
        position = turn_end
    visual = set(visual_ids)
    return [VISUAL if token in visual else t for token, t in zip(input_ids, types)]


class ConversationDataset(Dataset):
    """Map-style dataset of pre-validated records; media are decoded lazily, in the dataloader workers.

    `__getitem__` returns `{"input_ids" (L,), "token_types" (L,), and "pixel_values_videos": [(T, 3, S, S)]
    or "pixel_values": (N, 3, S, S)}`, or a `SkippedSample` when the sample cannot be used.
    """

    def __init__(self, records: list[Record], processor: SlowFastProcessor, config: DataConfig):
        if processor.tokenizer.convert_tokens_to_ids("<|im_start|>") is None:
            raise ValueError("the tokenizer has no <|im_start|> token: training data is rendered in ChatML")
        self.records, self.processor, self.config = records, processor, config

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modalities(self) -> list[str]:
        return [r.modality for r in self.records]

    @property
    def lengths(self) -> list[int]:
        return [r.length for r in self.records]

    def _load_media(self, record: Record) -> dict[str, list]:
        if record.modality == "video":
            config = self.config
            load = self.processor.load_video
            return {
                "videos": [
                    load(path, config.num_frames, fps=config.fps, sampling=config.sampling)[0]
                    for path in record.media
                ]
            }
        if record.modality == "image":
            images = []
            for path in record.media:
                with PIL.Image.open(path) as image:
                    images.append(image.convert("RGB"))
            return {"images": images}
        return {}

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        try:
            media = self._load_media(record)
        except (OSError, ValueError) as e:  # FileNotFoundError, VideoDecodeError, PIL errors
            return SkippedSample(record.id, record.where, f"cannot load {record.modality}: {e}")
        text = self.processor.apply_chat_template(list(record.messages), tokenize=False)
        inputs = self.processor(text=text, return_tensors="pt", **media)
        input_ids = inputs["input_ids"][0]
        tokenizer = self.processor.tokenizer
        visual_ids = (self.processor.video_token_id, self.processor.image_token_id)
        types = torch.tensor(token_types(input_ids.tolist(), tokenizer, visual_ids))

        max_length = self.config.max_length
        if len(input_ids) > max_length:
            visual = (types == VISUAL).nonzero()
            if len(visual) and int(visual[-1]) >= max_length:
                return SkippedSample(
                    record.id,
                    record.where,
                    f"{len(input_ids)} tokens, and its visual tokens end at position {int(visual[-1])}, past "
                    f"max_length={max_length}: truncation would cut into them",
                )
            if not (types[:max_length] == RESPONSE).any():
                return SkippedSample(
                    record.id,
                    record.where,
                    f"no response token left after truncation to max_length={max_length}",
                )
            logger.warning(
                "sample %s (%s): %d tokens truncated to max_length=%d",
                record.id,
                record.where,
                len(input_ids),
                max_length,
            )
            input_ids, types = input_ids[:max_length], types[:max_length]

        sample = {"input_ids": input_ids, "token_types": types}
        if "pixel_values_videos" in inputs:
            sample["pixel_values_videos"] = list(inputs["pixel_values_videos"])
        if "pixel_values" in inputs:
            sample["pixel_values"] = inputs["pixel_values"]
        return sample


@dataclass
class Collator:
    """Right-pads a batch; labels are the response tokens. Skipped samples leave the batch and are passed on
    in `skipped_samples` (a batch may end up with no sample at all: `input_ids` of shape `(0, 0)`)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        samples = [f for f in features if not isinstance(f, SkippedSample)]
        if samples:
            input_ids = pad_sequence(
                [s["input_ids"] for s in samples], batch_first=True, padding_value=self.pad_token_id
            )
            types = pad_sequence([s["token_types"] for s in samples], batch_first=True, padding_value=PAD)
        else:
            input_ids = types = torch.zeros(0, 0, dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": input_ids,  # (B, L)
            "attention_mask": (types != PAD).long(),
            "labels": torch.where(types == RESPONSE, input_ids, IGNORE_INDEX),
        }
        videos = [video for s in samples for video in s.get("pixel_values_videos", [])]
        images = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if videos:
            batch["pixel_values_videos"] = videos  # list of (T_i, 3, S, S): videos differ in length
        if images:
            batch["pixel_values"] = torch.cat(images)  # (N, 3, S, S)
        batch["skipped_samples"] = [f for f in features if isinstance(f, SkippedSample)]
        return batch


class ModalityGroupedSampler(Sampler[int]):
    """Shuffled indices in runs of `batch_size * world_size` samples of one modality.

    The distributed dataloader deals consecutive batches of `batch_size` to the ranks, so every
    micro-batch, on every rank, holds a single modality. A modality's last, short run is filled up by
    repeating its own samples (as `DistributedSampler` does). With `group_by_length`, the runs of up to
    `runs_per_group` consecutive runs are sorted by length, longest first, so batches need little padding.
    The order depends only on `seed` and the epoch (`set_epoch`): every rank and a resumed run see the same.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        group_by_length: bool = True,
        runs_per_group: int = 50,
    ):
        self.modalities, self.lengths = list(modalities), list(lengths)
        self.run_size = batch_size * world_size
        self.seed, self.group_by_length, self.runs_per_group = seed, group_by_length, runs_per_group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _padded(self, count: int) -> int:
        return math.ceil(count / self.run_size) * self.run_size

    def __len__(self) -> int:
        return sum(self._padded(self.modalities.count(m)) for m in set(self.modalities))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        runs = []
        for modality in MODALITIES:
            indices = [i for i, m in enumerate(self.modalities) if m == modality]
            if not indices:
                continue
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            indices = [indices[i % len(indices)] for i in range(self._padded(len(indices)))]
            if self.group_by_length:
                group = self.run_size * self.runs_per_group
                indices = [
                    i
                    for start in range(0, len(indices), group)
                    for i in sorted(indices[start : start + group], key=lambda i: -self.lengths[i])
                ]
            runs += [
                indices[start : start + self.run_size] for start in range(0, len(indices), self.run_size)
            ]
        order = torch.randperm(len(runs), generator=generator).tolist()
        return iter([index for run in order for index in runs[run]])
