"""`build_fast_tokens` against a direct, loop-by-loop transcription of architecture section 1.3. (docs/architecture.md)"""

import itertools
import math

import pytest
import torch
from helpers import tiny_config

from slowfast_vlm import build_fast_tokens, fast_token_count


def reference_fast_tokens(x, grid, sampling, pooling, spatial, min_frames):
    """Section 1.3 written out with Python lists; `x` is `(T, h*w, D)`."""
    num_frames = x.shape[0]
    frames = [x[t] for t in range(num_frames)]
    if num_frames > 1:
        if sampling > 1 and num_frames >= min_frames:
            kept = max(num_frames // sampling, min_frames)
            frames = [frames[min(int(i * num_frames / kept), num_frames - 1)] for i in range(kept)]
        n = len(frames)
        if n // pooling >= min_frames:
            frames = [sum(frames[g * pooling : (g + 1) * pooling]) / pooling for g in range(n // pooling)]
        else:
            out = min(n, min_frames)
            # adaptive average pooling: bin i covers [floor(i*n/out), ceil((i+1)*n/out))
            frames = [
                sum(frames[math.floor(i * n / out) : math.ceil((i + 1) * n / out)])
                / (math.ceil((i + 1) * n / out) - math.floor(i * n / out))
                for i in range(out)
            ]
    h, w = grid
    result = []
    for frame in frames:
        cells = frame.reshape(h, w, -1)
        for i in range(h // spatial):
            for j in range(w // spatial):
                block = cells[i * spatial : (i + 1) * spatial, j * spatial : (j + 1) * spatial]
                result.append(block.reshape(-1, block.shape[-1]).mean(0))
    return torch.stack(result)


CASES = list(
    itertools.product(
        [1, 2, 7, 16, 17, 64],  # T
        [(2, 2), (3, 5)],  # grid
        [1, 2, 3],  # sampling stride
        [1, 4, 6],  # pooling stride
        [1, 2],  # spatial stride
        [1, 4, 16],  # min fast frames
    )
)


@pytest.mark.parametrize("num_frames,grid,sampling,pooling,spatial,min_frames", CASES)
def test_matches_reference(num_frames, grid, sampling, pooling, spatial, min_frames):
    config = tiny_config(
        fast_temporal_sampling_stride=sampling,
        fast_temporal_pooling_stride=pooling,
        fast_spatial_pooling_stride=spatial,
        min_fast_frames=min_frames,
    )
    generator = torch.Generator().manual_seed(num_frames * 1000 + sampling * 100 + pooling)
    x = torch.randn(num_frames, grid[0] * grid[1], 3, generator=generator, dtype=torch.float64)
    expected = reference_fast_tokens(x, grid, sampling, pooling, spatial, min_frames)
    got = build_fast_tokens(x, grid, config)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert fast_token_count(num_frames, grid, config) == expected.shape[0]


def test_published_geometry():
    """64 frames of 9x9 with the published strides give 16 x 81 = 1296 fast tokens (architecture 1.3)."""
    config = tiny_config(min_fast_frames=16)  # published strides are the defaults
    assert fast_token_count(64, (9, 9), config) == 1296
    assert build_fast_tokens(torch.randn(64, 81, 4), (9, 9), config).shape == (1296, 4)


def test_grid_mismatch_is_an_error():
    with pytest.raises(ValueError, match="grid"):
        build_fast_tokens(torch.randn(4, 10, 3), (3, 3), tiny_config())
