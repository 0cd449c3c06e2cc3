"""Attention maps over the slow tokens: recorded probabilities and their frame-major layout."""

import numpy as np
import pytest
import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_config, tiny_model, tiny_tokenizer
from PIL import Image

from slowfast_vlm import SlowFastProcessor, fast_token_count
from slowfast_vlm.attention_maps import save_attention_map_png, span_attention_map, video_attention_map
from slowfast_vlm.inference import build_conversation, compute_attention_map, text_span
from slowfast_vlm.modeling.slow_tokens import SlowCache
from slowfast_vlm.transformers_compat import cache_field, cache_of


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


def test_question_restricted_peak_on_a_hand_made_map():
    """Row 0: the prompt up to the question (3 query tokens, all on frame 0); row 1: the prompt through
    the question (the same 3, then 2 question tokens on frame 2). Over every token the peak is frame 0;
    over the question's tokens it is frame 2 with all its mass."""
    frames, h, w = 4, 1, 2
    probs = torch.zeros(2, 2, frames * h * w)  # (rows, heads, slow tokens): summed over query tokens
    probs[:, :, 0] = 3.0  # frame 0, token 0
    probs[1, :, 2 * h * w + 1] = 2.0  # frame 2, token 1
    cache = SlowCache(
        tokens=torch.zeros(2, frames * h * w, 8), mask=torch.ones(2, frames * h * w, dtype=torch.bool)
    )
    cache.record(2, probs, torch.tensor([3, 5]))
    restricted = span_attention_map(cache, 1, 0, (frames, h, w))
    assert restricted.peak_frame == 2
    np.testing.assert_allclose(restricted.per_frame, [0, 0, 1, 0])
    np.testing.assert_allclose(restricted.mean[2], [[0, 1]])
    assert video_attention_map(cache, 1, (frames, h, w)).peak_frame == 0  # averaged over every token


def test_a_span_map_is_what_its_tokens_read_one_by_one():
    """`compute_attention_map` with a span (two prefix rows, differenced) against an independent route: the
    prompt before the span prefilled, then the span's tokens fed one decoding step at a time, each step
    recording its own token's cross-attention; the map is what those steps added, over their count."""
    model = tiny_model(seed=22).double()
    open_gates(model)
    count = fast_token_count(8, model.model.visual_grid(8), model.config)
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * count + [5, 6, 7, 8, 9, 10]])
    start, end = count + 3, count + 6  # tokens 6, 7, 8
    video = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :start], pixel_values_videos=[video], record_slow_attention=True)
        slow_cache, kv_cache = prefill.slow_cache, cache_of(prefill)
        before = {
            layer: (total.clone(), count_.clone()) for layer, (total, count_) in slow_cache.attention.items()
        }
        for position in range(start, end):
            step = model(
                input_ids=ids[:, position : position + 1], slow_cache=slow_cache, **cache_field(kv_cache)
            )
            kv_cache = cache_of(step)
    expected = []
    for layer in sorted(slow_cache.attention):
        total, tokens = slow_cache.attention[layer]
        assert int(tokens[0] - before[layer][1][0]) == end - start
        expected.append(((total[0] - before[layer][0][0]).mean(0) / (end - start)).reshape(8, 2, 2))

    span_map = compute_attention_map(model, ids, video, span=(start, end))
    np.testing.assert_allclose(span_map.per_layer, torch.stack(expected).numpy(), rtol=1e-9, atol=1e-12)
    whole = compute_attention_map(model, ids, video)  # every query token: a different average
    assert not np.allclose(whole.per_layer, span_map.per_layer, atol=1e-4)
    with pytest.raises(ValueError, match="after the video"):
        compute_attention_map(model, ids, video, span=(1, end))


def test_text_span_finds_the_question_tokens_behind_the_video():
    processor = SlowFastProcessor.from_model_config(tiny_config(), tiny_tokenizer())
    question = "Which digit is <|im_end|> shown?"  # escaped in the prompt: still found
    prompt = processor.apply_chat_template(build_conversation(question), add_generation_prompt=True)
    start, end = text_span(processor, prompt, question, num_frames=8)
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    ids = processor(text=[prompt], videos=[frames], return_tensors="pt")["input_ids"][0]
    # Independent: the question alone, tokenized as text (the prompt puts a newline before it).
    alone = processor.tokenizer(processor.escape_text(question), add_special_tokens=False)["input_ids"]
    assert ids[start:end].tolist() == alone
    assert (ids[:start] == processor.video_token_id).sum() == processor.num_fast_tokens(8)
    with pytest.raises(ValueError, match="not in the prompt"):
        text_span(processor, prompt, "no such words", num_frames=8)
