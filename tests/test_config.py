import pytest
from helpers import tiny_config

from slowfast_vlm import SlowFastConfig
from slowfast_vlm.named_configs import NAMED_CONFIGS


def test_published_defaults():
    """Section 3 of docs/architecture.md: the released 64-frame checkpoint's values are the defaults."""
    config = SlowFastConfig()
    assert config.projector_type == "mlp2x_gelu"
    assert (config.video_pooling_stride, config.fast_temporal_sampling_stride) == (2, 1)
    assert (config.fast_temporal_pooling_stride, config.fast_spatial_pooling_stride) == (4, 1)
    assert (config.min_fast_frames, config.hybrid_every_n_layers, config.hybrid_min_depth) == (16, 8, 0)
    assert config.hybrid_max_depth is None
    assert (config.cross_attn_queries, config.mask_system_tokens, config.gate_type) == (
        "text",
        False,
        "tanh-warmup",
    )
    assert config.init_cross_kv_from_lm and config.generated_tokens_see_slow


def test_hybrid_layers_of_a_28_layer_llm():
    """Every 8 of Qwen2-7B's 28 layers: 0, 8, 16, 24 (architecture 1.5)."""
    config = SlowFastConfig(text_config={"model_type": "qwen2", "num_hidden_layers": 28})
    assert config.hybrid_layer_indices == [0, 8, 16, 24]
    limited = SlowFastConfig(
        text_config={"model_type": "qwen2", "num_hidden_layers": 28}, hybrid_min_depth=2, hybrid_max_depth=20
    )
    assert limited.hybrid_layer_indices == [2, 10, 18]
    explicit = SlowFastConfig(
        text_config={"model_type": "qwen2", "num_hidden_layers": 28}, hybrid_layers=[3, 1]
    )
    assert explicit.hybrid_layer_indices == [1, 3]


def test_no_hybrid_layers_is_the_plain_video_llm():
    import torch
    from helpers import VIDEO_TOKEN_ID, tiny_model

    model = tiny_model(hybrid_layers=[])
    assert model.hybrid_attentions == []
    ids = torch.tensor([[1] + [VIDEO_TOKEN_ID] * 8 + [2]])
    assert model(input_ids=ids, pixel_values_videos=torch.randn(1, 4, 3, 32, 32)).logits.shape == (1, 10, 128)


@pytest.mark.parametrize(
    "field,value",
    [
        ("video_pooling_stride", 0),
        ("fast_temporal_pooling_stride", -1),
        ("fast_spatial_pooling_stride", 0),
        ("fast_temporal_sampling_stride", 0),
        ("min_fast_frames", 0),
        ("hybrid_every_n_layers", 0),
        ("gate_type", "sigmoid"),
        ("cross_attn_queries", "vision"),
        ("projector_type", "mlp2x_relu"),
        ("hybrid_min_depth", 4),
        ("hybrid_max_depth", 9),
        ("hybrid_layers", [0, 4]),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_round_trip(tmp_path):
    config = tiny_config(fast_temporal_pooling_stride=6, mask_system_tokens=True)
    config.save_pretrained(tmp_path)
    loaded = SlowFastConfig.from_pretrained(tmp_path)
    assert loaded.fast_temporal_pooling_stride == 6 and loaded.mask_system_tokens
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.vision_config.model_type == "siglip_vision_model"


# ----- named configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_every_named_config_builds(name):
    config = SlowFastConfig.from_name(name)
    assert isinstance(config, SlowFastConfig)
    assert config.hybrid_layer_indices  # every named model has a slow branch


def test_named_config_families():
    config = SlowFastConfig.from_name("tiny-llama-clip")
    assert (config.text_config.model_type, config.vision_config.model_type) == ("llama", "clip_vision_model")
    assert (
        SlowFastConfig.from_name("tiny").to_dict() == SlowFastConfig.from_name("tiny-qwen2-siglip").to_dict()
    )
    assert SlowFastConfig.from_name("tiny-qwen3-convnext").text_config.head_dim == 16


def test_from_name_overrides_knobs_and_sub_config_fields():
    config = SlowFastConfig.from_name(
        "tiny",
        text_config={"vocab_size": 400, "num_hidden_layers": 6},
        vision_config={"image_size": 64},
        hybrid_layers=[1, 5],
        video_token_id=398,
    )
    assert (config.text_config.vocab_size, config.text_config.num_hidden_layers) == (400, 6)
    assert config.text_config.hidden_size == 64  # fields not overridden keep the named values
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (64, 8)
    assert (config.hybrid_layer_indices, config.video_token_id, config.image_token_id) == ([1, 5], 398, 127)
    # the table is left as it was, and the overrides are validated
    assert SlowFastConfig.from_name("tiny").text_config.vocab_size == 128
    with pytest.raises(ValueError, match="hybrid_layers"):
        SlowFastConfig.from_name("tiny", hybrid_layers=[4])


def test_from_name_configs_do_not_share_state():
    first = SlowFastConfig.from_name("reference-7b")
    first.vision_config.depths.append(1)
    assert SlowFastConfig.from_name("reference-7b").vision_config.depths == [3, 4, 30, 3]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'tiny-gpt2-siglip'") as error:
        SlowFastConfig.from_name("tiny-gpt2-siglip")
    assert all(name in str(error.value) for name in ("tiny", "scratch", "bench-scaled", "reference-7b-s2t4"))


def test_reference_7b_is_the_published_geometry():
    """Qwen2-7B-Instruct + ConvNeXt-XXL CLIP at 576 px, hybrid layers every 8 of 28 (architecture 1.5)."""
    config = SlowFastConfig.from_name("reference-7b")
    text, vision = config.text_config, config.vision_config
    assert text.model_type == "qwen2"
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.intermediate_size,
        text.vocab_size,
    ) == (3584, 28, 28, 4, 18944, 152064)
    assert vision.model_type == "convnext"
    assert (vision.depths, vision.hidden_sizes, vision.image_size) == (
        [3, 4, 30, 3],
        [384, 768, 1536, 3072],
        576,
    )
    assert config.hybrid_layer_indices == [0, 8, 16, 24]
    assert (config.fast_temporal_sampling_stride, config.fast_temporal_pooling_stride) == (1, 4)
    assert SlowFastConfig.from_name("reference-7b-s1t4").to_dict() == config.to_dict()
    s1t6, s2t4 = SlowFastConfig.from_name("reference-7b-s1t6"), SlowFastConfig.from_name("reference-7b-s2t4")
    assert (s1t6.fast_temporal_sampling_stride, s1t6.fast_temporal_pooling_stride) == (1, 6)
    assert (s2t4.fast_temporal_sampling_stride, s2t4.fast_temporal_pooling_stride) == (2, 4)
    assert s2t4.text_config.to_dict() == text.to_dict()
