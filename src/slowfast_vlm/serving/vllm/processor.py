"""vLLM's multimodal processor for slow-fast checkpoints (encoder-decoder mode, as Whisper's).

One request = at most one video and a prompt holding its `<video>` (vLLM 0.32's encoder-decoder mode takes one
multimodal item of one modality per request: a still image is sent as a one-frame video, which the model, as
the library's, does not pool):

    encoder prompt: [placeholder] * slow-token count   (the cross-attention cache's length)
    decoder prompt: the prompt, its placeholder expanded to the fast-token count (fast tokens go there)
    pixels:         `SlowFastProcessor`'s preprocessing (same resize, crop, normalisation, frame sampling)

Per-request `mm_processor_kwargs` `num_frames` / `fps` sample the frames given (reference fps rule when the
video's metadata has its frame rate); a request can lower the server's frame budget, never raise it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

from ...modeling.slow_tokens import slow_grid
from ...processing.processor import SlowFastProcessor

REQUEST_KWARGS = ("num_frames", "fps")
"""The `mm_processor_kwargs` a request may set."""


@lru_cache(maxsize=4)
def load_processor(path: str) -> SlowFastProcessor:
    """The checkpoint's own `SlowFastProcessor` (tokenizer, pixels, placeholder counts, sampling defaults)."""
    return SlowFastProcessor.from_pretrained(path)


def max_num_frames(processor: SlowFastProcessor, config=None) -> int:
    """The hard cap on frames per video: the served config's `max_num_frames` (`slowfast-vlm serve --engine
    vllm --max-frames`, given to vLLM as `--hf-overrides`), else the checkpoint's default frame count."""
    cap = getattr(config, "max_num_frames", None)
    return int(cap if cap is not None else processor.sampling_defaults()["num_frames"])


def num_slow_tokens(processor: SlowFastProcessor, num_frames: int) -> int:
    """Slow tokens of a video of `num_frames` frames (1 = a still image, not pooled)."""
    h, w = slow_grid(processor.frame_grid, num_frames, processor.video_pooling_stride)
    return num_frames * h * w


def check_request_kwargs(kwargs: Mapping[str, object], cap: int) -> dict[str, Any]:
    """The request's frame-sampling kwargs, refused with a one-line error when unknown or over `cap`."""
    unknown = sorted(set(kwargs) - set(REQUEST_KWARGS))
    if unknown:
        raise ValueError(
            f"mm_processor_kwargs: unsupported {unknown}; a request may set {list(REQUEST_KWARGS)}"
        )
    num_frames = kwargs.get("num_frames")
    if num_frames is not None and not 1 <= int(num_frames) <= cap:
        raise ValueError(
            f"mm_processor_kwargs.num_frames: {num_frames} is outside 1..{cap} (the server's cap)"
        )
    fps = kwargs.get("fps")
    if fps is not None and not float(fps) > 0:
        raise ValueError(f"mm_processor_kwargs.fps: {fps} must be positive")
    return {key: kwargs[key] for key in REQUEST_KWARGS if kwargs.get(key) is not None}


def video_frames(mm_kwargs: MultiModalKwargsItems, index: int) -> int:
    """Frames kept by the processor for the request's `index`-th video."""
    return mm_kwargs["video"][index]["pixel_values_videos"].data.shape[0]


class SlowFastProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> SlowFastProcessor:
        return load_processor(self.ctx.model_config.model)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"videos_kwargs": set(REQUEST_KWARGS)}

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(video_needs_metadata=True)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        processor = self.get_hf_processor()
        return {"video": num_slow_tokens(processor, max_num_frames(processor, self.get_hf_config()))}


class SlowFastDummyInputsBuilder(BaseDummyInputsBuilder[SlowFastProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().video_token * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        processor = self.info.get_hf_processor()
        size, num_frames = processor.decode_short_side(), max_num_frames(processor, self.info.get_hf_config())
        videos = self._get_dummy_videos(
            width=size, height=size, num_frames=num_frames, num_videos=mm_counts.get("video", 0)
        )
        metadata = {"fps": 2.0, "total_num_frames": num_frames, "frames_indices": list(range(num_frames))}
        return {"video": [(video, dict(metadata)) for video in videos]}


class SlowFastMultiModalProcessor(EncDecMultiModalProcessor[SlowFastProcessingInfo]):
    skip_decoder_start_token = True

    def create_encoder_prompt(self, prompt: str | list[int], mm_items: MultiModalDataItems) -> list[int]:
        # one placeholder per video, expanded (`_get_prompt_updates`) to its slow-token count
        return [self.info.get_hf_processor().video_token_id] * mm_items.get_count("video", strict=False)

    def _get_enc_dec_inputs(self, prompt: str | list[int], mm_items: MultiModalDataItems, encoder_inputs):
        """The decoder prompt: `prompt` with its placeholder expanded to the item's fast-token count, as the
        library's processor does: `<video>` tokens for a video, `<image>` tokens for a one-frame one (a still
        image, not pooled). The prompt may write either placeholder."""
        processor = self.info.get_hf_processor()
        ids = (
            processor.tokenizer.encode(prompt, add_special_tokens=False)
            if isinstance(prompt, str)
            else list(prompt)
        )
        placeholders = (processor.video_token_id, processor.image_token_id)
        num_videos = mm_items.get_count("video", strict=False)
        num_placeholders = sum(ids.count(token) for token in placeholders)
        if num_placeholders != num_videos:
            raise ValueError(
                f"prompt: {num_placeholders} <video>/<image> placeholder(s) for {num_videos} video(s); put one "
                "placeholder where the video goes"
            )
        expansion = []
        if num_videos:
            num_frames = video_frames(encoder_inputs["mm_kwargs"], 0)
            token = processor.image_token_id if num_frames == 1 else processor.video_token_id
            expansion = [token] * processor.num_fast_tokens(num_frames)
        decoder_ids = [t for token in ids for t in (expansion if token in placeholders else [token])]
        return super()._get_enc_dec_inputs(decoder_ids, mm_items, encoder_inputs)

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        """Frames (sampled by the request's `num_frames` / `fps` if given) -> `pixel_values_videos` `(1, T, 3, S, S)`."""
        processor = self.info.get_hf_processor()
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        flat = {**merged.pop("videos_kwargs", {}), **merged}
        flat = {
            k: v
            for k, v in flat.items()
            if not isinstance(v, Mapping) and k not in ("truncation", "return_tensors")
        }
        cap = max_num_frames(processor, self.info.get_hf_config())
        sampling = check_request_kwargs(flat, cap)
        videos, metadata = [], []
        for item in hf_data.get("videos") or []:
            frames, meta = item if isinstance(item, tuple) else (item, None)
            videos.append(np.asarray(frames))
            metadata.append({"fps": meta.get("fps")} if meta else None)
        outputs = processor(
            text=hf_data.get("text", ""),
            videos=videos,
            video_metadata=metadata,
            return_tensors="pt",
            **sampling,
        )
        pixels = outputs["pixel_values_videos"]
        pixels = torch.stack(pixels) if isinstance(pixels, list) else pixels
        if pixels.shape[1] > cap:
            raise ValueError(
                f"video: {pixels.shape[1]} frames over the server's cap of {cap}; sample it "
                "(mm_processor_kwargs num_frames / fps)"
            )
        return BatchFeature({"pixel_values_videos": pixels})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values_videos": MultiModalFieldConfig.batched("video")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor()
        return [
            PromptReplacement(
                modality="video",
                target=[processor.video_token_id],
                replacement=lambda i: (
                    [processor.video_token_id] * num_slow_tokens(processor, video_frames(out_mm_kwargs, i))
                ),
            )
        ]
