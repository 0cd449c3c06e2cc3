"""`SlowFastConfig`: the LLM config, the vision-encoder config and the slow-fast knobs.

Defaults are the published values (architecture section 3; released 64-frame checkpoint).
`SlowFastConfig.from_name` builds the named geometries of `named_configs.py`: the released 7B models,
the benchmarks', the from-scratch CPU model's and the tests' tiny models.
"""

from __future__ import annotations

import copy
import re

from transformers import AutoConfig, PretrainedConfig

from .named_configs import NAMED_CONFIGS, variant

PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
GATE_TYPES = ("tanh-warmup", "none")
QUERY_MODES = ("text", "all")


class SlowBranchConfig(PretrainedConfig):
    r"""The slow branch's knobs, defined once for the native model ([`SlowFastConfig`]) and the host
    plug-ins' configs (`slowfast_vlm.hosts`), as litgpt's `adapter.Config(BaseConfig)`: how the slow
    tokens are made from the frame grids, which decoder layers become hybrid, and how they read the slow
    tokens. A subclass holds `text_config` (the LLM, for the layer count).

    Args:
        vision_frame_chunk_size: frames encoded at once, so long videos do not hold every frame's
            activations at the same time.
        video_pooling_stride: spatial average pooling of every video frame's grid (slow tokens).
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
    """

    vision_frame_chunk_size: int = 16
    video_pooling_stride: int = 2
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_slow_branch()

    def validate_slow_branch(self) -> None:
        """Raise a `ValueError` naming the first invalid slow-branch field."""
        name = type(self).__name__
        for field in ("video_pooling_stride", "hybrid_every_n_layers", "vision_frame_chunk_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be an integer >= 1, got {value!r}")
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"{name}.gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.cross_attn_queries not in QUERY_MODES:
            raise ValueError(
                f"{name}.cross_attn_queries must be one of {QUERY_MODES}, got {self.cross_attn_queries!r}"
            )
        num_layers = self.text_config.num_hidden_layers
        if not 0 <= self.hybrid_min_depth < num_layers:
            raise ValueError(
                f"{name}.hybrid_min_depth={self.hybrid_min_depth} is outside the LLM's "
                f"{num_layers} layers (0..{num_layers - 1})"
            )
        if (
            self.hybrid_max_depth is not None
            and not self.hybrid_min_depth < self.hybrid_max_depth <= num_layers
        ):
            raise ValueError(
                f"{name}.hybrid_max_depth={self.hybrid_max_depth} must be in "
                f"({self.hybrid_min_depth}, {num_layers}] for an LLM with {num_layers} layers"
            )
        if self.hybrid_layers is not None:
            outside = [i for i in self.hybrid_layers if not 0 <= i < num_layers]
            if outside:
                raise ValueError(f"{name}.hybrid_layers {outside} are outside the LLM's {num_layers} layers")

    @property
    def hybrid_layer_indices(self) -> list[int]:
        """Indices of the LLM decoder layers that carry a cross-attention branch."""
        if self.hybrid_layers is not None:
            return sorted(set(self.hybrid_layers))
        stop = (
            self.hybrid_max_depth if self.hybrid_max_depth is not None else self.text_config.num_hidden_layers
        )
        return list(range(self.hybrid_min_depth, stop, self.hybrid_every_n_layers))


class SlowFastConfig(SlowBranchConfig):
    r"""Configuration of a [`SlowFastForConditionalGeneration`]: the LLM and vision-encoder configs, the
    slow branch's knobs (`SlowBranchConfig`: pooling, hybrid layers, gate) and these.

    Args:
        text_config: config of the LLM (any Llama-style decoder: Qwen2/2.5/3, Llama, Mistral).
        vision_config: config of the vision encoder (SigLIP / CLIP vision model or ConvNeXt).
        projector_type: `"linear"` or `"mlp{N}x_gelu"`.
        vision_feature_layer: index into the encoder's hidden states (-1 = last layer / last stage).
        vision_norm_eps: eps of the LayerNorms in a ConvNeXt tower's stem, blocks and downsampling
            layers (the final one, unused by the feature path, has the vision config's `layer_norm_eps`);
            None keeps transformers' own (1e-6); converted reference checkpoints set 1e-5 as timm does.
        fast_temporal_sampling_stride, fast_temporal_pooling_stride, fast_spatial_pooling_stride,
        min_fast_frames: how fast tokens are built from slow tokens (architecture section 1.3).
        video_token_id, image_token_id: placeholder ids in the text vocabulary.
    """

    model_type = "slowfast_vlm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    default_sub_config_types = {"text_config": "qwen2", "vision_config": "siglip_vision_model"}

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -1
    vision_norm_eps: float | None = None
    fast_temporal_sampling_stride: int = 1
    fast_temporal_pooling_stride: int = 4
    fast_spatial_pooling_stride: int = 1
    min_fast_frames: int = 16
    video_token_id: int | None = None
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_name(cls, name: str, **overrides) -> SlowFastConfig:
        """The `NAMED_CONFIGS[name]` config. `overrides` replace its knobs; `text_config={...}` and
        `vision_config={...}` update fields of its sub-configs (e.g. `text_config={"vocab_size": 400}`)."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown config name {name!r}; known names: {', '.join(NAMED_CONFIGS)}")
        return cls(**copy.deepcopy(variant(NAMED_CONFIGS[name], **overrides)))

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
        """Raise a `ValueError` naming the first invalid slow-fast field (slow branch, fast tokens, projector)."""
        self.validate_slow_branch()
        for name in (
            "fast_temporal_sampling_stride",
            "fast_temporal_pooling_stride",
            "fast_spatial_pooling_stride",
            "min_fast_frames",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SlowFastConfig.{name} must be an integer >= 1, got {value!r}")
        if not PROJECTOR_PATTERN.match(str(self.projector_type)):
            raise ValueError(
                f"SlowFastConfig.projector_type must be 'linear' or 'mlp<N>x_gelu', got {self.projector_type!r}"
            )


__all__ = ["SlowBranchConfig", "SlowFastConfig"]
