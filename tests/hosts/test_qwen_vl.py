"""Plug and play: the slow branch on tiny random Qwen2.5-VL and Qwen3-VL hosts (flattened patches,
multimodal RoPE; Qwen3-VL: per-frame timestamps in the text, deepstack features)."""

import copy
import re

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
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from slowfast_vlm.compute import host_estimate
from slowfast_vlm.hosts import convert_host, from_host, processor_from_host
from slowfast_vlm.hosts.qwen2_5_vl import (
    SlowFastQwen2_5_VLProcessor,
    fast_temporal_patches,
    text_inputs,
    video_inputs,
)
from slowfast_vlm.hosts.qwen3_vl import SlowFastQwen3VLProcessor

VIDEO, IMAGE, START, END = 298, 299, 296, 297
FRAMES, FAST = 16, 8  # 8 temporal patches (frame pairs), 4 of them fast
FAST_PATCHES = [0, 2, 4, 7]  # np.linspace(0, 7, 4) truncated
FAST_FRAMES = [f for patch in FAST_PATCHES for f in (2 * patch, 2 * patch + 1)]
SLOW_ONLY_FRAME = 3  # in temporal patch 1
SIZE = 32  # 32 x 32 frames: 8 x 8 patches of 4 px, merged 2 x 2 -> 16 tokens per temporal patch
FAST_TOKENS = len(FAST_PATCHES) * 16
KNOBS = dict(frames=FRAMES, fast_frames=FAST, hybrid_every_n_layers=2)
PIXELS = dict(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)  # keep the frames at 32 x 32


FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
TEXT = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=300,
)
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=4)
TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def tiny_host(family: str = "qwen2_5_vl", seed: int = 0):
    """A random 4-layer, 64-wide LLM (head_dim 16, mrope sections 2/3/3) with a 2-block vision tower of
    4 px patches: Qwen2.5-VL with window attention in block 0 and full attention in block 1; Qwen3-VL
    with interleaved mrope, learned position embeddings and deepstack features from block 0."""
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_parameters": ROPE},
            vision_config={**VISION, "window_size": 16, "fullatt_block_indexes": [1], "tokens_per_second": 2},
            **TOKENS,
        )
        host_class = Qwen2_5_VLForConditionalGeneration
    else:
        config = Qwen3VLConfig(
            text_config={**TEXT, "rope_parameters": {**ROPE, "mrope_interleaved": True}},
            vision_config={**VISION, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
            **TOKENS,
        )
        host_class = Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    return host_class._from_config(config, attn_implementation="sdpa").eval()


def host_and_slowfast(family: str = "qwen2_5_vl", seed: int = 0, **knobs):
    host = tiny_host(family, seed)
    return host, from_host(copy.deepcopy(host), **{**KNOBS, **knobs})


def frames_in(videos: list[torch.Tensor], family: str) -> dict:
    """`video_inputs` at 2 fps with the family's normalisation (Qwen3-VL: 0.5; its grids carry no time)."""
    normalise = dict(mean=(0.5,) * 3, std=(0.5,) * 3) if family == "qwen3_vl" else {}
    inputs = video_inputs(videos, 2.0, tiny_host(family).config.vision_config, **PIXELS, **normalise)
    if family == "qwen3_vl":
        inputs.pop("second_per_grid_ts")
    return inputs


def random_videos(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
        for _ in range(count)
    ]


def host_fast_inputs(videos: list[torch.Tensor], family: str) -> dict:
    """What the host is given for the fast frames alone: their patches and grid (Qwen2.5-VL: and the fast
    patches' spacing in time, 7/3 temporal patches apart on average; Qwen3-VL dates them in the text)."""
    inputs = frames_in([v[FAST_FRAMES] for v in videos], family)
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = inputs["second_per_grid_ts"] * 7 / 3
    return inputs


def prompt(family: str, before=(3, 4), after=(5, 6, 7)) -> list[int]:
    """Qwen2.5-VL: one run of the fast tokens; Qwen3-VL: per fast temporal patch a time (token 8), then
    its 16 tokens between vision start and end."""
    if family == "qwen2_5_vl":
        return [*before, START, *[VIDEO] * FAST_TOKENS, END, *after]
    per_patch = [8, START, *[VIDEO] * 16, END]
    return [*before, *per_patch * len(FAST_PATCHES), *after]


def batch(rows: list[list[int]]) -> dict:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=2 * (ids == VIDEO).int())


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_gates_equal_host_on_fast_frames(family, transformers_deprecations):
    host, model = host_and_slowfast(family, seed=1)
    videos = random_videos(2)
    text = batch([prompt(family), prompt(family, before=(9,))])  # left-padded, two prompt lengths
    all_frames = frames_in(videos, family)
    fast_frames = host_fast_inputs(videos, family)
    with torch.no_grad():
        expected = host(**text, **fast_frames).logits
        logits = model(**text, **all_frames).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_ids = host.generate(**text, **fast_frames, **generate)
    assert torch.equal(model.generate(**text, **all_frames, **generate), expected_ids)
    assert [m for m in transformers_deprecations if "deprecat" in m.lower() or "past_key_values" in m] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frame_only_the_slow_tokens_carry_matters_once_gates_open(family):
    _, model = host_and_slowfast(family, seed=2)
    (video,) = random_videos(1)
    changed = video.clone()
    changed[SLOW_ONLY_FRAME] = 255 - changed[SLOW_ONLY_FRAME]
    text = batch([prompt(family)])

    def logits(frames):
        with torch.no_grad():
            return model(**text, **frames_in([frames], family)).logits

    assert torch.equal(logits(video), logits(changed))  # gates closed: the host on the fast frames
    open_gates(model)
    is_text = text["input_ids"][0] != VIDEO
    assert ((logits(video) - logits(changed))[0, is_text].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_slow_tokens_are_every_temporal_patch_merged_and_pooled(family):
    host, model = host_and_slowfast(family, seed=3, video_pooling_stride=2, vision_frame_chunk_size=6)
    (video,) = random_videos(1)
    inputs = frames_in([video], family)
    with torch.no_grad():
        out = model(**batch([prompt(family)]), **inputs)
        # Reference: the host's own video features of all frames at once, 2 x 2 average-pooled per patch.
        (features,) = host.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]
        ).pooler_output
        grids = features.reshape(FRAMES // 2, 4, 4, -1).permute(0, 3, 1, 2)
        expected = F.avg_pool2d(grids, 2).flatten(2).transpose(1, 2).reshape(-1, grids.shape[1])
    assert out.slow_cache.tokens.shape == (1, FRAMES // 2 * 2 * 2, 64)
    torch.testing.assert_close(out.slow_cache.tokens[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_the_hosts_plus_the_cross_attention(family):
    assert_hosts_weights_plus_cross_attention(*host_and_slowfast(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_save_and_reload(family, tmp_path):
    host = tiny_host(family, seed=4)
    host.save_pretrained(tmp_path / "host")
    model = convert_host(
        tmp_path / "host", tmp_path / "slowfast", save_processor=False, attn_implementation="sdpa", **KNOBS
    )
    videos = random_videos(1, seed=4)
    text = batch([prompt(family)])
    inputs = frames_in(videos, family)
    with torch.no_grad():
        expected = host(**text, **host_fast_inputs(videos, family)).logits
        torch.testing.assert_close(model(**text, **inputs).logits, expected)

    assert_reloads_identically(model, tmp_path / "slowfast", {**text, **inputs}, FRAMES, FAST)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_trains_only_the_new_parameters(family):
    _, model = host_and_slowfast(family, seed=8)
    inputs = frames_in(random_videos(1), family)
    assert_stage1_trains_only_new_parameters(model, {**batch([prompt(family)]), **inputs}, VIDEO)


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


def test_qwen3_text_inputs_and_processor_date_the_fast_patches():
    tokenizer = tiny_tokenizer()
    pads = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": pads})
    _, model = host_and_slowfast("qwen3_vl")
    model.config.video_token_id, model.config.image_token_id = tokenizer.convert_tokens_to_ids(pads[:2])
    grid = torch.tensor([[FRAMES // 2, 8, 8]])
    metadata = VideoMetadata(total_num_frames=FRAMES, fps=2.0, frames_indices=list(range(FRAMES)))

    # The converted processor writes what the host writes for the fast frames alone: their pairs' times.
    host = object.__new__(Qwen3VLProcessor)
    vars(host).update(
        video_token=pads[0],
        vision_start_token=pads[2],
        vision_end_token=pads[3],
        video_processor=type("V", (), dict(merge_size=2, temporal_patch_size=2))(),
    )
    processor = processor_from_host(host, model.config)
    assert type(processor) is SlowFastQwen3VLProcessor
    expansion = processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    fast_metadata = VideoMetadata(total_num_frames=FRAMES, fps=2.0, frames_indices=FAST_FRAMES)
    fast_grid = torch.tensor([[len(FAST_PATCHES), 8, 8]])
    assert expansion == Qwen3VLProcessor.replace_video_token(
        processor, {"video_grid_thw": fast_grid, "video_metadata": [fast_metadata]}, 0
    )
    # fast pairs (0, 1), (4, 5), (8, 9), (14, 15) at 2 fps: 0.25, 2.25, 4.25, 7.25 s, written to 0.1 s
    assert re.findall(r"<([\d.]+) seconds>", expansion) == ["0.2", "2.2", "4.2", "7.2"]

    # `text_inputs` (no torchvision) writes the same tokens.
    inputs = text_inputs(tokenizer, [f"A cat {pads[0]} jumps"], grid, model.config, fps=2.0)
    expected = tokenizer(f"A cat {expansion} jumps", return_tensors="pt")["input_ids"]
    assert torch.equal(inputs["input_ids"], expected)
    assert torch.equal(inputs["mm_token_type_ids"], 2 * (expected == model.config.video_token_id).int())


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_counts_the_retrofitted_model(family):
    _, model = host_and_slowfast(family, video_pooling_stride=2)
    text = batch([prompt(family, before=range(3, 8), after=range(8, 11))])
    prompt_tokens = int((text["input_ids"] != VIDEO).sum())  # 10; Qwen3-VL: + 4 times, starts, ends
    record = host_estimate(model.config, frames=FRAMES, height=SIZE, width=SIZE, prompt_tokens=prompt_tokens)
    assert (record.fast_tokens, record.slow_tokens, record.hybrid_layers) == (FAST_TOKENS, 8 * 2 * 2, 2)
    assert record.parameters == sum(p.numel() for p in model.parameters())
    host = host_estimate(model.config, FRAMES, SIZE, SIZE, prompt_tokens, design="self-attention")
    assert host.sequence_length == prompt_tokens + 8 * 16
    # Qwen3-VL's host encodes the 4 fast temporal patches again (for its deepstack features)
    assert record.vision_flops * 8 == host.vision_flops * (12 if family == "qwen3_vl" else 8)

    # Reference: torch's FLOP counter on the model's prefill (the math SDPA backend, which it can see).
    open_gates(model)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**text, **frames_in(random_videos(1), family), logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(*names: str) -> int:
        return sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in names)

    # RoPE angles are elementwise by convention (some transformers releases compute them as a matmul).
    rope = flops("model.language_model.rotary_emb")
    assert flops("model.language_model", "lm_head") - rope == record.llm_prefill_flops
    assert (
        flops("model.language_model.layers.0.self_attn") - flops("model.language_model.layers.1.self_attn")
        == record.prefill_hybrid_flops // 2
    )
    assert flops("model.visual") == record.vision_flops
    assert flops("model.visual.merger", "model.visual.deepstack_merger_list.0") == record.projector_flops
    assert counter.get_total_flops() - rope == record.llm_prefill_flops + record.vision_flops


@pytest.mark.parametrize("bad", ["grid", "patches"])
def test_errors_name_the_problem(bad):
    _, model = host_and_slowfast()
    inputs = frames_in(random_videos(1), "qwen2_5_vl")
    if bad == "grid":
        inputs.pop("video_grid_thw")
    else:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:-1]
    with pytest.raises(ValueError, match="pixel_values_videos must be the"):
        model(**batch([prompt("qwen2_5_vl")]), **inputs)
