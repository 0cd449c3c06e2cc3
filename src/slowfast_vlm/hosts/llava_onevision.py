"""LLaVA-OneVision (and LLaVA-Video, same classes) with the slow branch: transformers'
`LlavaOnevisionForConditionalGeneration` keeps every weight and computes what it computes on the fast
frames; its video tokens (each projected grid bilinearly resized to ceil(h/2) x ceil(w/2), then one
`image_newline`) are the fast tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionCausalLMOutputWithPast

from ..modeling.slow_tokens import SlowCache
from .base import HostFamily, LlavaHostMixin, SlowFastHostConfig, SlowFastHostProcessorMixin


class SlowFastLlavaOnevisionConfig(SlowFastHostConfig, LlavaOnevisionConfig):
    """A `LlavaOnevisionConfig` (LLaVA-OneVision, LLaVA-Video) with the slow-fast knobs."""

    model_type = "slowfast_llava_onevision"


@dataclass
class SlowFastLlavaOnevisionOutput(LlavaOnevisionCausalLMOutputWithPast):
    """The host's output (fields as the installed transformers names them) plus the `slow_cache`
    that `generate` carries between steps."""

    slow_cache: SlowCache | None = None


class SlowFastLlavaOnevisionForConditionalGeneration(LlavaHostMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision / LLaVA-Video with the slow branch."""

    config: SlowFastLlavaOnevisionConfig
    config_class = SlowFastLlavaOnevisionConfig
    output_class = SlowFastLlavaOnevisionOutput

    def fast_video_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The host's `get_video_features`: every projected grid bilinearly resized to ceil(h/2) x ceil(w/2)
        (`apply_pooling`), frames flattened, then one `image_newline` after the video."""
        num_videos, num_frames = projected.shape[:2]
        pooled = self.model.apply_pooling(projected.flatten(0, 1)).unflatten(0, (num_videos, num_frames))
        newline = self.model.image_newline.to(pooled.dtype).expand(num_videos, 1, -1)
        return torch.cat([pooled.flatten(1, 2), newline], dim=1)


class SlowFastLlavaOnevisionProcessor(SlowFastHostProcessorMixin, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` whose `<video>` expansion counts the fast frames."""


FAMILY = HostFamily(
    "llava_onevision",
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SlowFastLlavaOnevisionForConditionalGeneration,
    SlowFastLlavaOnevisionProcessor,
)
