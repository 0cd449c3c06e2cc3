"""Slow tokens (`modeling/slow_tokens.py`): pooling, grids, the batch cache, which positions read them."""

import pytest
import torch
from helpers import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_config, tiny_model

from slowfast_vlm.modeling.slow_tokens import (
    SlowCache,
    build_slow_cache,
    pool_frames,
    query_mask,
    query_positions,
    slow_grid,
)


def test_pooling_is_a_block_average_and_only_videos_are_pooled():
    grids = torch.randn(2, 4, 4, 5)
    expected = grids.reshape(2, 2, 2, 2, 2, 5).mean(dim=(2, 4))
    torch.testing.assert_close(pool_frames(grids, 2), expected)
    assert pool_frames(grids, 1) is grids
    # 18 x 18 ConvNeXt grid, stride 2: 9 x 9 per video frame (architecture 1.2), a still image unpooled
    assert slow_grid((18, 18), num_frames=64, video_pooling_stride=2) == (9, 9)
    assert slow_grid((18, 18), num_frames=1, video_pooling_stride=2) == (18, 18)


def test_cache_pads_samples_and_masks_their_padding():
    like = torch.zeros(3, 5, 4, dtype=torch.bfloat16)  # (B, L, D) embeddings
    first, second = torch.randn(3, 4), torch.randn(1, 4)
    cache = build_slow_cache([first, torch.zeros(0, 4), second], like, cache_kv=False, record_attention=True)
    assert cache.tokens.shape == (3, 3, 4) and cache.tokens.dtype == torch.bfloat16
    assert torch.equal(cache.tokens[0], first.to(torch.bfloat16))
    assert torch.equal(cache.tokens[2, 0], second[0].to(torch.bfloat16)) and not cache.tokens[2, 1:].any()
    assert cache.mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert cache.has_slow.tolist() == [True, False, True]
    # the sample without slow tokens sees its padding (no all-masked softmax); the others their own tokens
    assert cache.key_mask.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert (cache.cache_kv, cache.record_attention) == (False, True)


def test_cache_of_a_batch_without_visual_input_has_one_masked_slot():
    cache = build_slow_cache([torch.zeros(0, 4)] * 2, torch.zeros(2, 3, 4))
    assert cache.tokens.shape == (2, 1, 4) and not cache.mask.any() and not cache.has_slow.any()


def test_keys_and_values_are_projected_once_per_layer_when_cached():
    calls = []

    def project(tokens):
        calls.append(tokens.shape)
        return tokens + 1, tokens + 2

    tokens = torch.randn(1, 2, 4)
    cache = SlowCache(tokens=tokens, mask=torch.ones(1, 2, dtype=torch.bool))
    assert cache.key_mask is None  # nothing padded: no mask for SDPA
    first = cache.get(0, project)
    assert cache.get(0, project) is first and len(calls) == 1
    cache.get(3, project)
    assert len(calls) == 2
    uncached = SlowCache(tokens=tokens, mask=torch.ones(1, 2, dtype=torch.bool), cache_kv=False)
    uncached.get(0, project), uncached.get(0, project)
    assert len(calls) == 4


def reference_query_mask(types, mode, mask_system):
    """Architecture 1.4 / 1.5.3 from token types: 1 prompt, 2 response, 3 fast visual, 4 padding."""
    result = []
    for row in types:
        seen_visual, out = False, []
        for t in row:
            seen_visual |= t == 3
            is_query = t in (1, 2) if mode == "text" else t in (1, 2, 3)
            out.append(is_query and (seen_visual or not mask_system))
        result.append(out)
    return torch.tensor(result)


@pytest.mark.parametrize("mode", ["text", "all"])
@pytest.mark.parametrize("mask_system", [False, True])
def test_query_positions(mode, mask_system):
    model = tiny_model(cross_attn_queries=mode, mask_system_tokens=mask_system)
    V, I = VIDEO_TOKEN_ID, IMAGE_TOKEN_ID  # noqa: E741
    input_ids = torch.tensor([[5, 6, V, V, 7, 8, 0], [5, I, I, 6, 7, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    attention_mask = torch.tensor([[1] * 6 + [0], [1] * 5 + [0] * 2, [1] * 7])
    types = torch.where(model.model.placeholder_mask(input_ids), 3, 1)
    types = torch.where(attention_mask.bool(), types, 4).tolist()
    got = query_positions(model.model.placeholder_mask(input_ids), attention_mask, model.config)
    assert torch.equal(got, reference_query_mask(types, mode, mask_system))


@pytest.mark.parametrize("see_slow", [True, False])
def test_query_mask_for_a_prefill_and_for_later_steps(see_slow):
    config = tiny_config(generated_tokens_see_slow=see_slow)
    is_visual = torch.tensor([[False, True, True, False]])
    attention_mask = torch.tensor([[1, 1, 1, 1]])
    cache = build_slow_cache([torch.randn(2, 64)], torch.zeros(1, 4, 64))
    # a prefill: the prompt's text positions, whatever the switch
    prefill = query_mask(config, is_visual.shape, is_visual, attention_mask, cache)
    assert prefill.tolist() == [[True, False, False, True]]
    # a later step with the cache carried over: the new (generated) positions, only with the switch on
    step = query_mask(config, torch.Size((1, 1)), None, None, cache)
    assert (step.tolist() == [[True]]) if see_slow else step is None
    # no visual input and no cache: nothing reads slow tokens
    assert query_mask(config, torch.Size((1, 3)), None, None, None) is None
