import pytest
from helpers import tiny_config

from slowfast_vlm import SlowFastConfig


def test_published_defaults():
    """Section 3 of the design doc: the released 64-frame checkpoint's values are the defaults."""
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
    """Every 8 of Qwen2-7B's 28 layers: 0, 8, 16, 24 (design 1.5)."""
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
    assert model.hybrid_layers == []
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
