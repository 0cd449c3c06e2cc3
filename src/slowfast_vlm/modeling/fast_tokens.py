"""Fast tokens: the compressed preview of a sample's slow tokens that enters the LLM sequence.

Architecture section 1.3 (docs/architecture.md). Everything here is a pure function of shapes and the config, so the
processor can count fast tokens (for placeholder expansion) without running the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SlowFastConfig


def fast_frame_indices(num_frames: int, config: SlowFastConfig) -> list[int]:
    """Step 1, temporal sampling: which of the `num_frames` slow frames are kept."""
    stride, min_frames = config.fast_temporal_sampling_stride, config.min_fast_frames
    if stride > 1 and num_frames >= min_frames:
        kept = max(num_frames // stride, min_frames)
        return [min(int(i * num_frames / kept), num_frames - 1) for i in range(kept)]
    return list(range(num_frames))


def fast_frame_count(num_frames: int, config: SlowFastConfig) -> int:
    """Number of fast frames a sample with `num_frames` slow frames gets (steps 1-2)."""
    if num_frames == 1:
        return 1
    kept = len(fast_frame_indices(num_frames, config))
    stride, min_frames = config.fast_temporal_pooling_stride, config.min_fast_frames
    if kept // stride >= min_frames:
        return kept // stride
    return min(kept, min_frames)


def fast_grid(grid: tuple[int, int], config: SlowFastConfig) -> tuple[int, int]:
    """Step 3: the (h', w') grid after spatial average pooling (floor, as `avg_pool2d`)."""
    stride = config.fast_spatial_pooling_stride
    return grid[0] // stride, grid[1] // stride


def fast_token_count(num_frames: int, grid: tuple[int, int], config: SlowFastConfig) -> int:
    """Length of `build_fast_tokens`' output for `num_frames` slow frames of an (h, w) grid."""
    h, w = fast_grid(grid, config)
    return fast_frame_count(num_frames, config) * h * w


def build_fast_tokens(
    frame_tokens: torch.Tensor, grid: tuple[int, int], config: SlowFastConfig
) -> torch.Tensor:
    """Build one sample's fast tokens from its slow tokens (architecture section 1.3).

    Args:
        frame_tokens: `(T, h*w, D)` slow tokens of one sample, frame-major (T = 1 for a still image).
        grid: `(h, w)`, the spatial grid of each frame.
        config: supplies the fast-token strides and `min_fast_frames`.

    Returns:
        `(T_fast * h' * w', D)` fast tokens, frame-major.
    """
    num_frames, tokens_per_frame, dim = frame_tokens.shape
    h, w = grid
    if tokens_per_frame != h * w:
        raise ValueError(f"build_fast_tokens: {tokens_per_frame} tokens per frame do not fit grid {grid}")
    x = frame_tokens
    if num_frames > 1:
        # 1. temporal sampling
        x = x[fast_frame_indices(num_frames, config)]
        # 2. temporal pooling: fixed groups of p frames when that leaves enough frames, else adaptive
        kept, stride = x.shape[0], config.fast_temporal_pooling_stride
        if kept // stride >= config.min_fast_frames:
            groups = kept // stride
            x = x[: groups * stride].reshape(groups, stride, h * w, dim).mean(dim=1)
        else:
            target = min(kept, config.min_fast_frames)
            # (T, hw, D) -> (hw*D, 1, T) so the pool runs over time only
            pooled = F.adaptive_avg_pool1d(x.reshape(kept, -1).transpose(0, 1).unsqueeze(1), target)
            x = pooled.squeeze(1).transpose(0, 1).reshape(target, h * w, dim)
    # 3. spatial pooling on every remaining frame: (T', hw, D) -> (T', D, h, w)
    stride = config.fast_spatial_pooling_stride
    if stride > 1:
        grids = x.transpose(1, 2).reshape(x.shape[0], dim, h, w)
        grids = F.avg_pool2d(grids, kernel_size=stride, stride=stride)
        x = grids.flatten(2).transpose(1, 2)
    # 4. flatten frame-major
    return x.reshape(-1, dim)
