"""Reference-checkpoint conversion: weight names, the fused key/value layout, config knobs, shards, errors, CLI.

Each test writes a tiny checkpoint in the reference (LLaVA-style) format from a random model, with names
given here by hand from the reference code (timm ConvNeXt, transformers 4.x `vision_model.` level).
"""

import json
import re
import socket

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_config, tiny_model, tiny_tokenizer
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPVisionConfig

from slowfast_vlm import SlowFastForConditionalGeneration, cli, fast_token_count
from slowfast_vlm.convert import (
    convert_reference_config,
    convert_reference_state_dict,
    is_reference_checkpoint,
    load_reference_checkpoint,
)
from slowfast_vlm.modeling.vision import encoder_grids, vision_grid
from slowfast_vlm.processing.processor import SlowFastProcessor

REFERENCE_TOWER = "model.vision_tower.vision_tower."
TOWER_NAMES = {
    "siglip": "google/siglip-tiny-patch8-32",
    "clip": "openai/clip-vit-tiny-patch8-32",
    "convnext": "convnext-32",
}
# The tower's weight names in the reference checkpoints, from ours.
CONVNEXT_REFERENCE_NAMES = (
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.weight"),
    (r"^layernorm\.", "head.norm."),
)


def reference_name(name: str, vision: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.multi_modal_projector."):
        return "model.mm_projector." + name[len("model.multi_modal_projector.") :]
    if name.startswith("model.vision_tower."):
        tower = name[len("model.vision_tower.") :]
        if vision == "convnext":
            for pattern, replacement in CONVNEXT_REFERENCE_NAMES:
                tower, count = re.subn(pattern, replacement, tower)
                if count:
                    break
        else:
            tower = "vision_model." + tower
        return REFERENCE_TOWER + tower
    return name


def reference_config(model, vision: str, **overrides) -> dict:
    text = model.config.text_config
    config = {
        "model_type": "llava_qwen_slow_fast",
        "architectures": ["LlavaQwenSlowFastForCausalLM"],
        "torch_dtype": "float32",
        **{
            k: getattr(text, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "rms_norm_eps",
                "max_position_embeddings",
                "tie_word_embeddings",
                "hidden_act",
            )
        },
        "rope_theta": text.rope_parameters["rope_theta"],
        "mm_vision_tower": TOWER_NAMES[vision],
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 16 if vision == "convnext" else 32,
        "mm_vision_select_layer": -1,
        "mm_video_pooling_stride": 2,
        "cross_attn_every_n_layers": 2,
        "cross_attn_min_layer_depth": 0,
        "cross_attn_max_layer_depth": 4,
        "cross_attn_implementation": "text-only-vanilla-flashattn",
        "cross_attn_gating_type": "whole-dynamic-tanh-warmup",
        "fast_token_spatial_stride": 1,
        "fast_token_temporal_stride": 4,
        "fast_token_temporal_sampling_stride": 1,
        "min_fast_frames": 2,
        "tile_image_input": False,
    }
    config.update(overrides)
    return config


def per_head_kv(model, seed: int = 0):
    """Random per-kv-head key/value weights `(kv_heads, head_dim, D)` and biases `(kv_heads, head_dim)`."""
    generator = torch.Generator().manual_seed(seed)
    layer = model.hybrid_layers[0]
    shape = (layer.num_kv_heads, layer.head_dim)
    hidden = model.config.text_config.hidden_size
    return [
        (
            torch.randn(*shape, hidden, generator=generator) * 0.2,
            torch.randn(*shape, hidden, generator=generator) * 0.2,
            torch.randn(*shape, generator=generator) * 0.2,
            torch.randn(*shape, generator=generator) * 0.2,
        )
        for _ in model.hybrid_layers
    ]


def fused_reference_kv(key_w, value_w, key_b, value_b):
    """The reference's fused projection: rows [K_0; V_0; K_1; V_1; ...], head by head."""
    weight = torch.cat([block for h in range(key_w.shape[0]) for block in (key_w[h], value_w[h])])
    bias = torch.cat([block for h in range(key_b.shape[0]) for block in (key_b[h], value_b[h])])
    return weight, bias


def original_model(vision: str, seed: int = 0, **overrides):
    """A tiny model with every weight non-trivial, open gates, and key/value projections from `per_head_kv`;
    a ConvNeXt tower normalises with timm's eps, as the reference's."""
    if vision == "convnext":
        overrides.setdefault("vision_norm_eps", 1e-5)
    model = tiny_model(tiny_config(vision=vision, **overrides), seed=seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for layer, blocks in zip(model.hybrid_layers, per_head_kv(model, seed)):
            weight, bias = fused_reference_kv(*blocks)
            layer.cross_attn_kv_proj.weight.copy_(weight)
            layer.cross_attn_kv_proj.bias.copy_(bias)
    open_gates(model, 0.8)
    return model


def reference_state_dict(model, vision: str) -> dict:
    state = {reference_name(k, vision): v.clone() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("cross_attn_warm_up_gate")]:
        state[key] = state[key].reshape(())  # the reference may store it as a scalar
    return state


def write_reference(
    directory, model, vision: str, state=None, shards: int = 1, fmt="safetensors", **overrides
):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(reference_config(model, vision, **overrides)))
    state = reference_state_dict(model, vision) if state is None else state
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    if shards == 1:
        save_file(state, directory / "model.safetensors")
        return directory
    names, weight_map = list(state), {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k] for k in part}, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def vision_config_for(vision: str):
    # a ViT's head count is not in its weights' shapes; the ConvNeXt tower is fully inferred
    return None if vision == "convnext" else {"num_attention_heads": 2}


def video_logits(model, frames: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(1, frames, 3, 32, 32, generator=generator)
    count = fast_token_count(frames, model.model.visual_grid(frames), model.config)
    ids = torch.tensor([[3, 4, *[VIDEO_TOKEN_ID] * count, 5, 6, 7, 8]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values_videos=video).logits


def load(directory, vision: str, **kwargs):
    model = load_reference_checkpoint(
        directory, vision_config=vision_config_for(vision), dtype=torch.float32, **kwargs
    )
    # the reference has no placeholder ids (they come with a tokenizer)
    model.config.video_token_id = VIDEO_TOKEN_ID
    return model


@pytest.mark.parametrize("vision", ["siglip", "clip", "convnext"])
def test_reference_weights_map_back_to_the_original(vision):
    original = original_model(vision)
    state = reference_state_dict(original, vision)
    config = convert_reference_config(
        reference_config(original, vision), vision_config_for(vision), {k: v.shape for k, v in state.items()}
    )
    converted = convert_reference_state_dict(state, config)
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
    for layer, (key_w, value_w, key_b, value_b) in zip(model.hybrid_layers, per_head_kv(original, seed=3)):
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
    model = load_reference_checkpoint(
        directory, vision_config={"num_attention_heads": 2}
    )  # dtype from config.json
    model.config.video_token_id = VIDEO_TOKEN_ID
    standard = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(video_logits(model), video_logits(standard))
    # without a dtype in config.json: the weights' own
    directory = write_reference(tmp_path / "fp16", original.to(torch.float16), "siglip", torch_dtype=None)
    assert (
        load_reference_checkpoint(directory, vision_config={"num_attention_heads": 2}).dtype == torch.float16
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
            {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, converted
        )
    with pytest.raises(ValueError, match=r"1 unexpected weights: model\.image_newline"):
        convert_reference_state_dict({**state, "model.image_newline": torch.zeros(64)}, converted)
    with pytest.raises(ValueError, match=r"wrong shape: model\.mm_projector\.2\.weight \(64, 32\)"):
        convert_reference_state_dict({**state, "model.mm_projector.2.weight": torch.zeros(64, 32)}, converted)
    towerless = {k: v for k, v in state.items() if "vision_tower" not in k}
    with pytest.raises(ValueError, match="no weights for the vision tower"):
        convert_reference_state_dict(
            towerless, convert_reference_config(config, model.config.vision_config, shapes)
        )

    assert not is_reference_checkpoint(tmp_path / "nothing-here")
    model.save_pretrained(tmp_path / "ours")
    assert not is_reference_checkpoint(tmp_path / "ours")
    assert not is_reference_checkpoint(None)


def test_cli_converts_with_tokenizer(tmp_path, capsys):
    original = original_model("siglip", seed=6)
    src = write_reference(tmp_path / "reference", original, "siglip")
    tiny_tokenizer().save_pretrained(src)
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(dst), "--vision-config", '{"num_attention_heads": 2}']) == 0
    assert "wrote" in capsys.readouterr().err

    model = SlowFastForConditionalGeneration.from_pretrained(dst)
    processor = SlowFastProcessor.from_pretrained(dst)
    tokenizer = processor.tokenizer
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<video>") == 300
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == 301
    # the embeddings grew to the tokenizer (300 + 2 tokens); the original rows are untouched
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 302
    ids = torch.tensor([[5, 17, 42, 99, 127]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits[..., :128], original(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    video = torch.randint(0, 255, (4, 40, 48, 3), dtype=torch.uint8)
    inputs = processor(text="<video>\nWhat happens?", videos=video, return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], 302)


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a reference checkpoint" in err[0]

    original = tiny_model(vision="convnext")
    src = write_reference(
        tmp_path / "reference", original, "convnext", cross_attn_gating_type="channel-wise-dynamic-sigmoid"
    )
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) != 0
    assert "unknown cross_attn_gating_type 'channel-wise-dynamic-sigmoid'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----- the vision tower's config from its name --------------------------------------------------------
def test_tower_named_by_a_local_directory_needs_no_vision_config(tmp_path):
    original = original_model("siglip", seed=7)
    tower = tmp_path / "siglip-tower"
    original.config.vision_config.save_pretrained(tower)  # holds the head count the weights cannot tell
    src = write_reference(tmp_path / "reference", original, "siglip", mm_vision_tower=str(tower))
    assert cli.main(["convert", str(src), str(tmp_path / "converted")]) == 0
    model = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "converted")
    model.config.video_token_id = VIDEO_TOKEN_ID
    assert model.config.vision_config.num_attention_heads == 2
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)


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
    model = load_reference_checkpoint(directory, dtype=torch.float32)
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
TOWER_SCALES = (
    (r"^stem\.0\.|\.conv_dw\.", 1e-3),
    (r"^stem\.1\.|^stages\.0\.blocks\.\d+\.weight$", 3e-3),
    (r"", 0.3),
)


def small_variance_tower(state: dict, seed: int = 0) -> dict:
    """`state` with random tower weights (timm names below `model.vision_tower.vision_tower.`) at `TOWER_SCALES`."""
    generator = torch.Generator().manual_seed(seed)
    state = dict(state)
    for key in [k for k in state if k.startswith(REFERENCE_TOWER)]:
        name = key[len(REFERENCE_TOWER) :]
        scale = next(s for pattern, s in TOWER_SCALES if re.search(pattern, name))
        state[key] = torch.randn(state[key].shape, generator=generator) * scale
        if re.search(r"(\.norm|downsample\.0)\.weight$", name):
            state[key] += 1
    return state


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of `(N, C, H, W)`."""
    centred = x - x.mean(1, keepdim=True)
    variance = centred.pow(2).mean(1, keepdim=True)
    return centred / torch.sqrt(variance + eps) * weight[:, None, None] + bias[:, None, None]


def timm_convnext_features(tower: dict, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference tower's output, recomputed from its timm weights: timm's ConvNeXt stem and stages
    as the reference's `forward_features` runs them, the last stage taken with no final norm -> `(N, C, h, w)`."""
    stem = tower["stem.0.weight"]
    x = F.conv2d(pixels, stem, tower["stem.0.bias"], stride=stem.shape[-1])
    x = channel_layer_norm(x, tower["stem.1.weight"], tower["stem.1.bias"], eps)
    num_stages = 1 + max(int(name.split(".")[1]) for name in tower if name.startswith("stages."))
    for i in range(num_stages):
        stage = f"stages.{i}."
        if stage + "downsample.0.weight" in tower:
            x = channel_layer_norm(
                x, tower[stage + "downsample.0.weight"], tower[stage + "downsample.0.bias"], eps
            )
            x = F.conv2d(
                x, tower[stage + "downsample.1.weight"], tower[stage + "downsample.1.bias"], stride=2
            )
        num_blocks = 1 + max(int(n.split(".")[3]) for n in tower if n.startswith(stage + "blocks."))
        for j in range(num_blocks):
            block = f"{stage}blocks.{j}."
            y = F.conv2d(
                x,
                tower[block + "conv_dw.weight"],
                tower[block + "conv_dw.bias"],
                padding=3,
                groups=x.shape[1],
            )
            y = channel_layer_norm(y, tower[block + "norm.weight"], tower[block + "norm.bias"], eps)
            y = y.permute(0, 2, 3, 1)  # (N, h, w, C): the MLP runs over channels
            y = F.gelu(F.linear(y, tower[block + "mlp.fc1.weight"], tower[block + "mlp.fc1.bias"]))
            y = F.linear(y, tower[block + "mlp.fc2.weight"], tower[block + "mlp.fc2.bias"])
            x = x + (y * tower[block + "weight"]).permute(0, 3, 1, 2)  # layer scale (timm's gamma), residual
    return x


def test_converted_convnext_tower_computes_the_reference_features(tmp_path):
    original = original_model("convnext", seed=9)
    state = small_variance_tower(reference_state_dict(original, "convnext"), seed=9)
    src = write_reference(tmp_path / "reference", original, "convnext", state=state)
    assert cli.main(["convert", str(src), str(tmp_path / "converted")]) == 0
    model = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "converted", dtype=torch.float32)
    assert model.config.vision_norm_eps == 1e-5
    norms = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and {m.eps for m in norms} == {1e-5}  # stem, 2 blocks, downsampling, final

    tower = {k[len(REFERENCE_TOWER) :]: v for k, v in state.items() if k.startswith(REFERENCE_TOWER)}
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        features = encoder_grids(model.model.vision_tower, frames, model.config.vision_feature_layer)
        (slow,) = model.model.encode_visual_items([frames])
    expected = timm_convnext_features(tower, frames, eps=1e-5).permute(0, 2, 3, 1)  # (T, h, w, C)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    # transformers' own eps (1e-6) is far outside the tolerance: the comparison tells them apart
    wrong = timm_convnext_features(tower, frames, eps=1e-6).permute(0, 2, 3, 1)
    assert (wrong - expected).abs().max() > 1e-2

    # the slow tokens: the reference's mlp2x_gelu projector, then 2x2 average pooling of every frame
    w0, b0, w2, b2 = (state[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias"))
    projected = F.linear(F.gelu(F.linear(expected, w0, b0)), w2, b2)  # (T, h, w, D)
    pooled = F.avg_pool2d(projected.permute(0, 3, 1, 2), kernel_size=2)  # (T, D, h / 2, w / 2)
    torch.testing.assert_close(slow, pooled.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
