"""Tiny checkpoints in the reference (LLaVA-style) format, written from random models, with weight names
given here by hand from the reference code (timm ConvNeXt, transformers 4.x `vision_model.` level)."""

import json
import re

import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_config, tiny_model
from safetensors.torch import save_file

from slowfast_vlm import SlowFastForConditionalGeneration, fast_token_count

expected_weights = SlowFastForConditionalGeneration.expected_weights

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
    layer = model.hybrid_attentions[0]
    shape = (layer.num_kv_heads, layer.head_dim)
    hidden = model.config.text_config.hidden_size
    return [
        (
            torch.randn(*shape, hidden, generator=generator) * 0.2,
            torch.randn(*shape, hidden, generator=generator) * 0.2,
            torch.randn(*shape, generator=generator) * 0.2,
            torch.randn(*shape, generator=generator) * 0.2,
        )
        for _ in model.hybrid_attentions
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
        for layer, blocks in zip(model.hybrid_attentions, per_head_kv(model, seed)):
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
    model = SlowFastForConditionalGeneration.from_reference_checkpoint(
        directory, vision_config=vision_config_for(vision), dtype=torch.float32, **kwargs
    )
    # the reference has no placeholder ids (they come with a tokenizer)
    model.config.video_token_id = VIDEO_TOKEN_ID
    return model
