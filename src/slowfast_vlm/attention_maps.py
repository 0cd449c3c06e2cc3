"""Attention maps: which frames and regions the hybrid layers' cross-attention read.

Run the model forward with `record_slow_attention=True`; the returned `slow_cache` then holds, per
hybrid layer, the cross-attention probabilities over the slow tokens summed over every querying token
(prompt text and generated tokens). `video_attention_map` averages them and folds them back onto the
`(T, h, w)` slow-token grid of a video; `span_attention_map` averages only the tokens of one stretch of
the text (a question's own words); `save_attention_map_png` draws a per-frame curve and heat maps over
the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .modeling.slow_tokens import SlowCache


@dataclass
class AttentionMap:
    """Cross-attention over one video's slow tokens.

    Attributes:
        per_layer: `(layers, T, h, w)` probabilities, averaged over heads and query tokens.
        layer_indices: LLM layer index of each row of `per_layer`.
    """

    per_layer: np.ndarray
    layer_indices: list[int]

    @property
    def mean(self) -> np.ndarray:
        """`(T, h, w)`: averaged over the hybrid layers."""
        return self.per_layer.mean(axis=0)

    @property
    def per_frame(self) -> np.ndarray:
        """`(T,)`: attention mass each frame received (sums to 1 over the frames)."""
        return self.mean.sum(axis=(1, 2))

    @property
    def peak_frame(self) -> int:
        return int(self.per_frame.argmax())


def video_attention_map(
    slow_cache: SlowCache, sample: int, shape: tuple[int, int, int], offset: int = 0
) -> AttentionMap:
    """The attention map of the video at slow-token offset `offset` of batch row `sample`, averaged over
    every query token of the row.

    Args:
        slow_cache: returned by a forward/generate call made with `record_slow_attention=True`.
        shape: `(T, h, w)` of the video's slow tokens (frame-major, as the model lays them out).
    """
    maps = slow_cache.attention_map()[sample].mean(dim=1)  # (layers, N): averaged over heads
    return _folded(maps[:, offset : offset + int(np.prod(shape))], shape, slow_cache)


def span_attention_map(
    slow_cache: SlowCache, row: int, prefix_row: int, shape: tuple[int, int, int]
) -> AttentionMap:
    """The map of only the query tokens that batch row `row` has beyond row `prefix_row`, which holds a
    prefix of the same sequence and the same (single) video of slow-token shape `(T, h, w)`.

    A hybrid layer records, per row, its cross-attention probabilities summed over the row's query
    tokens and their count; in a causal model a token's attention depends only on the tokens up to it,
    so the difference of the two rows over the difference of their counts averages exactly the tokens
    between the two ends (e.g. a question's own words: the prompt through them, and the prompt before).
    """
    per_layer = []
    for layer in sorted(slow_cache.attention):
        total, count = slow_cache.attention[layer]  # (B, H, N), (B,)
        tokens = int(count[row] - count[prefix_row])
        if tokens < 1:
            raise ValueError(f"rows {prefix_row} -> {row}: no query token between the two ends")
        per_layer.append((total[row] - total[prefix_row]).mean(dim=0) / tokens)  # (N,): averaged over heads
    return _folded(torch.stack(per_layer)[:, : int(np.prod(shape))], shape, slow_cache)


def _folded(maps: torch.Tensor, shape: tuple[int, int, int], slow_cache: SlowCache) -> AttentionMap:
    """`maps` `(layers, T*h*w)` as an `AttentionMap` of `(layers, T, h, w)`."""
    return AttentionMap(
        per_layer=maps.reshape(-1, *shape).float().cpu().numpy(), layer_indices=sorted(slow_cache.attention)
    )


def save_attention_map_png(
    attention: AttentionMap,
    path: str | Path,
    frames: np.ndarray | None = None,
    max_frames: int = 32,
    title: str | None = None,
) -> Path:
    """Write a PNG: the per-frame attention curve (mean and per layer) above heat maps over frames.

    `frames` `(T, H, W, 3)` uint8, when given, are shown under the heat maps. With more than
    `max_frames` frames, the heat maps show the `max_frames` frames around the peak.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_frames = attention.per_layer.shape[1]
    start = min(max(attention.peak_frame - max_frames // 2, 0), max(num_frames - max_frames, 0))
    shown = list(range(start, min(start + max_frames, num_frames)))
    columns = min(len(shown), 8)
    rows = (len(shown) + columns - 1) // columns

    figure = plt.figure(figsize=(2 * columns, 2.6 + 2 * rows))
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[1.3] + [1] * rows)
    curve = figure.add_subplot(grid[0, :])
    for layer, values in zip(attention.layer_indices, attention.per_layer):
        curve.plot(values.sum(axis=(1, 2)), linewidth=0.8, alpha=0.6, label=f"layer {layer}")
    curve.plot(attention.per_frame, color="black", linewidth=2, label="mean")
    curve.set_xlabel("frame")
    curve.set_ylabel("attention mass")
    curve.legend(fontsize=7, ncol=min(len(attention.layer_indices) + 1, 6))
    if title:
        curve.set_title(title)
    vmax = float(attention.mean[shown].max())
    for i, frame_index in enumerate(shown):
        axis = figure.add_subplot(grid[1 + i // columns, i % columns])
        heat = attention.mean[frame_index]
        if frames is not None:
            image = frames[frame_index]
            axis.imshow(image)
            axis.imshow(
                heat, cmap="jet", alpha=0.5, vmin=0, vmax=vmax, extent=(0, image.shape[1], image.shape[0], 0)
            )
        else:
            axis.imshow(heat, cmap="jet", vmin=0, vmax=vmax)
        axis.set_title(f"frame {frame_index}", fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["AttentionMap", "save_attention_map_png", "span_attention_map", "video_attention_map"]
