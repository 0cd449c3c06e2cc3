"""Qwen3-VL with the slow branch: transformers' `Qwen3VLForConditionalGeneration` keeps every weight and
computes what it computes on the fast frames.

As for Qwen2.5-VL (`qwen2_5_vl.py`: patches, temporal patches, the fast ones chosen uniformly), with
Qwen3-VL's differences:

- its text dates every temporal patch (`<t seconds>` before each patch's `<|vision_start|>` run); the
  converted processor and `text_inputs` write the fast patches' own times, so the host positions and
  reads the fast tokens exactly as for those frames;
- its vision tower also adds "deepstack" features of the video tokens into its first LLM layers, which
  embeddings cannot carry: the host is given the fast temporal patches' pixels and encodes them itself
  (`host_encodes_fast_frames`); the slow tokens are the merged tokens of every temporal patch. The fast
  frames are thus encoded twice (once more than by the host alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from ..modeling.slow_tokens import SlowCache, pool_frames
from ..transformers_compat import multimodal_output_class
from .base import HostFamily, SlowFastHostConfig
from .qwen2_5_vl import QwenVLHostMixin, QwenVLProcessorMixin, fast_temporal_patches

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class SlowFastQwen3VLConfig(SlowFastHostConfig, Qwen3VLConfig):
    """A `Qwen3VLConfig` with the slow-fast knobs (`frames`, `fast_frames` count frames)."""

    model_type = "slowfast_qwen3_vl"

    def fast_video_placeholder(self, grid: list[int], fps: float, video_token: str) -> str:
        """What the host's processor writes for the fast temporal patches of a video of grid `(t, h, w)`
        whose frames were sampled at `fps`: per patch its time (the mean of its frames'), then its tokens
        between `<|vision_start|>` and `<|vision_end|>`."""
        t, h, w = grid
        patch = self.vision_config.temporal_patch_size
        tokens = video_token * (h * w // self.vision_config.spatial_merge_size**2)
        return "".join(
            f"<{(k * patch + (patch - 1) / 2) / fps:.1f} seconds>{VISION_START}{tokens}{VISION_END}"
            for k in fast_temporal_patches(t, self.fast_frames, patch)
        )


@dataclass
class SlowFastQwen3VLOutput(multimodal_output_class(modeling_qwen3_vl, "Qwen3VLCausalLMOutputWithPast")):
    """The host's output (fields as the installed transformers names them) plus the `slow_cache`
    that `generate` carries between steps."""

    slow_cache: SlowCache | None = None


class SlowFastQwen3VLForConditionalGeneration(QwenVLHostMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with the slow branch."""

    config: SlowFastQwen3VLConfig
    config_class = SlowFastQwen3VLConfig
    output_class = SlowFastQwen3VLOutput
    host_encodes_fast_frames = True

    def fast_video_grids(
        self, video_grid_thw: torch.Tensor, second_per_grid_ts=None
    ) -> dict[str, torch.Tensor]:
        """The host's `video_grid_thw` `(V, 3)` for the fast temporal patches (their times are in the text)."""
        patch = self.config.vision_config.temporal_patch_size
        fast = video_grid_thw.clone()
        fast[:, 0] = torch.tensor(
            [len(fast_temporal_patches(int(t), self.config.fast_frames, patch)) for t in fast[:, 0]]
        )
        return {"video_grid_thw": fast}

    def video_inputs(
        self, pixel_values_videos: torch.Tensor, kwargs: dict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """As for Qwen2.5-VL; the host is given the fast temporal patches' rows of `pixel_values_videos`."""
        grid = self.checked_video_grid(pixel_values_videos, kwargs)
        patch = self.config.vision_config.temporal_patch_size
        fast, slow, fast_rows = [], [], []
        videos = zip(
            self.encode_videos(pixel_values_videos, grid), pixel_values_videos.split(grid.prod(-1).tolist())
        )
        for tokens, rows in videos:  # (t, h', w', D), (t*h*w, C*2*p*p)
            index = fast_temporal_patches(len(tokens), self.config.fast_frames, patch)
            fast.append(tokens[index].flatten(0, 2))
            fast_rows.append(rows.unflatten(0, (len(tokens), -1))[index].flatten(0, 1))
            slow.append(pool_frames(tokens, self.config.video_pooling_stride).flatten(0, 2))
        kwargs.update(self.fast_video_grids(grid), pixel_values_videos=torch.cat(fast_rows))
        return fast, slow


class SlowFastQwen3VLProcessor(QwenVLProcessorMixin, Qwen3VLProcessor):
    """`Qwen3VLProcessor` whose video expansion writes the fast temporal patches (and their times)."""


FAMILY = HostFamily(
    "qwen3_vl",
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SlowFastQwen3VLForConditionalGeneration,
    SlowFastQwen3VLProcessor,
)
