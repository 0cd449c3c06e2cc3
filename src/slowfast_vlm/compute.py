"""Count the FLOPs and memory of a slow-fast model at given frame counts, against a self-attention-only LLM.

Everything is computed from the config alone; no weights are loaded. Conventions:
- one multiply-add = 2 FLOPs; only matrix products and convolutions are counted (norms, activations,
  softmax, RoPE, pooling, biases and residual adds are elementwise and ignored);
- attention scores are counted in full (L x L for causal self-attention), as dense kernels (eager,
  SDPA's math path) compute them; flash kernels skip about half of the masked triangle;
- prefill computes logits for the last position only, as `generate` does (`logits_to_keep=1`);
- batch size 1; decoding cost is that of the first generated token (context = prefill length + 1).

Two designs per frame count:
- "slowfast": the fast tokens of the video are in the LLM sequence; all slow tokens go through the
  hybrid layers' cross-attention (architecture 1.3-1.5);
- "self-attention": the same LLM without hybrid layers, with every frame's pooled tokens (all slow
  tokens) in the sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .config import SlowFastConfig
from .modeling.fast_tokens import fast_token_count
from .modeling.slow_tokens import slow_grid
from .modeling.vision import (
    CNN_MODEL_TYPES,
    VIT_WITH_CLASS_TOKEN,
    vision_feature_size,
    vision_grid,
)
from .named_configs import DESIGNS, NAMED_CONFIGS

VIT_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model")


@dataclass
class ParameterCount:
    """Parameters of each part of a `SlowFastForConditionalGeneration` (tied weights counted once)."""

    llm: int  # embeddings, decoder layers and LM head, without the hybrid layers' additions
    cross_attention: int  # cross_attn_kv_proj and gate of all hybrid layers
    vision: int
    projector: int


@dataclass
class ComputeRecord:
    """FLOPs and memory of one design at one frame count (batch size 1)."""

    design: str
    frames: int
    prompt_tokens: int  # text tokens of the prompt
    fast_tokens: int  # visual tokens in the LLM sequence in the slow-fast design (0 in "self-attention")
    slow_tokens: int  # pooled tokens of all frames: cross-attended ("slowfast") or in the sequence
    sequence_length: int  # prefill length
    query_tokens: int  # positions that cross-attend to the slow tokens at prefill
    hybrid_layers: int
    llm_prefill_flops: int  # the sum of the four parts below
    prefill_self_attention_flops: int  # q/k/v/o projections, QK^T and AV of every layer
    prefill_mlp_flops: int
    prefill_hybrid_flops: int  # slow key/value projection, cross QK^T and AV, gate
    prefill_lm_head_flops: int  # last position only
    decode_context: int
    decode_flops_per_token: int  # LLM only; slow keys/values come from the cache
    vision_flops: int  # encoder + projector over all frames
    vision_encoder_flops: int
    projector_flops: int
    dtype: str
    parameters: int
    parameter_bytes: int
    kv_cache_bytes: int  # self-attention keys/values of the prefill sequence, all layers
    slow_kv_cache_bytes: int  # projected slow keys/values of all hybrid layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _text_dims(text_config: PretrainedConfig) -> tuple[int, int, int, int, int, int, int]:
    """(hidden D, heads H, kv heads, head_dim, intermediate, vocab, layers) of a Llama-family config."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return (
        hidden,
        heads,
        kv_heads,
        head_dim,
        text_config.intermediate_size,
        text_config.vocab_size,
        text_config.num_hidden_layers,
    )


def decoder_flops(
    text_config: PretrainedConfig,
    new_tokens: int,
    context: int,
    hybrid_layers: int = 0,
    query_tokens: int = 0,
    slow_tokens: int = 0,
    project_slow: bool = True,
) -> dict[str, int]:
    """FLOPs of one LLM forward over `new_tokens` positions attending to `context` keys (KV cache included).

    `hybrid_layers` layers also cross-attend from `query_tokens` positions to `slow_tokens` slow tokens,
    projecting their keys/values first when `project_slow` (prefill; decoding reads them from the cache).
    Logits are computed for the last position only. Returns the parts: self_attention, mlp, hybrid, lm_head.
    """
    hidden, heads, kv_heads, head_dim, intermediate, vocab, layers = _text_dims(text_config)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    projections = 2 * new_tokens * hidden * (2 * q_width + 2 * kv_width)  # q, k, v, o
    scores = 2 * 2 * heads * new_tokens * context * head_dim  # QK^T and AV
    hybrid = 0
    if hybrid_layers and query_tokens and slow_tokens:
        kv_projection = 2 * slow_tokens * hidden * 2 * kv_width if project_slow else 0
        cross = 2 * 2 * heads * query_tokens * slow_tokens * head_dim
        gate = 2 * query_tokens * q_width  # Linear(H * hd, 1)
        hybrid = hybrid_layers * (kv_projection + cross + gate)
    return {
        "self_attention": layers * (projections + scores),
        "mlp": layers * 3 * 2 * new_tokens * hidden * intermediate,  # SwiGLU: gate, up, down
        "hybrid": hybrid,
        "lm_head": 2 * hidden * vocab,
    }


def vision_encoder_flops(vision_config: PretrainedConfig) -> int:
    """FLOPs of the vision encoder on one frame at its native resolution (every layer runs)."""
    size, channels = vision_config.image_size, vision_config.num_channels
    if vision_config.model_type in CNN_MODEL_TYPES:
        # ConvNeXt: stem conv (patch x patch, stride patch), then per stage a 2x2/2 downsampling conv
        # (stages > 0) and blocks of depthwise 7x7 conv + pointwise MLP C -> 4C -> C.
        dims, patch = vision_config.hidden_sizes, vision_config.patch_size
        side = size // patch
        flops = 2 * side * side * channels * patch * patch * dims[0]
        for stage, (dim, depth) in enumerate(zip(dims, vision_config.depths)):
            if stage > 0:
                side //= 2
                flops += 2 * side * side * dims[stage - 1] * 4 * dim
            flops += depth * 2 * side * side * (49 * dim + 2 * dim * 4 * dim)
        return flops
    if vision_config.model_type in VIT_MODEL_TYPES:
        patch, hidden = vision_config.patch_size, vision_config.hidden_size
        intermediate = vision_config.intermediate_size
        patches = (size // patch) ** 2
        tokens = patches + (vision_config.model_type in VIT_WITH_CLASS_TOKEN)
        flops = 2 * patches * channels * patch * patch * hidden
        layer = (
            2 * tokens * 4 * hidden * hidden
            + 2 * 2 * tokens * tokens * hidden
            + 2 * 2 * tokens * hidden * intermediate
        )
        flops += vision_config.num_hidden_layers * layer
        # SigLIP builds its pooling head unless `vision_use_head` is False (configs before 5.20 lack the field)
        if vision_config.model_type == "siglip_vision_model" and getattr(
            vision_config, "vision_use_head", True
        ):
            # SigLIP attention-pooling head: one probe query over all patches, then an MLP on the probe.
            flops += 2 * 2 * hidden * hidden + 2 * 2 * tokens * hidden * hidden + 2 * 2 * tokens * hidden
            flops += 2 * 2 * hidden * intermediate
        return flops
    raise ValueError(
        f"vision_config.model_type {vision_config.model_type!r} is not supported by the FLOP count "
        f"(supported: {CNN_MODEL_TYPES + VIT_MODEL_TYPES})"
    )


def projector_flops(config: SlowFastConfig) -> int:
    """FLOPs of the projector on one frame's full (unpooled) feature grid."""
    h, w = vision_grid(config.vision_config)
    in_features, hidden = vision_feature_size(config.vision_config), config.text_config.hidden_size
    match = re.fullmatch(r"mlp(\d+)x_gelu", config.projector_type)
    depth = int(match.group(1)) if match else 1
    return 2 * h * w * (in_features * hidden + (depth - 1) * hidden * hidden)


def count_parameters(config: SlowFastConfig) -> ParameterCount:
    """Count the parameters of the model `config` describes, by building it on the meta device (no memory)."""
    from .modeling import SlowFastForConditionalGeneration, cross_attention_parameters

    with torch.device("meta"):
        model = SlowFastForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    cross = sum(p.numel() for _, p in cross_attention_parameters(model))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return ParameterCount(
        llm=total - cross - vision - projector, cross_attention=cross, vision=vision, projector=projector
    )


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype named like "bfloat16"."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16', 'float16', 'float32')")
    return torch.empty(0, dtype=torch_dtype).element_size()


def _record(
    config: PretrainedConfig,
    design: str,
    frames: int,
    prompt_tokens: int,
    tokens: tuple[int, int, int, int, int],
    vision: tuple[int, int],
    dtype: str,
    parameters: int,
) -> ComputeRecord:
    """One `ComputeRecord` from the token counts `(fast, slow, sequence, queries, hybrid_layers)` and the
    vision `(encoder, projector)` FLOPs: the LLM's prefill and first decoding step, the caches."""
    fast, slow, sequence, queries, hybrid_layers = tokens
    element = dtype_bytes(dtype)
    _, _, kv_heads, head_dim, _, _, layers = _text_dims(config.text_config)
    prefill = decoder_flops(config.text_config, sequence, sequence, hybrid_layers, queries, slow)
    decode_queries = 1 if config.generated_tokens_see_slow else 0
    decode = decoder_flops(
        config.text_config, 1, sequence + 1, hybrid_layers, decode_queries, slow, project_slow=False
    )
    encoder, projector = vision
    return ComputeRecord(
        design=design,
        frames=frames,
        prompt_tokens=prompt_tokens,
        fast_tokens=fast,
        slow_tokens=slow,
        sequence_length=sequence,
        query_tokens=queries,
        hybrid_layers=hybrid_layers,
        llm_prefill_flops=sum(prefill.values()),
        prefill_self_attention_flops=prefill["self_attention"],
        prefill_mlp_flops=prefill["mlp"],
        prefill_hybrid_flops=prefill["hybrid"],
        prefill_lm_head_flops=prefill["lm_head"],
        decode_context=sequence + 1,
        decode_flops_per_token=sum(decode.values()),
        vision_flops=encoder + projector,
        vision_encoder_flops=encoder,
        projector_flops=projector,
        dtype=dtype,
        parameters=parameters,
        parameter_bytes=parameters * element,
        kv_cache_bytes=2 * layers * kv_heads * head_dim * sequence * element,
        slow_kv_cache_bytes=2 * hybrid_layers * kv_heads * head_dim * slow * element,
    )


def estimate(
    config: SlowFastConfig,
    frames: int,
    prompt_tokens: int = 64,
    design: str = "slowfast",
    dtype: str = "bfloat16",
    parameters: ParameterCount | None = None,
) -> ComputeRecord:
    """FLOPs and memory of `design` ("slowfast" or "self-attention") on one video of `frames` frames.

    `prompt_tokens` counts the text tokens of the prompt (every one of them queries the slow tokens;
    with `mask_system_tokens` the video is assumed to come first). `parameters` may be passed to
    avoid recounting them (`count_parameters(config)`) across calls.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be an integer >= 0, got {prompt_tokens!r}")
    parameters = parameters or count_parameters(config)
    grid = slow_grid(vision_grid(config.vision_config), frames, config.video_pooling_stride)
    slow = frames * grid[0] * grid[1]
    if design == "slowfast":
        fast = fast_token_count(frames, grid, config)
        sequence = prompt_tokens + fast
        hybrid_layers = len(config.hybrid_layer_indices)
        queries = prompt_tokens + (fast if config.cross_attn_queries == "all" else 0)
    else:
        fast, sequence, hybrid_layers, queries = 0, prompt_tokens + slow, 0, 0
    vision = frames * vision_encoder_flops(config.vision_config), frames * projector_flops(config)
    param_total = parameters.llm + parameters.vision + parameters.projector
    param_total += parameters.cross_attention if design == "slowfast" else 0
    tokens = (fast, slow, sequence, queries, hybrid_layers)
    return _record(config, design, frames, prompt_tokens, tokens, vision, dtype, param_total)


def qwen_vl_vision_flops(vision_config: PretrainedConfig, height: int, width: int) -> tuple[int, int]:
    """(encoder, patch mergers) FLOPs of a Qwen-VL vision tower on one temporal patch of `height x width`
    pixels: patch embedding; blocks attending within the temporal patch (Qwen2.5-VL: within `window_size`
    windows except in `fullatt_block_indexes`, gated MLP; Qwen3-VL: full attention, plain MLP); the
    merger MLP on merged tokens (Qwen3-VL: also one per `deepstack_visual_indexes`)."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    hidden, intermediate = vision_config.hidden_size, vision_config.intermediate_size
    tokens = (height // patch) * (width // patch)
    full_attention = getattr(vision_config, "fullatt_block_indexes", None)
    if full_attention is not None:  # Qwen2.5-VL
        window = vision_config.window_size // merge // patch  # merged units per window side

        def squared_sides(units: int) -> int:  # window side lengths squared, summed along one axis
            return (units // window) * window**2 + (units % window) ** 2

        window_pairs = (
            merge**4 * squared_sides(height // patch // merge) * squared_sides(width // patch // merge)
        )
        mlp, mergers = 3 * 2 * tokens * hidden * intermediate, 1
    else:  # Qwen3-VL
        full_attention, window_pairs = range(vision_config.depth), 0
        mlp, mergers = 2 * 2 * tokens * hidden * intermediate, 1 + len(vision_config.deepstack_visual_indexes)
    encoder = (
        2 * tokens * vision_config.in_channels * vision_config.temporal_patch_size * patch * patch * hidden
    )
    for block in range(vision_config.depth):
        pairs = tokens * tokens if block in full_attention else window_pairs
        encoder += 2 * tokens * 4 * hidden * hidden + 2 * 2 * pairs * hidden + mlp
    merged, width_in = tokens // merge**2, hidden * merge**2
    return encoder, mergers * 2 * merged * width_in * (width_in + vision_config.out_hidden_size)


def host_estimate(
    config: PretrainedConfig,
    frames: int,
    height: int,
    width: int,
    prompt_tokens: int = 64,
    design: str = "slowfast",
    dtype: str = "bfloat16",
) -> ComputeRecord:
    """FLOPs and memory of a Qwen2.5-VL / Qwen3-VL host with the slow branch (`design="slowfast"`: the fast
    temporal patches in the sequence, every one cross-attended) or of the host itself given all `frames`
    (`"self-attention"`), on one video of `frames` frames of `height x width` pixels (the size after the
    processor's resize: multiples of `patch_size * spatial_merge_size`). Conventions as in `estimate`;
    Qwen3-VL's text times are counted as prompt tokens; its slow-fast model encodes the fast frames twice
    (`host_encodes_fast_frames`)."""
    from .hosts import HOST_FAMILIES
    from .hosts.qwen2_5_vl import fast_temporal_patches
    from .modeling import cross_attention_parameters

    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    vision = config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"height and width must be multiples of {patch * merge}, got {height} x {width}")
    family = next(f for f in HOST_FAMILIES if f.model.config_class is type(config))
    with torch.device("meta"):
        model = family.model(config)
    cross = sum(p.numel() for _, p in cross_attention_parameters(model))
    parameters = sum(p.numel() for p in model.parameters()) - (cross if design != "slowfast" else 0)
    patches = -(-frames // temporal)  # the host pads the last temporal patch with copies of the last frame
    merged_h, merged_w = height // patch // merge, width // patch // merge
    stride = config.video_pooling_stride
    fast_patches = len(fast_temporal_patches(patches, config.fast_frames, temporal))
    encoded = patches + (
        fast_patches if design == "slowfast" and family.model.host_encodes_fast_frames else 0
    )
    if design == "slowfast":
        fast = fast_patches * merged_h * merged_w
        slow = patches * (merged_h // stride) * (merged_w // stride)
        sequence, hybrid_layers = prompt_tokens + fast, len(config.hybrid_layer_indices)
        queries = prompt_tokens + (fast if config.cross_attn_queries == "all" else 0)
    else:
        fast, slow, hybrid_layers, queries = 0, patches * merged_h * merged_w, 0, 0
        sequence = prompt_tokens + slow
    vision_flops = tuple(encoded * flops for flops in qwen_vl_vision_flops(vision, height, width))
    tokens = (fast, slow, sequence, queries, hybrid_layers)
    return _record(config, design, frames, prompt_tokens, tokens, vision_flops, dtype, parameters)


# ----- command line: `slowfast-vlm flops` ------------------------------------------------------------
def parse_value(text: str):
    """A `--set` value: JSON (int, float, true/false/null, lists) or Python's True/False/None, else a string."""
    python_literals = {"True": True, "False": False, "None": None}
    if text in python_literals:
        return python_literals[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: SlowFastConfig, overrides: list[str]) -> SlowFastConfig:
    """Apply `key=value` overrides in place (`text_config.key` / `vision_config.key` reach the sub-configs)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        target, name = config, key
        if "." in key:
            sub, name = key.split(".", 1)
            if sub not in ("text_config", "vision_config"):
                raise ValueError(
                    f"--set {item!r}: only text_config.<key> and vision_config.<key> may be dotted"
                )
            target = getattr(config, sub)
        if not hasattr(target, name):
            raise ValueError(f"--set {item!r}: {type(target).__name__} has no field {name!r}")
        setattr(target, name, parse_value(text))
    config.validate_slowfast()
    return config


def flops_config(preset: str | None, path: str | None) -> SlowFastConfig:
    if path is not None:
        location = Path(path)
        if not location.exists():
            raise ValueError(f"--config {path}: no such file or directory")
        if location.is_file():
            return SlowFastConfig.from_json_file(str(location))
        return SlowFastConfig.from_pretrained(str(location))
    if preset not in NAMED_CONFIGS:
        raise ValueError(f"--preset {preset!r} is unknown; choose one of {', '.join(NAMED_CONFIGS)}")
    return SlowFastConfig.from_name(preset)


def _human(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


TABLE_COLUMNS = (
    ("design", "design", str),
    ("frames", "frames", str),
    ("fast", "fast_tokens", str),
    ("slow", "slow_tokens", str),
    ("seq", "sequence_length", str),
    ("prefill", "llm_prefill_flops", lambda v: _human(v, "FLOP")),
    ("self-attn", "prefill_self_attention_flops", _human),
    ("mlp", "prefill_mlp_flops", _human),
    ("hybrid", "prefill_hybrid_flops", _human),
    ("decode/token", "decode_flops_per_token", _human),
    ("vision", "vision_flops", _human),
    ("params", "parameter_bytes", lambda v: _human(v, "B")),
    ("kv cache", "kv_cache_bytes", lambda v: _human(v, "B")),
    ("slow kv", "slow_kv_cache_bytes", lambda v: _human(v, "B")),
)


def format_table(records: list[ComputeRecord]) -> str:
    """An aligned plain-text table, one row per record."""
    rows = [[title for title, _, _ in TABLE_COLUMNS]]
    rows += [[fmt(getattr(record, field)) for _, field, fmt in TABLE_COLUMNS] for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main(args: argparse.Namespace) -> int:
    try:
        config = apply_overrides(flops_config(args.preset, args.config), args.overrides)
        parameters = count_parameters(config)
        records = [
            estimate(config, frames, args.prompt_tokens, design, args.dtype, parameters)
            for frames in args.frames
            for design in args.design
        ]
    except ValueError as error:
        print(f"slowfast-vlm flops: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps([r.to_dict() for r in records], indent=2) if args.json else format_table(records))
    return 0
