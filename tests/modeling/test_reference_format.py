"""The reference checkpoint format (`modeling/reference_format.py`): weight names, the fused key/value
layout, config knobs, tower resolution, shards, dtypes, errors; `from_pretrained` reading it directly."""

import socket

import huggingface_hub
import pytest
import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_model
from reference_helpers import (
    expected_weights,
    load,
    original_model,
    per_head_kv,
    reference_config,
    reference_state_dict,
    video_logits,
    vision_config_for,
    write_reference,
)
from transformers import CLIPConfig, CLIPVisionConfig

from slowfast_vlm import SlowFastForConditionalGeneration
from slowfast_vlm.modeling.reference_format import (
    convert_reference_config,
    convert_reference_state_dict,
    is_reference_checkpoint,
)
from slowfast_vlm.modeling.vision import vision_grid


@pytest.mark.parametrize("vision", ["siglip", "clip", "convnext"])
def test_reference_weights_map_back_to_the_original(vision):
    original = original_model(vision)
    state = reference_state_dict(original, vision)
    config = convert_reference_config(
        reference_config(original, vision), vision_config_for(vision), {k: v.shape for k, v in state.items()}
    )
    converted = convert_reference_state_dict(state, config, *expected_weights(config))
    expected = original.state_dict()
    assert set(converted) == set(expected)
    for name, value in expected.items():
        assert torch.equal(converted[name], value), name
    # the tower's sizes come from its weights (and, for the CNN, the input size from its name)
    for field in (
        "image_size",
        "patch_size",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "hidden_sizes",
        "depths",
    ):
        assert getattr(config.vision_config, field, None) == getattr(
            original.config.vision_config, field, None
        ), field


@pytest.mark.parametrize("vision", ["siglip", "clip", "convnext"])
def test_converted_model_gives_the_original_logits(tmp_path, vision):
    original = original_model(vision)
    model = load(write_reference(tmp_path, original, vision), vision)
    assert isinstance(model, SlowFastForConditionalGeneration) and not model.training
    assert model.config.vision_config.model_type == original.config.vision_config.model_type
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)


def test_from_pretrained_accepts_the_reference_format(tmp_path):
    original = original_model("convnext", seed=4)
    model = SlowFastForConditionalGeneration.from_pretrained(
        write_reference(tmp_path, original, "convnext"), dtype=torch.float32
    )
    model.config.video_token_id = VIDEO_TOKEN_ID
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)


def test_cross_attention_keys_and_values_follow_the_per_head_layout(tmp_path):
    original = original_model("convnext", seed=3)
    model = load(write_reference(tmp_path, original, "convnext"), "convnext")
    slow = torch.randn(2, 5, model.config.text_config.hidden_size)
    for layer, (key_w, value_w, key_b, value_b) in zip(
        model.hybrid_attentions, per_head_kv(original, seed=3)
    ):
        norm = layer.slow_norm
        normed = slow * torch.rsqrt(slow.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        key, value = layer.project_slow(slow)  # (B, kv_heads, N, head_dim)
        for h in range(key_w.shape[0]):
            torch.testing.assert_close(key[:, h], normed @ key_w[h].T + key_b[h])
            torch.testing.assert_close(value[:, h], normed @ value_w[h].T + value_b[h])


def test_siglip_vision_model_prefix_and_a_tower_without_head(tmp_path):
    original = original_model("siglip")
    state = reference_state_dict(original, "siglip")
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in state
    headless = {k: v for k, v in state.items() if ".vision_model.head." not in k}
    model = load(write_reference(tmp_path, original, "siglip", state=headless), "siglip")
    assert model.config.vision_config.vision_use_head is False
    torch.testing.assert_close(
        model.model.vision_tower.encoder.layers[1].mlp.fc2.weight,
        original.model.vision_tower.encoder.layers[1].mlp.fc2.weight,
    )
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)


def test_config_knobs():
    model = tiny_model(vision="siglip")
    shapes = {k: v.shape for k, v in reference_state_dict(model, "siglip").items()}
    vision = vision_config_for("siglip")

    def convert(**overrides):
        return convert_reference_config(reference_config(model, "siglip", **overrides), vision, shapes)

    config = convert(
        fast_token_spatial_stride=2,
        fast_token_temporal_stride=6,
        fast_token_temporal_sampling_stride=3,
        mm_video_pooling_stride=1,
        min_fast_frames=None,
        cross_attn_every_n_layers=3,
        cross_attn_min_layer_depth=1,
        cross_attn_max_layer_depth=None,
        mm_vision_select_layer=-2,
    )
    assert (
        config.fast_spatial_pooling_stride,
        config.fast_temporal_pooling_stride,
        config.fast_temporal_sampling_stride,
        config.video_pooling_stride,
        config.min_fast_frames,  # the reference's default when unset
    ) == (2, 6, 3, 1, 1)
    assert config.hybrid_layer_indices == [1]
    assert config.vision_feature_layer == -2
    assert config.gate_type == "tanh-warmup"
    assert (config.cross_attn_queries, config.mask_system_tokens) == ("text", False)
    masked = convert(cross_attn_implementation="text-only-vanilla-flashattn-masksystem")
    assert (masked.cross_attn_queries, masked.mask_system_tokens) == ("text", True)
    every_token = convert(cross_attn_implementation="vanilla-flashattn")
    assert (every_token.cross_attn_queries, every_token.mask_system_tokens) == ("all", False)
    text = config.text_config
    assert (
        text.model_type,
        text.hidden_size,
        text.num_key_value_heads,
        text.rope_parameters["rope_theta"],
    ) == (
        "qwen2",
        64,
        2,
        model.config.text_config.rope_parameters["rope_theta"],
    )
    assert not hasattr(text, "mm_vision_tower")
    # the ConvNeXt tower always gives its last stage, whatever mm_vision_select_layer says
    convnext = tiny_model(vision="convnext")
    convnext_shapes = {k: v.shape for k, v in reference_state_dict(convnext, "convnext").items()}
    cnn = convert_reference_config(
        reference_config(convnext, "convnext", mm_vision_select_layer=-2), None, convnext_shapes
    )
    assert cnn.vision_feature_layer == -1


def test_vanilla_warm_up_gate_is_not_squashed(tmp_path):
    # The reference's all-token ("vanilla") path multiplies by the raw gate w, ours by tanh(w).
    original = original_model("convnext", seed=4, cross_attn_queries="all")
    open_gates(original, 0.6)
    state = reference_state_dict(original, "convnext")
    gates = [k for k in state if k.endswith("cross_attn_warm_up_gate")]
    for key in gates:
        state[key] = torch.tanh(torch.tensor(0.6))
    directory = write_reference(
        tmp_path / "ok", original, "convnext", state=state, cross_attn_implementation="vanilla-flashattn"
    )
    model = load(directory, "convnext")
    assert model.config.cross_attn_queries == "all"
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)

    state[gates[0]] = torch.tensor(1.5)
    directory = write_reference(
        tmp_path / "bad", original, "convnext", state=state, cross_attn_implementation="vanilla-flashattn"
    )
    with pytest.raises(ValueError, match="warm-up gate 1.5000"):
        load(directory, "convnext")


@pytest.mark.parametrize("layout", [dict(shards=3), dict(fmt="bin")])
def test_sharded_and_bin_checkpoints(tmp_path, layout):
    original = original_model("clip", seed=2)
    directory = write_reference(tmp_path, original, "clip", **layout)
    assert is_reference_checkpoint(directory)
    torch.testing.assert_close(
        video_logits(load(directory, "clip")), video_logits(original), rtol=0, atol=1e-6
    )


def test_dtype_and_buffers_as_from_pretrained(tmp_path):
    original = original_model("siglip", seed=5)
    original.save_pretrained(tmp_path / "ours")
    directory = write_reference(tmp_path / "reference", original, "siglip", torch_dtype="bfloat16")
    model = SlowFastForConditionalGeneration.from_reference_checkpoint(
        directory, vision_config={"num_attention_heads": 2}
    )  # dtype from config.json
    model.config.video_token_id = VIDEO_TOKEN_ID
    standard = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(video_logits(model), video_logits(standard))
    # without a dtype in config.json: the weights' own
    directory = write_reference(tmp_path / "fp16", original.to(torch.float16), "siglip", torch_dtype=None)
    assert (
        SlowFastForConditionalGeneration.from_reference_checkpoint(
            directory, vision_config={"num_attention_heads": 2}
        ).dtype
        == torch.float16
    )


def test_vision_config_forms(tmp_path):
    model = tiny_model(vision="clip")
    shapes = {k: v.shape for k, v in reference_state_dict(model, "clip").items()}
    tower = CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "layer_norm_eps": 1e-3})
    tower.save_pretrained(tmp_path / "tower")
    specs = [
        tmp_path / "tower",  # a model directory
        str(tmp_path / "tower" / "config.json"),
        CLIPConfig(vision_config=tower.to_dict()),  # a full CLIP config gives its vision part
        '{"num_attention_heads": 2, "layer_norm_eps": 0.001}',  # fields over those from the weights
    ]
    for spec in specs:
        vision = convert_reference_config(reference_config(model, "clip"), spec, shapes).vision_config
        assert (vision.model_type, vision.num_attention_heads, vision.layer_norm_eps) == (
            "clip_vision_model",
            2,
            1e-3,
        )
        assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size) == (32, 2, 32)
    with pytest.raises(ValueError, match="is neither a JSON object"):
        convert_reference_config(reference_config(model, "clip"), str(tmp_path / "nowhere"), shapes)


def test_errors_name_the_problem(tmp_path):
    model = tiny_model(vision="siglip")
    config = reference_config(model, "siglip")
    state = reference_state_dict(model, "siglip")
    shapes = {k: v.shape for k, v in state.items()}
    with pytest.raises(ValueError, match="'whole-dynamic-sigmoid'"):
        convert_reference_config(
            {**config, "cross_attn_gating_type": "whole-dynamic-sigmoid"}, {"num_attention_heads": 2}, shapes
        )
    with pytest.raises(ValueError, match="'cross-only'"):
        convert_reference_config(
            {**config, "cross_attn_implementation": "cross-only"}, {"num_attention_heads": 2}, shapes
        )
    with pytest.raises(ValueError, match=r"needs \['num_attention_heads'\]"):
        convert_reference_config(config, None, shapes)
    with pytest.raises(ValueError, match=r"lacks \['fast_token_temporal_stride'\]"):
        convert_reference_config(
            {k: v for k, v in config.items() if k != "fast_token_temporal_stride"}, None, shapes
        )

    converted = convert_reference_config(config, {"num_attention_heads": 2}, shapes)
    with pytest.raises(
        ValueError, match=r"1 missing weights: model\.language_model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        convert_reference_state_dict(
            {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
            converted,
            *expected_weights(converted),
        )
    with pytest.raises(ValueError, match=r"1 unexpected weights: model\.image_newline"):
        convert_reference_state_dict(
            {**state, "model.image_newline": torch.zeros(64)}, converted, *expected_weights(converted)
        )
    with pytest.raises(ValueError, match=r"wrong shape: model\.mm_projector\.2\.weight \(64, 32\)"):
        convert_reference_state_dict(
            {**state, "model.mm_projector.2.weight": torch.zeros(64, 32)},
            converted,
            *expected_weights(converted),
        )
    towerless = {k: v for k, v in state.items() if "vision_tower" not in k}
    with pytest.raises(ValueError, match="no weights for the vision tower"):
        towerless_config = convert_reference_config(config, model.config.vision_config, shapes)
        convert_reference_state_dict(towerless, towerless_config, *expected_weights(towerless_config))

    assert not is_reference_checkpoint(tmp_path / "nothing-here")
    model.save_pretrained(tmp_path / "ours")
    assert not is_reference_checkpoint(tmp_path / "ours")
    assert not is_reference_checkpoint(None)


def test_tower_named_by_a_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    # a hub cache entry as huggingface_hub lays it out, holding a full CLIP config (its vision part is used)
    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--clip-tower" / "snapshots" / revision
    original = original_model("clip", seed=8)
    CLIPConfig(vision_config=original.config.vision_config.to_dict()).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import
    # online mode, with every network access recorded (and failing): the cache must do without any
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    connections = []

    def no_network(*args, **kwargs):
        connections.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    directory = write_reference(
        tmp_path / "reference", original, "clip", mm_vision_tower="tiny-org/clip-tower"
    )
    model = SlowFastForConditionalGeneration.from_reference_checkpoint(directory, dtype=torch.float32)
    model.config.video_token_id = VIDEO_TOKEN_ID
    assert (model.config.vision_config.model_type, model.config.vision_config.num_attention_heads) == (
        "clip_vision_model",
        2,
    )
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)
    # a hub id that is not in the cache is not downloaded: its fields stay missing
    shapes = {k: v.shape for k, v in reference_state_dict(original, "clip").items()}
    elsewhere = reference_config(original, "clip", mm_vision_tower="tiny-org/elsewhere")
    with pytest.raises(ValueError, match=r"needs \['num_attention_heads'\]"):
        convert_reference_config(elsewhere, None, shapes)
    assert connections == []


def test_known_towers_give_the_released_convnext_xxl():
    model = tiny_model(vision="convnext")
    for overrides in (
        dict(mm_vision_tower="convnext-576"),  # the released checkpoints' name
        dict(mm_vision_tower="convnext_xxlarge.clip_laion2b_soup", input_image_size=576),
    ):
        config = convert_reference_config(reference_config(model, "convnext", **overrides))
        vision = config.vision_config
        geometry = (
            vision.model_type,
            vision.depths,
            vision.hidden_sizes,
            vision.patch_size,
            vision.image_size,
        )
        assert geometry == ("convnext", [3, 4, 30, 3], [384, 768, 1536, 3072], 4, 576)
        assert vision_grid(vision) == (18, 18)
        assert config.vision_norm_eps == vision.layer_norm_eps == 1e-5
    # the weights' sizes still win over the table's, and vision_config over both
    shapes = {k: v.shape for k, v in reference_state_dict(model, "convnext").items()}
    named = reference_config(model, "convnext", mm_vision_tower="convnext-576")
    vision = convert_reference_config(named, None, shapes).vision_config
    assert (vision.hidden_sizes, vision.depths, vision.image_size) == ([8, 16], [1, 1], 576)
    vision = convert_reference_config(named, {"image_size": 64}, shapes).vision_config
    assert vision.image_size == 64


def test_unresolvable_tower_names_ask_for_the_vision_config():
    model = tiny_model(vision="convnext")
    for name, missing in (
        ("convnext_xxlarge.clip_laion2b_soup", r"\['image_size'\]"),  # a known tower, but no input size
        ("my-org/convnext-tower", r"\['hidden_sizes', 'depths', 'num_stages', 'image_size', 'patch_size'\]"),
    ):
        with pytest.raises(ValueError, match=missing) as error:
            convert_reference_config(reference_config(model, "convnext", mm_vision_tower=name))
        assert "pass vision_config" in str(error.value)
    with pytest.raises(
        ValueError, match="neither a local model directory, a model in the local Hugging Face"
    ):
        convert_reference_config(reference_config(model, "convnext", mm_vision_tower="my-org/convnext-tower"))


# ----- the ConvNeXt tower computes what the reference's timm tower computes ---------------------------
# (pattern of a timm tower weight name, scale of its random values), first match wins; LayerNorm weights are
# centred on 1. Tiny stem and depthwise convolutions, and a small first-stage residual stream (the
# downsampling LayerNorm's input), give every LayerNorm an input variance below eps, so that each one's eps
# shows in the features.
