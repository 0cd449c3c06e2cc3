"""Plug and play: the slow branch on a tiny random Qwen2.5-VL host (flattened patches, multimodal RoPE)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_tokenizer
from host_checks import (
    assert_hosts_weights_plus_cross_attention,
    assert_reloads_identically,
    assert_stage1_trains_only_new_parameters,
    open_gates,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from slowfast_vlm.compute import host_estimate
from slowfast_vlm.hosts import convert_host, from_host, processor_from_host
from slowfast_vlm.hosts.qwen2_5_vl import (
    SlowFastQwen2_5_VLProcessor,
    fast_temporal_patches,
    text_inputs,
    video_inputs,
)

VIDEO, IMAGE, START, END = 298, 299, 296, 297
FRAMES, FAST = 16, 8  # 8 temporal patches (frame pairs), 4 of them fast
FAST_PATCHES = [0, 2, 4, 7]  # np.linspace(0, 7, 4) truncated
FAST_FRAMES = [f for patch in FAST_PATCHES for f in (2 * patch, 2 * patch + 1)]
SLOW_ONLY_FRAME = 3  # in temporal patch 1
SIZE = 32  # 32 x 32 frames: 8 x 8 patches of 4 px, merged 2 x 2 -> 16 tokens per temporal patch
FAST_TOKENS = len(FAST_PATCHES) * 16
KNOBS = dict(frames=FRAMES, fast_frames=FAST, hybrid_every_n_layers=2)
PIXELS = dict(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)  # keep the frames at 32 x 32


def tiny_host(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL: 4-layer, 64-wide LLM (head_dim 16, mrope sections 2/3/3), 2-block vision
    tower with 4 px patches, window attention in block 0 and full attention in block 1."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=300,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            patch_size=4,
            window_size=16,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def host_and_slowfast(seed: int = 0, **knobs):
    host = tiny_host(seed)
    return host, from_host(copy.deepcopy(host), **{**KNOBS, **knobs})


def random_videos(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
        for _ in range(count)
    ]


def host_fast_inputs(videos: list[torch.Tensor], fps: float = 2.0) -> dict:
    """What the host is given for the fast frames alone: their patches, grid, and the fast patches'
    spacing in time (7/3 temporal patches apart on average)."""
    inputs = video_inputs([v[FAST_FRAMES] for v in videos], fps, tiny_host().config.vision_config, **PIXELS)
    inputs["second_per_grid_ts"] = inputs["second_per_grid_ts"] * 7 / 3
    return inputs


def prompt(before=(3, 4), after=(5, 6, 7)) -> list[int]:
    return [*before, START, *[VIDEO] * FAST_TOKENS, END, *after]


def batch(rows: list[list[int]]) -> dict:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=2 * (ids == VIDEO).int())


def test_closed_gates_equal_host_on_fast_frames(transformers_deprecations):
    host, model = host_and_slowfast(seed=1)
    videos = random_videos(2)
    text = batch([prompt(), prompt(before=(9,))])  # left-padded, two prompt lengths
    all_frames = video_inputs(videos, 2.0, model.config.vision_config, **PIXELS)
    fast_frames = host_fast_inputs(videos)
    with torch.no_grad():
        expected = host(**text, **fast_frames).logits
        logits = model(**text, **all_frames).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_ids = host.generate(**text, **fast_frames, **generate)
    assert torch.equal(model.generate(**text, **all_frames, **generate), expected_ids)
    assert [m for m in transformers_deprecations if "deprecat" in m.lower() or "past_key_values" in m] == []


def test_a_frame_only_the_slow_tokens_carry_matters_once_gates_open():
    _, model = host_and_slowfast(seed=2)
    (video,) = random_videos(1)
    changed = video.clone()
    changed[SLOW_ONLY_FRAME] = 255 - changed[SLOW_ONLY_FRAME]
    text = batch([prompt()])

    def logits(frames):
        with torch.no_grad():
            return model(**text, **video_inputs([frames], 2.0, model.config.vision_config, **PIXELS)).logits

    assert torch.equal(logits(video), logits(changed))  # gates closed: the host on the fast frames
    open_gates(model)
    is_text = text["input_ids"][0] != VIDEO
    assert ((logits(video) - logits(changed))[0, is_text].abs().amax(-1) > 0).all()


def test_slow_tokens_are_every_temporal_patch_merged_and_pooled():
    host, model = host_and_slowfast(seed=3, video_pooling_stride=2, vision_frame_chunk_size=6)
    (video,) = random_videos(1)
    inputs = video_inputs([video], 2.0, model.config.vision_config, **PIXELS)
    with torch.no_grad():
        out = model(**batch([prompt()]), **inputs)
        # Reference: the host's own video features of all frames at once, 2 x 2 average-pooled per patch.
        (features,) = host.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]
        ).pooler_output
        grids = features.reshape(FRAMES // 2, 4, 4, -1).permute(0, 3, 1, 2)
        expected = F.avg_pool2d(grids, 2).flatten(2).transpose(1, 2).reshape(-1, grids.shape[1])
    assert out.slow_cache.tokens.shape == (1, FRAMES // 2 * 2 * 2, 64)
    torch.testing.assert_close(out.slow_cache.tokens[0], expected, rtol=1e-5, atol=1e-6)


def test_weights_are_the_hosts_plus_the_cross_attention():
    assert_hosts_weights_plus_cross_attention(*host_and_slowfast())


def test_convert_save_and_reload(tmp_path):
    host = tiny_host(seed=4)
    host.save_pretrained(tmp_path / "host")
    model = convert_host(
        tmp_path / "host", tmp_path / "slowfast", save_processor=False, attn_implementation="sdpa", **KNOBS
    )
    videos = random_videos(1, seed=4)
    text = batch([prompt()])
    inputs = video_inputs(videos, 2.0, model.config.vision_config, **PIXELS)
    with torch.no_grad():
        expected = host(**text, **host_fast_inputs(videos)).logits
        torch.testing.assert_close(model(**text, **inputs).logits, expected)

    assert_reloads_identically(model, tmp_path / "slowfast", {**text, **inputs}, FRAMES, FAST)


def test_stage1_trains_only_the_new_parameters():
    _, model = host_and_slowfast(seed=8)
    inputs = video_inputs(random_videos(1), 2.0, model.config.vision_config, **PIXELS)
    assert_stage1_trains_only_new_parameters(model, {**batch([prompt()]), **inputs}, VIDEO)


def test_video_inputs_follow_the_hosts_formulas():
    config = tiny_host().config
    frames = torch.randint(0, 256, (5, 40, 60, 3), dtype=torch.uint8)  # odd count, resized
    inputs = video_inputs([frames], 4.0, config.vision_config, min_pixels=16 * 16, max_pixels=32 * 48)
    height, width = smart_resize(40, 60, factor=8, min_pixels=16 * 16, max_pixels=32 * 48)
    assert inputs["video_grid_thw"].tolist() == [[3, height // 4, width // 4]]  # 5 frames padded to 6
    assert inputs["second_per_grid_ts"].tolist() == [0.5]  # temporal patch size 2 at 4 fps
    assert inputs["pixel_values_videos"].shape == (3 * height * width // 16, 3 * 2 * 4 * 4)

    # Normalisation and patch layout: a video of identical frame pairs is, pair by pair, what the host's
    # image processor (which repeats an image over the temporal patch) makes of each frame.
    still = torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8)
    video = video_inputs([still.repeat_interleave(2, 0)], 1.0, config.vision_config, min_pixels=1)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 1, "longest_edge": 10**6}
    )
    expected = image_processor(images=list(still.numpy()), return_tensors="pt")
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    assert video["video_grid_thw"].tolist() == [[2, 4, 6]]
    torch.testing.assert_close(video["pixel_values_videos"], expected["pixel_values"], rtol=1e-5, atol=1e-5)


def test_text_inputs_and_processor_expand_for_the_fast_frames():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video_pad|>", "<|image_pad|>"]})
    video_id, image_id = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    _, model = host_and_slowfast()
    model.config.video_token_id, model.config.image_token_id = video_id, image_id
    grid = torch.tensor([[FRAMES // 2, 8, 8], [3, 4, 8]])
    inputs = text_inputs(tokenizer, ["A cat <|video_pad|> jumps", "<|video_pad|>?"], grid, model.config)
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    # 4 fast patches x 16 tokens; 3 patches -> ceil(8 / 2) = 4 fast wanted, all 3 taken, x 8 tokens
    assert (ids == video_id).sum(1).tolist() == [FAST_TOKENS, 3 * 8]
    assert torch.equal(types, 2 * (ids == video_id).int())
    assert inputs["attention_mask"][1, 0] == 0  # left padding

    # The converted host processor writes the same expansion; the host itself, given the fast grid.
    host = object.__new__(Qwen2_5_VLProcessor)
    vars(host).update(
        video_token="<|video_pad|>",
        video_processor=type("V", (), dict(merge_size=2, temporal_patch_size=2))(),
    )
    processor = processor_from_host(host, model.config)
    assert type(processor) is SlowFastQwen2_5_VLProcessor
    for index, fast_count in ((0, FAST_TOKENS), (1, 3 * 8)):
        expansion = processor.replace_video_token({"video_grid_thw": grid}, index)
        fast_grid = grid.clone()
        fast_grid[:, 0] = torch.tensor([len(fast_temporal_patches(t, FAST, 2)) for t in grid[:, 0].tolist()])
        assert expansion == "<|video_pad|>" * fast_count
        assert expansion == Qwen2_5_VLProcessor.replace_video_token(
            processor, {"video_grid_thw": fast_grid}, index
        )


def test_compute_counts_the_retrofitted_model():
    _, model = host_and_slowfast(video_pooling_stride=2)
    record = host_estimate(model.config, frames=FRAMES, height=SIZE, width=SIZE, prompt_tokens=10)
    assert (record.fast_tokens, record.slow_tokens, record.hybrid_layers) == (FAST_TOKENS, 8 * 2 * 2, 2)
    assert record.parameters == sum(p.numel() for p in model.parameters())
    host = host_estimate(
        model.config, frames=FRAMES, height=SIZE, width=SIZE, prompt_tokens=10, design="self-attention"
    )
    assert (host.sequence_length, host.vision_flops) == (10 + 8 * 16, record.vision_flops)

    # Reference: torch's FLOP counter on the model's prefill (the math SDPA backend, which it can see).
    open_gates(model)
    text = batch([[*range(3, 8), START, *[VIDEO] * FAST_TOKENS, END, *range(8, 11)]])  # 10 text tokens
    inputs = video_inputs(random_videos(1), 2.0, model.config.vision_config, **PIXELS)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**text, **inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(*names: str) -> int:
        return sum(sum(counts[f"{root}.{name}"].values()) for name in names)

    # RoPE angles are elementwise by convention (transformers before 5.17 computes them as a matmul).
    rope = (
        flops("model.language_model.rotary_emb") if f"{root}.model.language_model.rotary_emb" in counts else 0
    )
    assert flops("model.language_model", "lm_head") - rope == record.llm_prefill_flops
    assert (
        flops("model.language_model.layers.0.self_attn") - flops("model.language_model.layers.1.self_attn")
        == record.prefill_hybrid_flops // 2
    )
    assert flops("model.visual") == record.vision_flops
    assert flops("model.visual.merger") == record.projector_flops
    assert counter.get_total_flops() - rope == record.llm_prefill_flops + record.vision_flops


@pytest.mark.parametrize("bad", ["grid", "patches"])
def test_errors_name_the_problem(bad):
    _, model = host_and_slowfast()
    inputs = video_inputs(random_videos(1), 2.0, model.config.vision_config, **PIXELS)
    if bad == "grid":
        inputs.pop("video_grid_thw")
    else:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:-1]
    with pytest.raises(ValueError, match="pixel_values_videos must be the"):
        model(**batch([prompt()]), **inputs)
