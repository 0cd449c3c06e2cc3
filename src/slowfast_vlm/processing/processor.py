"""`SlowFastProcessor`: text with `<video>` / `<image>` placeholders + decoded frames -> model inputs.

Each placeholder is expanded to exactly as many placeholder tokens as the model will put fast tokens
there (`fast_token_count`), so `input_ids` can go straight into
`SlowFastForConditionalGeneration.forward` / `generate`. Pixels follow the reference preprocessing
(architecture 1.1), with Pillow/numpy only (no torchvision):

- CLIP / ConvNeXt encoders: resize the shortest edge to the encoder's size, centre-crop a square,
  CLIP mean/std (the reference's `CLIPImageProcessor`); SigLIP: resize to the square, mean/std 0.5;
- still images are first padded to a square with the mean colour; video frames are not.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import (
    AddedToken,
    AutoProcessor,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ..config import SlowFastConfig
from ..modeling.fast_tokens import fast_token_count
from ..modeling.slow_tokens import slow_grid
from ..modeling.vision import vision_grid
from .video import VideoMetadata, fps_sample_indices, load_video, uniform_sample_indices

# The SlowFastConfig fields that decide how many fast tokens a video gets.
FAST_TOKEN_FIELDS = (
    "video_pooling_stride",
    "fast_temporal_sampling_stride",
    "fast_temporal_pooling_stride",
    "fast_spatial_pooling_stride",
    "min_fast_frames",
)

# Qwen ChatML with the reference system prompt (architecture 1.6). Message content is a string (with its
# own placeholders) or a list of {"type": "video" | "image" | "text"} parts; a visual part becomes its
# placeholder and a newline, as in the reference prompts ("<image>\nQuestion").
CHATML_TEMPLATE = r"""{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'video' -%}{{- '<video>\n' -}}
            {%- elif part['type'] == 'image' -%}{{- '<image>\n' -}}
            {%- elif part['type'] == 'text' -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""


WORD_JOINER = "\u2060"
"""Put after the first character of a special-token string in message text, so that it tokenizes as text."""


def image_processor_for(vision_config: PretrainedConfig) -> LlavaImageProcessorPil:
    """The Pillow image processor matching a vision encoder's config (bicubic resize, crop, mean/std)."""
    size = vision_config.image_size
    square = {"height": size, "width": size}
    if vision_config.model_type == "siglip_vision_model":
        # SigLIP's own preprocessing: resize to the square, mean/std 0.5
        return LlavaImageProcessorPil(
            size=square,
            crop_size=square,
            do_center_crop=False,
            do_pad=True,
            image_mean=(0.5,) * 3,
            image_std=(0.5,) * 3,
        )
    # the reference's CLIPImageProcessor: shortest edge to `size`, then a centred square crop
    return LlavaImageProcessorPil(
        size={"shortest_edge": size},
        crop_size=square,
        do_center_crop=True,
        do_pad=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _is_frame(x: Any) -> bool:
    return isinstance(x, PIL.Image.Image) or (_is_array(x) and x.ndim == 3)


def _list_images(images: Any) -> list:
    """PIL images / `(H, W, 3)` arrays, or `(N, H, W, 3)` batches, or (nested) lists of them -> flat list."""
    if _is_frame(images):
        return [images]
    if _is_array(images) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _list_images(item)]
    raise ValueError(
        f"images: expected PIL images or (H, W, 3) uint8 arrays/tensors, got {type(images).__name__}"
    )


def _list_videos(videos: Any) -> list[list]:
    """`(T, H, W, 3)` arrays, `(B, T, H, W, 3)` batches, lists of frames, or (nested) lists of those
    -> flat list of videos, each a list of frames."""
    if _is_array(videos) and videos.ndim == 4:
        return [list(videos)]
    if _is_array(videos) and videos.ndim == 5:
        return [list(video) for video in videos]
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(frame) for frame in videos):
            return [list(videos)]
        return [video for item in videos for video in _list_videos(item)]
    hint = " (decode it first: slowfast_vlm.processing.video.load_video)" if isinstance(videos, str) else ""
    raise ValueError(
        f"videos: expected decoded frames, (T, H, W, 3) uint8 arrays/tensors or lists of PIL images, "
        f"got {type(videos).__name__}{hint}"
    )


def _metadata_fps(metadata: Any) -> float | None:
    """The frame rate in a video's metadata: ours (`average_fps`), transformers' (`fps`) or a dict."""
    if metadata is None:
        return None
    if isinstance(metadata, dict):
        return metadata.get("fps") or metadata.get("average_fps")
    return getattr(metadata, "average_fps", None) or getattr(metadata, "fps", None)


def _check_placeholders(texts: list[str], token: str, kind: str, num_given: int) -> list[int]:
    """Placeholders per sample; raise naming the sample where they stop matching the items given in order."""
    per_sample = [text.count(token) for text in texts]
    if sum(per_sample) == num_given:
        return per_sample
    left = num_given
    for i, count in enumerate(per_sample):
        if count > left:
            raise ValueError(
                f"sample {i} has {count} {token} placeholder(s) but only {left} of the {num_given} {kind}(s) given "
                f"are left for it ({token} per sample: {per_sample}); give one {kind} per {token}, in order"
            )
        left -= count
    raise ValueError(
        f"{num_given} {kind}(s) given but the text has only {sum(per_sample)} {token} placeholder(s) "
        f"({token} per sample: {per_sample}); every {kind} needs a {token} in the text"
    )


def _check_expanded(input_ids, token_id: int, per_sample: list[int], counts: list[int]) -> None:
    """Each sample must hold all its placeholder tokens after tokenization (truncation may cut them)."""
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
    start = 0
    for i, (row, num_items) in enumerate(zip(rows, per_sample)):
        expected = sum(counts[start : start + num_items])
        start += num_items
        if row.count(token_id) != expected:
            raise ValueError(
                f"sample {i}: {row.count(token_id)} placeholder tokens (id {token_id}) after tokenization, "
                f"expected {expected}; was the prompt truncated (max_length / truncation)?"
            )


class SlowFastProcessor(ProcessorMixin):
    r"""Turns text, videos and images into `SlowFastForConditionalGeneration` inputs.

    Args:
        image_processor: a Pillow image processor (`image_processor_for(vision_config)`).
        tokenizer: any Hugging Face tokenizer; `video_token` / `image_token` are added to it as special
            tokens if it lacks them (set the model's `video_token_id` / `image_token_id` to theirs:
            `prepare_model`).
        chat_template: Jinja chat template; default: Qwen ChatML with "You are a helpful assistant."
            (pass `tokenizer.chat_template` to use the tokenizer's own).
        frame_grid: `(h, w)` feature grid of one frame from the vision encoder (`vision_grid`).
        video_pooling_stride, fast_temporal_sampling_stride, fast_temporal_pooling_stride,
        fast_spatial_pooling_stride, min_fast_frames: as in `SlowFastConfig`; together with `frame_grid`
            they give each placeholder's token count. `from_model_config` copies them from a config.
        video_token, image_token: the placeholder strings.
        video_defaults: how to sample frames for this model by default, e.g.
            `{"num_frames": 64, "fps": 2.0, "sampling": "fps"}` (read by `slowfast-vlm ask` / `serve`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        frame_grid: tuple[int, int] | list[int] | None = None,
        video_pooling_stride: int = SlowFastConfig.video_pooling_stride,
        fast_temporal_sampling_stride: int = SlowFastConfig.fast_temporal_sampling_stride,
        fast_temporal_pooling_stride: int = SlowFastConfig.fast_temporal_pooling_stride,
        fast_spatial_pooling_stride: int = SlowFastConfig.fast_spatial_pooling_stride,
        min_fast_frames: int = SlowFastConfig.min_fast_frames,
        video_token: str = "<video>",
        image_token: str = "<image>",
        video_defaults: dict | None = None,
    ):
        self.frame_grid = tuple(frame_grid) if frame_grid is not None else None
        self.video_pooling_stride = video_pooling_stride
        self.fast_temporal_sampling_stride = fast_temporal_sampling_stride
        self.fast_temporal_pooling_stride = fast_temporal_pooling_stride
        self.fast_spatial_pooling_stride = fast_spatial_pooling_stride
        self.min_fast_frames = min_fast_frames
        self.video_token, self.image_token = video_token, image_token
        self.video_defaults = dict(video_defaults or {})
        if chat_template is None:
            chat_template = CHATML_TEMPLATE.replace("<video>", video_token).replace("<image>", image_token)
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            missing = [token for token in (video_token, image_token) if token not in vocab]
            if missing:
                tokenizer.add_tokens(
                    [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
                )
            self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(
        cls, config: SlowFastConfig, tokenizer, image_processor=None, **kwargs
    ) -> SlowFastProcessor:
        """A processor whose placeholder counts and pixel preprocessing match `config`'s model."""
        return cls(
            image_processor=image_processor or image_processor_for(config.vision_config),
            tokenizer=tokenizer,
            frame_grid=vision_grid(config.vision_config),
            **{name: getattr(config, name) for name in FAST_TOKEN_FIELDS},
            **kwargs,
        )

    def decode_short_side(self) -> int:
        """The shorter side, in pixels, that video frames can be decoded at without changing what the
        image processor makes of them (its resize target): `load_video(..., short_side=...)`."""
        size = self.image_processor.size
        return size.shortest_edge or min(size.height, size.width)

    def load_video(
        self, path: str | os.PathLike[str], num_frames: int, **options: Any
    ) -> tuple[np.ndarray, VideoMetadata]:
        """A video decoded for this model: `processing.video.load_video(path, num_frames, **options)` with
        frames scaled while decoding to the model's input size (`decode_short_side`). `options`: `fps`,
        `sampling` and the decoding caps. Returns frames `(T, H, W, 3)` uint8 and their metadata."""
        return load_video(path, num_frames, short_side=self.decode_short_side(), **options)

    def escape_text(self, text: str, keep: tuple[str, ...] = ()) -> str:
        """`text` with every special-token string of the tokenizer (`<|im_end|>`, `<video>`, ...) but
        those in `keep` broken by a `WORD_JOINER`, so that it tokenizes as text, never as control tokens."""
        tokens = sorted(
            {t.content for t in self.tokenizer.added_tokens_decoder.values()} - set(keep),
            key=len,
            reverse=True,
        )
        if not tokens:
            return text
        pattern = "|".join(re.escape(token) for token in tokens)
        return re.sub(pattern, lambda match: match[0][0] + WORD_JOINER + match[0][1:], text)

    def escape_conversation(self, conversation: list[dict], keep_placeholders: bool = True) -> list[dict]:
        """`conversation` with message text that cannot spell control tokens (`escape_text`): text parts
        are all text; a string content keeps its `<video>` / `<image>` placeholders unless
        `keep_placeholders` is False (media sent as parts only, as in OpenAI requests). New message and
        text-part dicts; everything else (frames included) is shared, not copied."""
        placeholders = (self.video_token, self.image_token) if keep_placeholders else ()
        escaped = []
        for message in conversation:
            content = message.get("content")
            if isinstance(content, str):
                content = self.escape_text(content, keep=placeholders)
            elif isinstance(content, list):
                content = [
                    {**part, "text": self.escape_text(part["text"])}
                    if isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                    else part
                    for part in content
                ]
            escaped.append({**message, "content": content})
        return escaped

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template` on the escaped conversation (`escape_conversation`):
        what users type is tokenized as text, so it cannot close a turn or open a role."""
        if conversation and isinstance(conversation[0], (list, tuple)):
            conversation = [self.escape_conversation(c) for c in conversation]
        else:
            conversation = self.escape_conversation(conversation)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def sampling_defaults(self) -> dict:
        """`num_frames`, `fps` and `sampling` to decode videos with: `video_defaults` over the
        evaluation settings of the released models (64 frames read at 2 fps)."""
        return {"num_frames": 64, "fps": 2.0, "sampling": "fps", **self.video_defaults}

    def sampling_options(
        self, num_frames: int | None = None, fps: float | None = None, sampling: str | None = None
    ) -> dict:
        """`sampling_defaults()` with the values a user gave (None: not given) over them, so that
        `ask`, `eval` and the lmms-eval model sample a model's videos the way it was trained to."""
        given = {"num_frames": num_frames, "fps": fps, "sampling": sampling}
        return self.sampling_defaults() | {key: value for key, value in given.items() if value is not None}

    # ----- the model side ------------------------------------------------------------------------
    def num_fast_tokens(self, num_frames: int) -> int:
        """Placeholder tokens for a video of `num_frames` frames (1 = a still image, which is not pooled)."""
        if self.frame_grid is None:
            raise ValueError(
                "SlowFastProcessor.frame_grid is not set: build the processor with "
                "SlowFastProcessor.from_model_config(config, tokenizer)"
            )
        grid = slow_grid(self.frame_grid, num_frames, self.video_pooling_stride)
        # the processor carries the config's fast-token fields, so it stands in for the config here
        return fast_token_count(num_frames, grid, self)

    def set_token_ids(self, config: SlowFastConfig) -> SlowFastConfig:
        """Set `config.video_token_id` / `image_token_id` to this tokenizer's placeholder ids."""
        config.video_token_id = self.video_token_id
        config.image_token_id = self.image_token_id
        return config

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        """Make `model` fit this processor: placeholder ids, embeddings at least as large as the
        tokenizer's vocabulary, and the tokenizer's pad/eos ids for `generate` where unset."""
        self.set_token_ids(model.config)
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))
        generation_config = model.generation_config
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = self.tokenizer.pad_token_id
        if generation_config.eos_token_id is None:
            generation_config.eos_token_id = self.tokenizer.eos_token_id
        return model

    # ----- processing ----------------------------------------------------------------------------
    def _pixels(self, frames: list, do_pad: bool) -> torch.Tensor:
        """Frames / images -> `(N, 3, S, S)` float32."""
        return self.image_processor(frames, do_pad=do_pad, return_tensors="pt")["pixel_values"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        padding: bool | str = False,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        do_sample_frames: bool | None = None,
        video_metadata=None,
        return_metadata: bool = False,
        **kwargs,
    ) -> BatchFeature:
        r"""Tokenize `text`, expanding each `<video>` / `<image>` to its fast-token count, and preprocess pixels.

        Args:
            images: still images (PIL or `(H, W, 3)` uint8), one per `<image>`, in order over the batch.
            text: one prompt or a batch of prompts.
            videos: decoded videos (`(T, H, W, 3)` uint8 arrays/tensors or lists of PIL frames), one per
                `<video>`, in order over the batch.
            padding, padding_side: as for the tokenizer; use `padding_side="left"` for batched `generate`.
            return_tensors: `"pt"` for tensors; pixel values are always float32 tensors.
            num_frames, fps, do_sample_frames, video_metadata, return_metadata: transformers' video
                processor keywords. With `do_sample_frames` (default: when `num_frames` or `fps` is
                given) each video is taken as all of its frames and sampled here by the reference fps
                rule (`fps_sample_indices`; its frame rate from `video_metadata`, one per video:
                a `VideoMetadata` of `load_video` or transformers', or a dict with `fps`), or
                uniformly when no frame rate is known; unset values are `sampling_defaults()`.
                `return_metadata` adds `video_metadata`: per video, `frames_indices` and `fps`.
            kwargs: passed to the tokenizer (`truncation`, `max_length`, ...).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, and when given `pixel_values_videos`
            (`(B, T, 3, S, S)` if all videos have the same length, else a list of `(T_i, 3, S, S)`) and
            `pixel_values` (`(N, 3, S, S)`).
        """
        if audio is not None:
            raise ValueError("SlowFastProcessor does not take audio")
        if text is None:
            raise ValueError("SlowFastProcessor needs text: it carries the <video>/<image> placeholders")
        texts = [text] if isinstance(text, str) else list(text)
        videos = _list_videos(videos) if videos is not None else []
        images = _list_images(images) if images is not None else []
        sampled, rates = self._sample_frames(videos, num_frames, fps, do_sample_frames, video_metadata)
        videos = [[video[i] for i in indices] for video, indices in zip(videos, sampled)]
        videos_per_sample = _check_placeholders(texts, self.video_token, "video", len(videos))
        images_per_sample = _check_placeholders(texts, self.image_token, "image", len(images))

        data = {}
        video_counts, image_counts = [], []
        if videos:
            for i, frames in enumerate(videos):
                if not frames:
                    raise ValueError(f"video {i} has no frames")
            pixels = [self._pixels(frames, do_pad=False) for frames in videos]
            video_counts = [self.num_fast_tokens(video.shape[0]) for video in pixels]
            same_length = len({video.shape[0] for video in pixels}) == 1
            data["pixel_values_videos"] = torch.stack(pixels) if same_length else pixels
        if return_metadata and videos:
            data["video_metadata"] = [
                {"frames_indices": indices, "fps": rate, "total_num_frames": total}
                for indices, (rate, total) in zip(sampled, rates)
            ]
        if images:
            data["pixel_values"] = self._pixels(images, do_pad=True)
            image_counts = [self.num_fast_tokens(1)] * len(images)

        expanded, _ = self.get_text_with_replacements(
            texts,
            images_replacements=[self.image_token * n for n in image_counts],
            videos_replacements=[self.video_token * n for n in video_counts],
        )
        text_inputs = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        _check_expanded(text_inputs["input_ids"], self.video_token_id, videos_per_sample, video_counts)
        _check_expanded(text_inputs["input_ids"], self.image_token_id, images_per_sample, image_counts)
        return BatchFeature(
            {**text_inputs, **data},
            tensor_type=return_tensors,
            skip_tensor_conversion=["pixel_values_videos", "video_metadata"],
        )

    def _sample_frames(
        self, videos: list[list], num_frames, fps, do_sample_frames, video_metadata
    ) -> tuple[list[list[int]], list[tuple[float | None, int]]]:
        """Per video, the indices of the frames to keep (all of them unless sampling is asked for), and
        per video `(frame rate or None, frame count)`."""
        if isinstance(video_metadata, (list, tuple)):
            metadata = list(video_metadata)
        else:
            metadata = [video_metadata] * len(videos)
        if len(metadata) != len(videos):
            raise ValueError(f"video_metadata: {len(metadata)} given for {len(videos)} videos")
        rates = [(_metadata_fps(meta), len(video)) for meta, video in zip(metadata, videos)]
        if do_sample_frames is None:
            do_sample_frames = num_frames is not None or fps is not None
        if not do_sample_frames:
            return [list(range(len(video))) for video in videos], rates
        options = self.sampling_options(num_frames, fps)
        num_frames, fps = options["num_frames"], options["fps"]
        sampled = [
            fps_sample_indices(total, rate, num_frames, fps)
            if rate
            else uniform_sample_indices(total, num_frames)
            for rate, total in rates
        ]
        return sampled, rates

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "pixel_values_videos"]


AutoProcessor.register(SlowFastConfig, SlowFastProcessor)

__all__ = ["SlowFastProcessor", "image_processor_for"]
