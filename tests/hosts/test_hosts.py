"""Plug and play: the slow branch on tiny random LLaVA-OneVision and LLaVA-NeXT-Video hosts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_config, tiny_tokenizer
from host_checks import (
    assert_hosts_weights_plus_cross_attention,
    assert_reloads_identically,
    assert_stage1_trains_only_new_parameters,
    open_gates,
)
from transformers import (
    AutoModelForImageTextToText,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2ForCausalLM,
)

from slowfast_vlm.hosts import convert_host, from_host, processor_from_host, select_fast_frames
from slowfast_vlm.hosts.llava_next_video import SlowFastLlavaNextVideoProcessor
from slowfast_vlm.hosts.llava_onevision import SlowFastLlavaOnevisionConfig, SlowFastLlavaOnevisionProcessor
from slowfast_vlm.modeling.hybrid import HybridAttention

FAMILIES = ["onevision", "next_video"]
FRAMES, FAST = 8, 4
FAST_INDEX = [0, 2, 4, 7]  # np.linspace(0, 7, 4) truncated: 0, 2.33, 4.67, 7
SLOW_ONLY_FRAME = 5
# Tokens per fast frame of the 4x4 encoder grid: OneVision resizes it to ceil(4/2)^2 = 4 and adds one
# newline per video; NeXT-Video average-pools it 2x2 -> 4.
FAST_TOKENS = {"onevision": FAST * 4 + 1, "next_video": FAST * 4}
KNOBS = dict(frames=FRAMES, fast_frames=FAST, hybrid_every_n_layers=2)


def tiny_host(family: str, seed: int = 0):
    """A random 4-layer host in eval mode: OneVision on Qwen2 + SigLIP, NeXT-Video on Llama + CLIP."""
    if family == "onevision":
        tiny = tiny_config(llm="qwen2", vision="siglip")
        config = LlavaOnevisionConfig(
            text_config=tiny.text_config.to_dict(),
            vision_config=tiny.vision_config.to_dict(),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID,
            image_grid_pinpoints=[[32, 32]],
        )
        host_class = LlavaOnevisionForConditionalGeneration
    else:
        tiny = tiny_config(llm="llama", vision="clip")
        config = LlavaNextVideoConfig(
            text_config=tiny.text_config.to_dict(),
            vision_config=tiny.vision_config.to_dict(),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID,
        )
        host_class = LlavaNextVideoForConditionalGeneration
    torch.manual_seed(seed)
    return host_class._from_config(config, attn_implementation="sdpa").eval()


def host_and_slowfast(family: str, seed: int = 0, **knobs):
    host = tiny_host(family, seed)
    return host, from_host(copy.deepcopy(host), **{**KNOBS, **knobs})


def prompt(family: str, before=(3, 4), after=(5, 6, 7)) -> list[int]:
    return [*before, *[VIDEO_TOKEN_ID] * FAST_TOKENS[family], *after]


def test_fast_frames_are_uniform():
    assert select_fast_frames(FRAMES, FAST) == FAST_INDEX
    assert select_fast_frames(16, 4) == [0, 5, 10, 15]
    assert select_fast_frames(3, 4) == [0, 1, 2]  # fewer frames than fast_frames: all of them


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_gates_equal_host_on_fast_frames(family, transformers_deprecations):
    host, model = host_and_slowfast(family, seed=1)
    torch.manual_seed(0)
    videos = torch.randn(2, FRAMES, 3, 32, 32)
    # Left-padded batch (generation), two prompts of different lengths.
    rows = [prompt(family), prompt(family, before=(9,))]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    host_inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        expected = host(**host_inputs, pixel_values_videos=videos[:, FAST_INDEX]).logits
        logits = model(**host_inputs, pixel_values_videos=videos).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_ids = host.generate(**host_inputs, pixel_values_videos=videos[:, FAST_INDEX], **generate)
    assert torch.equal(model.generate(**host_inputs, pixel_values_videos=videos, **generate), expected_ids)
    # nothing the installed transformers has deprecated was passed to it or returned by it
    assert [m for m in transformers_deprecations if "deprecat" in m.lower() or "past_key_values" in m] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frame_only_the_slow_tokens_carry_matters_once_gates_open(family):
    _, model = host_and_slowfast(family, seed=2)
    torch.manual_seed(0)
    video = torch.randn(1, FRAMES, 3, 32, 32)
    changed = video.clone()
    changed[:, SLOW_ONLY_FRAME] = torch.randn(3, 32, 32)
    ids = torch.tensor([prompt(family)])

    def logits(frames):
        with torch.no_grad():
            return model(input_ids=ids, pixel_values_videos=frames).logits

    assert torch.equal(logits(video), logits(changed))  # gates closed: the host's output, fast frames only
    open_gates(model)
    text = ids[0] != VIDEO_TOKEN_ID
    assert ((logits(video) - logits(changed))[0, text].abs().amax(-1) > 0).all()  # every text position


@pytest.mark.parametrize(("family", "stride"), [("onevision", 2), ("next_video", 1)])
def test_slow_tokens_are_every_frame_projected_and_pooled(family, stride):
    host, model = host_and_slowfast(family, seed=3, video_pooling_stride=stride, vision_frame_chunk_size=3)
    torch.manual_seed(0)
    video = torch.randn(1, FRAMES, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt(family)]), pixel_values_videos=video)
        # Reference: the host's vision tower, its feature layer (-1 SigLIP; -2 without CLS for CLIP),
        # its projector, then average pooling of each 4x4 grid.
        hidden = host.model.vision_tower(video[0], output_hidden_states=True).hidden_states
        features = hidden[-1] if family == "onevision" else hidden[-2][:, 1:]
        grids = host.model.multi_modal_projector(features).reshape(FRAMES, 4, 4, -1).permute(0, 3, 1, 2)
        expected = F.avg_pool2d(grids, stride).flatten(2).transpose(1, 2).reshape(-1, grids.shape[1])
    assert out.slow_cache.tokens.shape == (1, FRAMES * (4 // stride) ** 2, 64)
    assert out.slow_cache.mask.all()
    torch.testing.assert_close(out.slow_cache.tokens[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_the_hosts_plus_the_cross_attention(family):
    assert_hosts_weights_plus_cross_attention(*host_and_slowfast(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_save_and_reload(family, tmp_path):
    host = tiny_host(family, seed=4)
    host.save_pretrained(tmp_path / "host")
    # The host processors need torchvision (not installed here) to load.
    model = convert_host(
        tmp_path / "host", tmp_path / "slowfast", save_processor=False, attn_implementation="sdpa", **KNOBS
    )
    torch.manual_seed(0)
    video = torch.randn(1, FRAMES, 3, 32, 32)
    ids = torch.tensor([prompt(family)])
    with torch.no_grad():
        expected = host(input_ids=ids, pixel_values_videos=video[:, FAST_INDEX]).logits
        torch.testing.assert_close(model(input_ids=ids, pixel_values_videos=video).logits, expected)

    assert_reloads_identically(
        model, tmp_path / "slowfast", dict(input_ids=ids, pixel_values_videos=video), FRAMES, FAST
    )


def test_generation_carries_the_slow_cache_and_projects_it_once(monkeypatch):
    _, model = host_and_slowfast("onevision", seed=5)
    open_gates(model)
    torch.manual_seed(0)
    video = torch.randn(1, FRAMES, 3, 32, 32)
    ids = torch.tensor([prompt("onevision")])
    projected_layers = []
    project_slow = HybridAttention.project_slow

    def counting(self, tokens, *args):
        projected_layers.append(self.layer_idx)
        return project_slow(self, tokens, *args)

    monkeypatch.setattr(HybridAttention, "project_slow", counting)
    generate = dict(input_ids=ids, pixel_values_videos=video, max_new_tokens=6, do_sample=False)
    cached = model.generate(**generate)
    assert projected_layers == [0, 2]  # once per hybrid layer for the whole request
    # Reference: no cache at all, every step re-encodes the video and re-reads the whole sequence.
    assert torch.equal(cached, model.generate(**generate, use_cache=False))


def test_padded_batch_rows_get_their_own_slow_tokens():
    _, model = host_and_slowfast("next_video", seed=6)
    open_gates(model)
    torch.manual_seed(0)
    videos = torch.randn(2, FRAMES, 3, 32, 32)
    rows = [prompt("next_video"), [11, 12, 13, 14], prompt("next_video", before=(2,), after=(8,))]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        batch = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=videos).logits
        for i, video in ((0, videos[:1]), (1, None), (2, videos[1:])):
            alone = model(input_ids=torch.tensor([rows[i]]), pixel_values_videos=video).logits
            torch.testing.assert_close(batch[i, : len(rows[i])], alone[0], rtol=1e-4, atol=1e-5)


def test_images_next_to_a_video_stay_the_hosts():
    host, model = host_and_slowfast("onevision", seed=7)
    torch.manual_seed(0)
    image, image_sizes = torch.randn(1, 2, 3, 32, 32), torch.tensor([[32, 32]])  # base + one anyres patch
    # 4x4 base grid + 4x4 patch grid with a newline after each of its 4 rows
    ids = torch.tensor([[1, *[IMAGE_TOKEN_ID] * 36, 2, *prompt("onevision")]])
    video = torch.randn(1, FRAMES, 3, 32, 32)
    images = dict(pixel_values=image, image_sizes=image_sizes)
    with torch.no_grad():
        expected = host(input_ids=ids, pixel_values_videos=video[:, FAST_INDEX], **images).logits
        torch.testing.assert_close(model(input_ids=ids, pixel_values_videos=video, **images).logits, expected)


def test_stage1_trains_only_the_new_parameters():
    _, model = host_and_slowfast("onevision", seed=8)
    torch.manual_seed(0)
    inputs = dict(
        input_ids=torch.tensor([prompt("onevision")]), pixel_values_videos=torch.randn(1, FRAMES, 3, 32, 32)
    )
    assert_stage1_trains_only_new_parameters(model, inputs, VIDEO_TOKEN_ID)


@pytest.mark.parametrize(
    ("processor_class", "host_class", "attributes", "tokens_per_frame", "extra"),
    [
        (SlowFastLlavaOnevisionProcessor, LlavaOnevisionProcessor, {"num_image_tokens": 16}, 4, 1),
        (SlowFastLlavaNextVideoProcessor, LlavaNextVideoProcessor, {"patch_size": 8}, 4, 0),
    ],
)
def test_processor_expands_video_for_the_fast_frames(
    processor_class, host_class, attributes, tokens_per_frame, extra
):
    # The host processors need torchvision's video processor to be built; their `<video>` expansion
    # (`replace_video_token`) only needs these attributes.
    host = object.__new__(host_class)
    vars(host).update(video_token="<video>", **attributes)
    processor = processor_from_host(host, SlowFastLlavaOnevisionConfig(**KNOBS))
    assert type(processor) is processor_class and processor.fast_frames == FAST

    video = torch.zeros(FRAMES, 3, 32, 32)
    for frames in (video, list(video)):
        expansion = processor.replace_video_token({"pixel_values_videos": [frames]}, 0)
        assert expansion == "<video>" * (FAST * tokens_per_frame + extra)
        # What the host itself writes for the fast frames alone.
        assert expansion == host_class.replace_video_token(
            processor, {"pixel_values_videos": [video[FAST_INDEX]]}, 0
        )


def test_errors_name_the_problem(tmp_path):
    host, model = host_and_slowfast("onevision")
    video = torch.randn(1, FRAMES, 3, 32, 32)
    with pytest.raises(ValueError, match="<video> tokens"):
        model(input_ids=torch.tensor([[3, *[VIDEO_TOKEN_ID] * 8 * 4, 5]]), pixel_values_videos=video)
    with pytest.raises(ValueError, match="pixel_values_videos must be"):
        model(input_ids=torch.tensor([prompt("onevision")]), pixel_values_videos=list(video))
    with pytest.raises(ValueError, match="fast_frames=9 is more than frames=8"):
        from_host(copy.deepcopy(host), frames=8, fast_frames=9)
    with pytest.raises(ValueError, match="hybrid_max_depth"):
        from_host(copy.deepcopy(host), hybrid_max_depth=9)
    with pytest.raises(TypeError, match="unknown options"):
        from_host(copy.deepcopy(host), dtype=torch.float16)
    with pytest.raises(TypeError, match="got Qwen2ForCausalLM"):
        from_host(Qwen2ForCausalLM(host.config.text_config))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'slowfast_llava_onevision' checkpoint"):
        from_host(tmp_path)
    tokenizer = tiny_tokenizer()
    with pytest.raises(TypeError, match=f"got {type(tokenizer).__name__}"):
        processor_from_host(tokenizer, model.config)
    unset = object.__new__(SlowFastLlavaOnevisionProcessor)
    with pytest.raises(ValueError, match="fast_frames is not set"):
        unset.replace_video_token({"pixel_values_videos": [video[0]]}, 0)


def test_convert_cli_from_host(tmp_path):
    from slowfast_vlm.cli import main

    host = tiny_host("onevision", seed=6)
    host.save_pretrained(tmp_path / "host")
    args = ["convert", "--from-host", str(tmp_path / "host"), str(tmp_path / "out"), "--no-processor"]
    args += [
        "--frames",
        "12",
        "--fast-frames",
        "3",
        "--hybrid-every-n-layers",
        "2",
        "--video-pooling-stride",
        "2",
    ]
    assert main(args) == 0
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert (reloaded.config.frames, reloaded.config.fast_frames, reloaded.config.video_pooling_stride) == (
        12,
        3,
        2,
    )
    hybrid = [m for m in reloaded.modules() if isinstance(m, HybridAttention)]
    assert len(hybrid) == len(range(0, host.config.text_config.num_hidden_layers, 2))
    assert main(["convert", "--from-host", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_hosts_take_every_slow_branch_knob_and_record_attention(family):
    """The knobs are `SlowBranchConfig`'s, as for the native model: an explicit layer list, an open gate
    at init; and the hosts record the cross-attention for attention maps."""
    _, model = host_and_slowfast(family, seed=4, hybrid_layers=[1, 3], cross_attn_gate_init=0.5)
    layers = model.model.language_model.layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, HybridAttention)] == [1, 3]
    assert [layer.cross_attn_warm_up_gate.item() for layer in model.hybrid_attentions] == [0.5, 0.5]
    torch.manual_seed(0)
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor([prompt(family)]),
            pixel_values_videos=torch.randn(1, FRAMES, 3, 32, 32),
            record_slow_attention=True,
        )
    attention = output.slow_cache.attention_map()  # (B, hybrid layers, H, N)
    slow_tokens = FRAMES * 4 * 4  # every frame's 4 x 4 grid, unpooled by default
    assert attention.shape == (1, 2, 4, slow_tokens)
    # each query's probabilities over the slow tokens sum to 1, so their average does too
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 2, 4))
