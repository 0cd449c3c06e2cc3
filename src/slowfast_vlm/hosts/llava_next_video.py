"""LLaVA-NeXT-Video with the slow branch: transformers' `LlavaNextVideoForConditionalGeneration` keeps
every weight and computes what it computes on the fast frames; its video tokens (the encoder grid
pooled by its `vision_resampler`, then projected) are the fast tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoCausalLMOutputWithPast,
)

from ..modeling.slow_tokens import SlowCache
from .base import HostFamily, LlavaHostMixin, SlowFastHostConfig, SlowFastHostProcessorMixin


class SlowFastLlavaNextVideoConfig(SlowFastHostConfig, LlavaNextVideoConfig):
    """A `LlavaNextVideoConfig` with the slow-fast knobs."""

    model_type = "slowfast_llava_next_video"


@dataclass
class SlowFastLlavaNextVideoOutput(LlavaNextVideoCausalLMOutputWithPast):
    """The host's output (fields as the installed transformers names them) plus the `slow_cache`
    that `generate` carries between steps."""

    slow_cache: SlowCache | None = None


class SlowFastLlavaNextVideoForConditionalGeneration(LlavaHostMixin, LlavaNextVideoForConditionalGeneration):
    """LLaVA-NeXT-Video with the slow branch."""

    config: SlowFastLlavaNextVideoConfig
    config_class = SlowFastLlavaNextVideoConfig
    output_class = SlowFastLlavaNextVideoOutput

    def fast_video_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The host's `get_video_features`: the encoder grid pooled by `vision_resampler`, then projected."""
        num_videos, num_frames = features.shape[:2]
        pooled = self.model.multi_modal_projector(self.model.vision_resampler(features.flatten(0, 1)))
        return pooled.unflatten(0, (num_videos, num_frames)).flatten(1, 2)


class SlowFastLlavaNextVideoProcessor(SlowFastHostProcessorMixin, LlavaNextVideoProcessor):
    """`LlavaNextVideoProcessor` whose `<video>` expansion counts the fast frames."""


FAMILY = HostFamily(
    "llava_next_video",
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    SlowFastLlavaNextVideoForConditionalGeneration,
    SlowFastLlavaNextVideoProcessor,
)
