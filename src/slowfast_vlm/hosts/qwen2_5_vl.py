"""Qwen2.5-VL with the slow branch: transformers' `Qwen2_5_VLForConditionalGeneration` keeps every weight
and computes what it computes on the fast frames.

A Qwen-VL host takes a video as flattened patches `(t*h*w, C*2*p*p)` with `video_grid_thw` `(t, h, w)`:
its vision tower embeds pairs of frames (temporal patch size 2) and its patch merger turns each 2 x 2
block of patches into one token, so a video is `t` temporal patches of `h/2 * w/2` tokens each. The tower
attends within one temporal patch only, so encoding all of them once gives both branches:

    all frames --visual (tower + merger)--> (t, h/2, w/2, D)
        fast: the temporal patches `fast_temporal_patches` picks (uniform), exactly the host's video
              tokens for those frames; the host's own multimodal RoPE positions them with the fast grid
              `(t_fast, h, w)` and the fast patches' mean spacing in time (`fast_video_grids`)
        slow: every temporal patch, average-pooled with `video_pooling_stride`, (t * h' * w', D)

Inputs without torchvision (the host's video processor needs it): `video_inputs` builds the patches,
grid and time spacing from decoded frames with the host's own resize rule, and `text_inputs` the
`input_ids` (each `<|video_pad|>` expanded for the fast frames) and `mm_token_type_ids`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..modeling.slow_tokens import SlowCache, pool_frames
from ..transformers_compat import multimodal_output_class
from .base import (
    HostFamily,
    SlowFastHostConfig,
    SlowFastHostMixin,
    SlowFastHostProcessorMixin,
    select_fast_frames,
)

# The host video processor's defaults (Qwen2VLVideoProcessor): pixels per frame after resizing.
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


def fast_temporal_patches(num_patches: int, fast_frames: int, temporal_patch_size: int) -> list[int]:
    """Which of a video's `num_patches` temporal patches (frame pairs) the host sees: `fast_frames` frames
    are `ceil(fast_frames / temporal_patch_size)` patches, chosen uniformly."""
    return select_fast_frames(num_patches, math.ceil(fast_frames / temporal_patch_size))


class SlowFastQwen2_5_VLConfig(SlowFastHostConfig, Qwen2_5_VLConfig):
    """A `Qwen2_5_VLConfig` with the slow-fast knobs (`frames`, `fast_frames` count frames; the host sees
    them in temporal patches of `vision_config.temporal_patch_size`)."""

    model_type = "slowfast_qwen2_5_vl"

    def fast_video_placeholder(self, grid: list[int], fps: float, video_token: str) -> str:
        """What the host's processor writes for a video of grid `(t, h, w)` sampled at `fps`, for its fast
        temporal patches: one `video_token` per merged token."""
        t, h, w = grid
        patches = fast_temporal_patches(t, self.fast_frames, self.vision_config.temporal_patch_size)
        return video_token * (len(patches) * h * w // self.vision_config.spatial_merge_size**2)


@dataclass
class SlowFastQwen2_5_VLOutput(
    multimodal_output_class(modeling_qwen2_5_vl, "Qwen2_5_VLCausalLMOutputWithPast")
):
    """The host's output (fields as the installed transformers names them) plus the `slow_cache`
    that `generate` carries between steps."""

    slow_cache: SlowCache | None = None


class QwenVLHostMixin(SlowFastHostMixin):
    """Qwen-VL hosts: videos as flattened patches + `video_grid_thw`, multimodal RoPE from `input_ids`
    and the grids (`get_rope_index`), which the host computes itself from the fast grids."""

    ids_with_embeds = True

    def fast_video_grids(
        self, video_grid_thw: torch.Tensor, second_per_grid_ts: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The host's `video_grid_thw` `(V, 3)` and `second_per_grid_ts` `(V,)` for the fast frames of videos
        whose every frame is described by `video_grid_thw` (seconds per temporal patch, 1 if not given):
        `t_fast` temporal patches, spaced by the mean spacing of the chosen ones."""
        patch = self.config.vision_config.temporal_patch_size
        if second_per_grid_ts is None:
            second_per_grid_ts = torch.ones(len(video_grid_thw))
        grids, seconds = [], []
        for (t, h, w), second in zip(video_grid_thw.tolist(), torch.as_tensor(second_per_grid_ts).tolist()):
            index = fast_temporal_patches(t, self.config.fast_frames, patch)
            spacing = (index[-1] - index[0]) / (len(index) - 1) if len(index) > 1 else 1
            grids.append([len(index), h, w])
            seconds.append(second * spacing)
        return {
            "video_grid_thw": torch.tensor(grids, device=video_grid_thw.device),
            "second_per_grid_ts": torch.tensor(seconds, device=video_grid_thw.device),
        }

    def encode_videos(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
    ) -> list[torch.Tensor]:
        """Every video's merged visual tokens `(t, h/2, w/2, D)`, `vision_frame_chunk_size` frames at a time
        (exact: the tower attends within one temporal patch)."""
        visual, merge = self.model.visual, self.config.vision_config.spatial_merge_size
        chunk = max(1, self.config.vision_frame_chunk_size // self.config.vision_config.temporal_patch_size)
        videos = []
        for patches, (t, h, w) in zip(
            pixel_values_videos.split(video_grid_thw.prod(-1).tolist()), video_grid_thw.tolist()
        ):
            tokens = [
                visual(
                    rows.type(visual.dtype),
                    grid_thw=torch.tensor([[len(rows) // (h * w), h, w]]).to(rows.device),
                ).pooler_output
                for rows in patches.split(chunk * h * w)
            ]
            videos.append(torch.cat(tokens).reshape(t, h // merge, w // merge, -1))
        return videos

    @staticmethod
    def checked_video_grid(pixel_values_videos: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The `video_grid_thw` `(V, 3)` of `kwargs`, checked against the patches `(sum t*h*w, C*2*p*p)`."""
        grid = kwargs.get("video_grid_thw")
        if (
            grid is None
            or pixel_values_videos.dim() != 2
            or pixel_values_videos.shape[0] != int(grid.prod(-1).sum())
        ):
            raise ValueError(
                "pixel_values_videos must be the (patches, C*2*p*p) of every frame with their video_grid_thw "
                f"(videos, 3), got {tuple(pixel_values_videos.shape)} and {None if grid is None else grid.tolist()}"
            )
        return grid

    def video_inputs(
        self, pixel_values_videos: torch.Tensor, kwargs: dict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`pixel_values_videos` `(sum t*h*w, C*2*p*p)`, every frame's patches, with `video_grid_thw`
        `(V, 3)` in `kwargs`; the host is then given the fast frames' grids and time spacing."""
        grid = self.checked_video_grid(pixel_values_videos, kwargs)
        patch = self.config.vision_config.temporal_patch_size
        fast, slow = [], []
        for tokens in self.encode_videos(pixel_values_videos, grid):  # (t, h', w', D)
            fast.append(
                tokens[fast_temporal_patches(len(tokens), self.config.fast_frames, patch)].flatten(0, 2)
            )
            slow.append(pool_frames(tokens, self.config.video_pooling_stride).flatten(0, 2))
        kwargs.update(self.fast_video_grids(grid, kwargs.get("second_per_grid_ts")))
        return fast, slow

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict):
        # `generate` positions the prompt from the grids before the first forward: the fast ones.
        if model_kwargs.get("video_grid_thw") is not None:
            fast = self.fast_video_grids(
                model_kwargs["video_grid_thw"], model_kwargs.get("second_per_grid_ts")
            )
            model_kwargs = {**model_kwargs, **fast}
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)


class SlowFastQwen2_5_VLForConditionalGeneration(QwenVLHostMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with the slow branch."""

    config: SlowFastQwen2_5_VLConfig
    config_class = SlowFastQwen2_5_VLConfig
    output_class = SlowFastQwen2_5_VLOutput


class QwenVLProcessorMixin(SlowFastHostProcessorMixin):
    """Expands each `<|video_pad|>` for the video's fast temporal patches, while `pixel_values_videos` and
    `video_grid_thw` keep every frame (the model picks the fast ones with `fast_temporal_patches`)."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        grid = video_inputs["video_grid_thw"][video_idx]
        patch = self.video_processor.temporal_patch_size
        index = fast_temporal_patches(int(grid[0]), self.checked_fast_frames(), patch)
        fast = {"video_grid_thw": {video_idx: torch.cat([grid.new_tensor([len(index)]), grid[1:]])}}
        if "video_metadata" in video_inputs:  # Qwen3-VL dates each temporal patch by its frames
            metadata = copy.copy(video_inputs["video_metadata"][video_idx])
            frames = list(metadata.frames_indices)
            frames += frames[-1:] * (-len(frames) % patch)  # the host pads with the last frame
            metadata.frames_indices = [frames[k * patch + j] for k in index for j in range(patch)]
            fast["video_metadata"] = {video_idx: metadata}
        # the host's own expansion, of the fast temporal patches
        return super(SlowFastHostProcessorMixin, self).replace_video_token(fast, video_idx, **kwargs)


class SlowFastQwen2_5_VLProcessor(QwenVLProcessorMixin, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` whose `<|video_pad|>` expansion counts the fast frames."""


def video_inputs(
    videos: list[torch.Tensor],
    fps: float | list[float],
    vision_config,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> dict[str, torch.Tensor]:
    """The host video processor's outputs without torchvision, for every frame of each video.

    Args:
        videos: per video `(T, H, W, 3)` uint8 frames (as `load_video` returns them); T is padded with
            copies of the last frame to a multiple of the temporal patch size, as the host does.
        fps: the rate the frames were sampled at (per video or one for all): a temporal patch lasts
            `temporal_patch_size / fps` seconds (the host's `second_per_grid_ts`).
        vision_config: the host's (`model.config.vision_config`): patch, merge and temporal patch sizes.
        min_pixels, max_pixels: pixels per frame after resizing (the host video processor's
            `size["shortest_edge"]`, `size["longest_edge"]`).
        mean, std: the host video processor's normalisation (CLIP's for Qwen2.5-VL, 0.5 for Qwen3-VL).

    Returns:
        `pixel_values_videos` `(sum t*h*w, 3*tp*p*p)`, `video_grid_thw` `(V, 3)`, `second_per_grid_ts`
        `(V,)`. Frames are resized to the host's `smart_resize` size with torch's antialiased bicubic
        interpolation (the host uses torchvision's; pixel values may differ by its rounding), then
        rescaled to [0, 1] and normalised as the host does.
    """
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    temporal = vision_config.temporal_patch_size
    fps = fps if isinstance(fps, (list, tuple)) else [fps] * len(videos)
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    patches, grids = [], []
    for frames in videos:
        frames = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        height, width = smart_resize(frames.shape[2], frames.shape[3], patch * merge, min_pixels, max_pixels)
        if (height, width) != tuple(frames.shape[2:]):
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True).clamp(0, 255)
        frames = (frames / 255 - mean) / std
        if pad := -len(frames) % temporal:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        video_patches, grid = patchify(frames, patch, merge, temporal)
        patches.append(video_patches)
        grids.append(grid)
    return {
        "pixel_values_videos": torch.cat(patches),
        "video_grid_thw": torch.tensor(grids),
        "second_per_grid_ts": torch.tensor([temporal / rate for rate in fps]),
    }


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, list[int]]:
    """`(T, C, H, W)` -> the host's flat patch layout `(t*h*w, C*temporal*patch*patch)` and `[t, h, w]`:
    patches in raster order of `merge x merge` blocks, so that the merger's blocks are consecutive rows."""
    num_frames, channels, height, width = frames.shape
    t, h, w = num_frames // temporal, height // patch, width // patch
    blocks = frames.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    # (t, h/m, w/m, m, m, C, temporal, p, p): one row per patch, merge blocks contiguous
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(t * h * w, channels * temporal * patch * patch), [t, h, w]


def text_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    video_grid_thw: torch.Tensor,
    config: SlowFastQwen2_5_VLConfig,
    fps: float | list[float] = 2.0,
    video_token: str = "<|video_pad|>",
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` (left-padded) and `mm_token_type_ids` for prompts whose k-th
    `video_token` (a chat template's single placeholder) is expanded for video k's fast frames
    (`config.fast_video_placeholder`; `fps`, per video or one for all, dates Qwen3-VL's frames); what
    the converted processor writes, without its torchvision video processor."""
    grids = iter(video_grid_thw.tolist())
    rates = iter(fps if isinstance(fps, (list, tuple)) else [fps] * len(video_grid_thw))
    expanded = []
    for text in prompts:
        pieces = text.split(video_token)
        for i in range(1, len(pieces)):
            pieces[i] = config.fast_video_placeholder(next(grids), next(rates), video_token) + pieces[i]
        expanded.append("".join(pieces))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = tokenizer(expanded, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    ids = encoded["input_ids"]
    # the host's modality types: text 0, image 1, video 2 (they let it find each grid's tokens)
    types = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": types}


FAMILY = HostFamily(
    "qwen2_5_vl",
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    SlowFastQwen2_5_VLForConditionalGeneration,
    SlowFastQwen2_5_VLProcessor,
)
