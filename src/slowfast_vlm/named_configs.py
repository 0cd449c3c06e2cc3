"""Named geometries: `SlowFastConfig.from_name(name, **overrides)` (litgpt's `Config.from_name`), as plain
data that imports nothing, so the command line can list the names without loading torch.

Each entry is `{"text_config": {...}, "vision_config": {...}, **knobs}`; knobs not given keep
`SlowFastConfig`'s defaults (the released 64-frame checkpoint's values).
"""

from __future__ import annotations

# The two designs the compute accounting and the benchmarks compare: the slow-fast model, and the
# self-attention-only video LLM on the same fast tokens (`hybrid_layers=[]`).
DESIGNS = ("slowfast", "self-attention")


# Each entry is {"text_config": {...}, "vision_config": {...}, **knobs}; knobs not given keep the defaults.
def variant(base: dict, text_config: dict | None = None, vision_config: dict | None = None, **knobs) -> dict:
    """`base` with `knobs` replaced and the sub-configs' fields updated; `base` is left as it is."""
    return {
        **base,
        **knobs,
        "text_config": {**base["text_config"], **(text_config or {})},
        "vision_config": {**base["vision_config"], **(vision_config or {})},
    }


# The released checkpoints' geometry: Qwen2-7B-Instruct + ConvNeXt-XXL CLIP at 576 px (an 18 x 18 grid).
_REFERENCE_7B = {
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
    },
    "vision_config": {
        "model_type": "convnext",
        "hidden_sizes": [384, 768, 1536, 3072],
        "depths": [3, 4, 30, 3],
        "patch_size": 4,
        "num_stages": 4,
        "image_size": 576,
    },
}
# The benchmarks' scaled LLM: Qwen2-7B's shape ratios (MLP 5.5x wide, 4 query heads per kv head; hybrid
# layers every 4 of 8 layers, 7B: every 8 of 28) at width D = 512. Per token, QK^T + AV cost 4 * L * D FLOPs
# against about 38 * D^2 for the projections and MLP in both models, so attention's share grows with
# L / D. With 16 slow tokens per frame, L / D at a given frame count is about 1.4x the 7B model's
# (81 tokens per frame, D = 3,584): at 128 frames the self-attention-only model's attention costs 43%
# of its projections here vs 32% at 7B. The long-video trend is therefore slightly exaggerated here.
# A one-layer SigLIP on 64 px frames: an 8 x 8 grid, pooled by 2 to 4 x 4 = 16 slow tokens per frame.
# The knobs are the released 128-frame model's (s2t4: temporal sampling stride 2, pooling stride 4).
_BENCH_SCALED = {
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 2816,
        "vocab_size": 8192,
        "max_position_embeddings": 65536,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "image_size": 64,
        "patch_size": 8,
    },
    "hybrid_every_n_layers": 4,
    "fast_temporal_sampling_stride": 2,
    "video_token_id": 8190,
    "image_token_id": 8191,
}
# Tiny random models for tests: a 4-layer, 64-wide LLM (4 heads, 2 kv heads) of each family with hybrid
# layers 0 and 2, and a 32 px encoder of each kind (4 x 4 grids); vocabulary 128, placeholders 126 and 127.
_TINY_TEXT = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
_TINY_LLMS = {
    "qwen2": {"model_type": "qwen2"},
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral"},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
}
_TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
_TINY_ENCODERS = {
    "siglip": {"model_type": "siglip_vision_model", **_TINY_VIT},
    "clip": {"model_type": "clip_vision_model", **_TINY_VIT, "projection_dim": 32},
    "convnext": {
        "model_type": "convnext",
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "num_stages": 2,
        "patch_size": 4,
        "image_size": 32,
    },
}
_TINY_KNOBS = {"hybrid_every_n_layers": 2, "min_fast_frames": 2, "video_token_id": 126, "image_token_id": 127}


def _tiny(llm: str, encoder: str) -> dict:
    """The tiny model of LLM family `llm` with encoder `encoder`."""
    return {
        "text_config": {**_TINY_TEXT, **_TINY_LLMS[llm]},
        "vision_config": _TINY_ENCODERS[encoder],
        **_TINY_KNOBS,
    }


NAMED_CONFIGS: dict[str, dict] = {
    # `slowfast-vlm flops` presets; the suffix sXtY is a released checkpoint's fast tokens: temporal
    # sampling stride X, pooling stride Y (frame64-s1t4, frame96-s1t6, frame128-s2t4).
    "reference-7b": _REFERENCE_7B,
    "reference-7b-s1t4": _REFERENCE_7B,
    "reference-7b-s1t6": variant(_REFERENCE_7B, fast_temporal_pooling_stride=6),
    "reference-7b-s2t4": variant(_REFERENCE_7B, fast_temporal_sampling_stride=2),
    # benchmarks/: the scaled model; `--quick` (only checks that a script runs); the training benchmark's
    "bench-scaled": _BENCH_SCALED,
    "bench-quick": variant(
        _BENCH_SCALED,
        text_config={
            "hidden_size": 128,
            "intermediate_size": 704,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        },
    ),
    "bench-train": variant(
        _BENCH_SCALED,
        text_config={
            "hidden_size": 256,
            "intermediate_size": 1408,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
    ),
    # experiments/synth's from-scratch CPU model (`training.scratch`; its vocabulary comes from the
    # tokenizer): every frame's 4 x 4 grid unpooled, 16 slow tokens per frame.
    "scratch": {
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "video_pooling_stride": 1,
    },
    # tests: "tiny" is "tiny-qwen2-siglip"; "tiny-<llm>-<encoder>" for every family pair.
    "tiny": _tiny("qwen2", "siglip"),
    **{f"tiny-{llm}-{encoder}": _tiny(llm, encoder) for llm in _TINY_LLMS for encoder in _TINY_ENCODERS},
}
