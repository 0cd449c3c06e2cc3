"""Model forward: mixed padded batches, loss, placeholder errors, vision encoders and chunking."""

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, open_gates, tiny_model

from slowfast_vlm import fast_token_count
from slowfast_vlm.modeling.vision import encode_frames


def video_prompt(model, frames, before=(3, 4), after=(5, 6, 7)):
    grid = model.model.visual_grid(frames)
    return list(before) + [VIDEO_TOKEN_ID] * fast_token_count(frames, grid, model.config) + list(after)


def image_prompt(model, before=(8,), after=(9, 10)):
    grid = model.model.visual_grid(1)
    return list(before) + [IMAGE_TOKEN_ID] * fast_token_count(1, grid, model.config) + list(after)


@pytest.mark.parametrize("vision", ["siglip", "clip", "convnext"])
def test_padded_mixed_batch_equals_each_sample_alone(vision):
    model = tiny_model(vision=vision, seed=5)
    open_gates(model, 0.9)
    torch.manual_seed(0)
    video_a, video_b, image = torch.randn(4, 3, 32, 32), torch.randn(9, 3, 32, 32), torch.randn(3, 32, 32)
    samples = [
        (video_prompt(model, 4), {"pixel_values_videos": [video_a]}),
        (image_prompt(model), {"pixel_values": [image]}),
        ([11, 12, 13, 14], {}),
        (video_prompt(model, 9, before=(2,)), {"pixel_values_videos": [video_b]}),
    ]
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, (ids, _) in enumerate(samples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    with torch.no_grad():
        batched = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values_videos=[video_a, video_b],
            pixel_values=image[None],
        ).logits
        for i, (ids, visual) in enumerate(samples):
            alone = model(input_ids=torch.tensor([ids]), **visual).logits[0]
            torch.testing.assert_close(batched[i, : len(ids)], alone, rtol=1e-4, atol=1e-5)


def test_slow_tokens_act_only_through_open_gates():
    model = tiny_model(seed=6)
    ids = torch.tensor([video_prompt(model, 4)])
    video = torch.randn(1, 4, 3, 32, 32)
    no_queries = torch.zeros_like(ids, dtype=torch.bool)
    with torch.no_grad():
        closed = model(input_ids=ids, pixel_values_videos=video).logits
        closed_blind = model(input_ids=ids, pixel_values_videos=video, slow_query_mask=no_queries).logits
        open_gates(model)
        opened = model(input_ids=ids, pixel_values_videos=video).logits
        opened_blind = model(input_ids=ids, pixel_values_videos=video, slow_query_mask=no_queries).logits
    torch.testing.assert_close(closed, closed_blind, rtol=0, atol=0)
    torch.testing.assert_close(opened_blind, closed, rtol=0, atol=0)
    # every text position, before and after the video, reads the slow tokens
    assert not torch.allclose(opened[0, :2], closed[0, :2])
    assert not torch.allclose(opened[0, -3:], closed[0, -3:])


def test_labels_give_shifted_cross_entropy():
    model = tiny_model(seed=7)
    ids = torch.tensor([video_prompt(model, 4)])
    labels = ids.clone()
    labels[:, :-3] = -100
    out = model(input_ids=ids, pixel_values_videos=torch.randn(1, 4, 3, 32, 32), labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    gate_grads = [layer.cross_attn_warm_up_gate.grad for layer in model.hybrid_attentions]
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)


def test_placeholder_count_mismatch_is_an_error():
    model = tiny_model()
    ids = torch.tensor([video_prompt(model, 4)[:-4]])  # one placeholder short
    with pytest.raises(ValueError, match="placeholder tokens"):
        model(input_ids=ids, pixel_values_videos=torch.randn(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="without a <video> placeholder"):
        model(input_ids=torch.tensor([[1, 2, 3]]), pixel_values_videos=torch.randn(1, 4, 3, 32, 32))


def test_eager_and_sdpa_agree():
    video = torch.randn(1, 8, 3, 32, 32)
    logits = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn=attn, seed=8)
        open_gates(model)
        with torch.no_grad():
            logits.append(
                model(input_ids=torch.tensor([video_prompt(model, 8)]), pixel_values_videos=video).logits
            )
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_chunked_encoding():
    """Chunked encoding equals one pass."""
    model = tiny_model(vision_frame_chunk_size=3, seed=9)
    frames = torch.randn(7, 3, 32, 32)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    with torch.no_grad():
        chunked = encode_frames(tower, projector, frames, -1, 3)
        whole = encode_frames(tower, projector, frames, -1, 100)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_projector_layouts():
    from slowfast_vlm.modeling.vision import build_projector

    mlp = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp[0].in_features == 8 and mlp[4].out_features == 16
    assert len(build_projector("linear", 8, 16)) == 1


def test_bf16_autocast_forward_and_backward():
    """Mixed precision (HF Trainer with bf16=True): fp32 weights, bf16 compute, gates open."""
    model = tiny_model(seed=10)
    open_gates(model)
    ids = torch.tensor([video_prompt(model, 8)])
    video = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values_videos=video).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, pixel_values_videos=video, labels=ids)
    out.loss.backward()
    assert model.hybrid_attentions[0].cross_attn_warm_up_gate.grad is not None
    # bf16 compute stays close to the fp32 result
    torch.testing.assert_close(out.logits.float(), reference, rtol=0.1, atol=0.1)
