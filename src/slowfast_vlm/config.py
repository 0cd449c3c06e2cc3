"""`SlowFastConfig`: the LLM config, the vision-encoder config and the slow-fast knobs.

Defaults are the published values (design doc section 3; released 64-frame checkpoint).
"""

from __future__ import annotations

import re

from transformers import AutoConfig, PretrainedConfig

PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
GATE_TYPES = ("tanh-warmup", "none")
QUERY_MODES = ("text", "all")


class SlowFastConfig(PretrainedConfig):
    r"""Configuration of a [`SlowFastForConditionalGeneration`].

    Args:
        text_config: config of the LLM (any Llama-style decoder: Qwen2/2.5/3, Llama, Mistral).
        vision_config: config of the vision encoder (SigLIP / CLIP vision model or ConvNeXt).
        projector_type: `"linear"` or `"mlp{N}x_gelu"`.
        vision_feature_layer: index into the encoder's hidden states (-1 = last layer / last stage).
        vision_frame_chunk_size: frames encoded at once, so long videos do not hold every frame's
            activations at the same time.
        vision_norm_eps: eps of the LayerNorms in a ConvNeXt tower's stem, blocks and downsampling
            layers (the final one, unused by the feature path, has the vision config's `layer_norm_eps`);
            None keeps transformers' own (1e-6); converted reference checkpoints set 1e-5 as timm does.
        video_pooling_stride: spatial average pooling of every video frame's grid (slow tokens).
        fast_temporal_sampling_stride, fast_temporal_pooling_stride, fast_spatial_pooling_stride,
        min_fast_frames: how fast tokens are built from slow tokens (design section 1.3).
        hybrid_every_n_layers, hybrid_min_depth, hybrid_max_depth: hybrid layers are
            `range(hybrid_min_depth, hybrid_max_depth or num_hidden_layers, hybrid_every_n_layers)`.
        hybrid_layers: an explicit list of hybrid layer indices instead of that range; `[]` gives a
            self-attention-only video LLM (no slow branch), the baseline of the paper's comparisons.
        cross_attn_queries: `"text"` (published: text tokens query the slow tokens) or `"all"`.
        mask_system_tokens: also drop the text tokens before the first visual token from the queries.
        gate_type: `"tanh-warmup"` (published "whole-dynamic-tanh-warmup") or `"none"`.
        cross_attn_gate_init: starting value of the warm-up gate's scalar `w`. 0 (published) makes a
            freshly converted model compute exactly what the LLM computes; a small positive value lets a
            branch trained from scratch receive gradient through its output from the first step.
        init_cross_kv_from_lm: initialise the cross key/value projection from the layer's k/v_proj.
        generated_tokens_see_slow: generated tokens attend to the slow tokens (False = reference decoding).
        video_token_id, image_token_id: placeholder ids in the text vocabulary.
    """

    model_type = "slowfast_vlm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    default_sub_config_types = {"text_config": "qwen2", "vision_config": "siglip_vision_model"}

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -1
    vision_frame_chunk_size: int = 16
    vision_norm_eps: float | None = None
    video_pooling_stride: int = 2
    fast_temporal_sampling_stride: int = 1
    fast_temporal_pooling_stride: int = 4
    fast_spatial_pooling_stride: int = 1
    min_fast_frames: int = 16
    hybrid_every_n_layers: int = 8
    hybrid_min_depth: int = 0
    hybrid_max_depth: int | None = None
    hybrid_layers: list[int] | None = None
    cross_attn_queries: str = "text"
    mask_system_tokens: bool = False
    gate_type: str = "tanh-warmup"
    cross_attn_gate_init: float = 0.0
    init_cross_kv_from_lm: bool = True
    generated_tokens_see_slow: bool = True
    video_token_id: int | None = None
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Sub-configs given as dicts (or not at all) become config objects of their `model_type`. Done
        # here rather than through transformers' `SubConfigSpec`, which only exists from 5.20.
        for key, default_type in self.default_sub_config_types.items():
            value = getattr(self, key)
            if value is None or isinstance(value, dict):
                fields = dict(value or {})
                setattr(self, key, AutoConfig.for_model(fields.pop("model_type", default_type), **fields))
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_slowfast()

    def validate_slowfast(self) -> None:
        """Raise a `ValueError` naming the first invalid slow-fast field."""
        for name in (
            "video_pooling_stride",
            "fast_temporal_sampling_stride",
            "fast_temporal_pooling_stride",
            "fast_spatial_pooling_stride",
            "min_fast_frames",
            "hybrid_every_n_layers",
            "vision_frame_chunk_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SlowFastConfig.{name} must be an integer >= 1, got {value!r}")
        if not PROJECTOR_PATTERN.match(str(self.projector_type)):
            raise ValueError(
                f"SlowFastConfig.projector_type must be 'linear' or 'mlp<N>x_gelu', got {self.projector_type!r}"
            )
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"SlowFastConfig.gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.cross_attn_queries not in QUERY_MODES:
            raise ValueError(
                f"SlowFastConfig.cross_attn_queries must be one of {QUERY_MODES}, got {self.cross_attn_queries!r}"
            )
        num_layers = self.text_config.num_hidden_layers
        if not 0 <= self.hybrid_min_depth < num_layers:
            raise ValueError(
                f"SlowFastConfig.hybrid_min_depth={self.hybrid_min_depth} is outside the LLM's "
                f"{num_layers} layers (0..{num_layers - 1})"
            )
        if (
            self.hybrid_max_depth is not None
            and not self.hybrid_min_depth < self.hybrid_max_depth <= num_layers
        ):
            raise ValueError(
                f"SlowFastConfig.hybrid_max_depth={self.hybrid_max_depth} must be in "
                f"({self.hybrid_min_depth}, {num_layers}] for an LLM with {num_layers} layers"
            )

        if self.hybrid_layers is not None:
            outside = [i for i in self.hybrid_layers if not 0 <= i < num_layers]
            if outside:
                raise ValueError(
                    f"SlowFastConfig.hybrid_layers {outside} are outside the LLM's {num_layers} layers"
                )

    @property
    def hybrid_layer_indices(self) -> list[int]:
        """Indices of the LLM decoder layers that carry a cross-attention branch."""
        if self.hybrid_layers is not None:
            return sorted(set(self.hybrid_layers))
        stop = (
            self.hybrid_max_depth if self.hybrid_max_depth is not None else self.text_config.num_hidden_layers
        )
        return list(range(self.hybrid_min_depth, stop, self.hybrid_every_n_layers))


__all__ = ["SlowFastConfig"]
