"""Vision side: the encoder's feature grids and the projector into the LLM width (architecture 1.2).

Supported encoders (any transformers vision model with one of these layouts):
- ViTs with a patch grid: SigLIP (`siglip_vision_model`) and CLIP (`clip_vision_model`, its class
  token is dropped);
- ConvNeXt-style CNNs (`convnext`, `convnextv2`): the feature map of a stage.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

CNN_MODEL_TYPES = ("convnext", "convnextv2")
VIT_WITH_CLASS_TOKEN = ("clip_vision_model",)


def build_vision_tower(vision_config: PretrainedConfig, norm_eps: float | None = None) -> nn.Module:
    """A randomly initialised encoder for `vision_config` (weights come from `from_pretrained` later).

    `norm_eps` (CNNs only, `SlowFastConfig.vision_norm_eps`) replaces the eps that transformers fixes
    for the LayerNorms of the stem, blocks and downsampling layers; the final `layernorm` keeps the
    config's `layer_norm_eps`.
    """
    if vision_config.model_type not in CNN_MODEL_TYPES:
        return AutoModel.from_config(vision_config)
    # CNNs have no attention; the composite model's "sdpa" request must not reach them.
    tower = AutoModel.from_config(vision_config, attn_implementation="eager")
    if norm_eps is not None:
        for name, module in tower.named_modules():
            if isinstance(module, nn.LayerNorm) and name != "layernorm":
                module.eps = norm_eps
    return tower


def vision_grid(vision_config: PretrainedConfig) -> tuple[int, int]:
    """The `(h, w)` feature grid the encoder gives for one frame at its native resolution."""
    size = vision_config.image_size
    if vision_config.model_type in CNN_MODEL_TYPES:
        # stem (patch_size) then a 2x downsampling at the start of every stage after the first
        stride = vision_config.patch_size * 2 ** (vision_config.num_stages - 1)
    else:
        stride = vision_config.patch_size
    return size // stride, size // stride


def vision_feature_size(vision_config: PretrainedConfig) -> int:
    """Channels C of the encoder's feature grid."""
    if vision_config.model_type in CNN_MODEL_TYPES:
        return vision_config.hidden_sizes[-1]
    return vision_config.hidden_size


def encoder_grids(encoder: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """Run the encoder on `(N, 3, H, W)` frames; return the chosen layer's feature grids `(N, h, w, C)`."""
    model_type = encoder.config.model_type
    outputs = encoder(pixel_values=pixel_values, output_hidden_states=True)
    features = outputs.hidden_states[feature_layer]
    if model_type in CNN_MODEL_TYPES:
        return features.permute(0, 2, 3, 1)  # (N, C, h, w) -> (N, h, w, C)
    if model_type in VIT_WITH_CLASS_TOKEN:
        features = features[:, 1:]
    side = int(round(features.shape[1] ** 0.5))
    if side * side != features.shape[1]:
        raise ValueError(f"{model_type}: {features.shape[1]} patch tokens do not form a square grid")
    return features.reshape(features.shape[0], side, side, features.shape[-1])


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Sequential:
    """`linear` or `mlp{N}x_gelu` (Linear, GELU, Linear, ...); submodule indices match the reference."""
    if projector_type == "linear":
        return nn.Sequential(nn.Linear(in_features, out_features))
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown projector_type {projector_type!r}")
    modules: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(int(match.group(1)) - 1):
        modules += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*modules)


def encode_frames(
    encoder: nn.Module,
    projector: nn.Module,
    frames: torch.Tensor,
    feature_layer: int,
    chunk_size: int,
) -> torch.Tensor:
    """Encode and project `(T, 3, H, W)` frames `chunk_size` at a time -> `(T, h, w, D)`.

    Chunking bounds the encoder's activation memory on long videos: only the projected grids of
    all frames are kept.
    """
    dtype = next(encoder.parameters()).dtype
    chunks = []
    for start in range(0, frames.shape[0], chunk_size):
        grids = encoder_grids(encoder, frames[start : start + chunk_size].to(dtype), feature_layer)
        chunks.append(projector(grids.to(next(projector.parameters()).dtype)))
    return torch.cat(chunks)
