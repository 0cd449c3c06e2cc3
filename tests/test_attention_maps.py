"""Attention maps over the slow tokens: recorded probabilities and their frame-major layout."""

import numpy as np
import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_model
from PIL import Image

from slowfast_vlm import fast_token_count
from slowfast_vlm.attention_maps import save_attention_map_png, video_attention_map
from slowfast_vlm.inference import compute_attention_map
from slowfast_vlm.modeling.slow_tokens import SlowCache


def test_constructed_example_peaks_at_the_matching_token():
    """Queries equal to one slow token's direction must read that token: frame 5, row 1, col 0."""
    model = tiny_model(seed=20).double()
    attn = model.hybrid_attentions[0]
    num_frames, h, w, dim = 8, 2, 2, 64
    with torch.no_grad():
        attn.q_proj.weight.copy_(torch.eye(dim))
        attn.q_proj.bias.zero_()
        # keys = 4 * (normalised token), per kv head its own 16 dims, laid out (head, [key|value], hd)
        kv = attn.cross_attn_kv_proj.weight.view(2, 2, 16, dim)
        kv.zero_()
        for g in range(2):
            kv[g, 0] = 4 * torch.eye(dim)[g * 16 : (g + 1) * 16]
        attn.cross_attn_kv_proj.bias.zero_()
    v = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = torch.cat([v, v, v, v])  # every head's query block equals every kv head's key block
    slow = 0.1 * torch.randn(1, num_frames * h * w, dim, dtype=torch.float64)
    target = 5 * h * w + 1 * w + 0  # frame 5, row 1, column 0 in frame-major order
    slow[0, target] = direction
    hidden = direction.expand(1, 3, dim).clone()
    cache = SlowCache(tokens=slow, mask=torch.ones(1, slow.shape[1], dtype=torch.bool), record_attention=True)
    ones, zeros = torch.ones(1, 3, 16, dtype=torch.float64), torch.zeros(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        attn(
            hidden,
            position_embeddings=(ones, zeros),
            attention_mask=None,
            slow_cache=cache,
            slow_query_mask=torch.ones(1, 3, dtype=torch.bool),
        )
    attention = video_attention_map(cache, 0, (num_frames, h, w))
    assert attention.per_layer.shape == (1, num_frames, h, w)
    assert attention.peak_frame == 5
    assert np.unravel_index(attention.mean[5].argmax(), (h, w)) == (1, 0)
    np.testing.assert_allclose(attention.per_frame.sum(), 1.0, rtol=1e-6)


def test_recording_changes_nothing_and_maps_are_distributions(tmp_path):
    model = tiny_model(seed=21)
    open_gates(model)
    count = fast_token_count(8, model.model.visual_grid(8), model.config)
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * count + [5, 6, 7]])
    video = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values_videos=[video]).logits
        recorded = model(input_ids=ids, pixel_values_videos=[video], record_slow_attention=True)
    torch.testing.assert_close(recorded.logits, plain, rtol=1e-5, atol=1e-6)

    attention = compute_attention_map(model, ids, video)
    assert attention.per_layer.shape == (2, 8, 2, 2)  # 2 hybrid layers, 8 frames of 2x2
    assert attention.layer_indices == [0, 2]
    np.testing.assert_allclose(attention.per_layer.sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)

    frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    path = save_attention_map_png(attention, tmp_path / "map.png", frames=frames, title="test")
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 200
