"""The reference implementation's checkpoint format ("llava_qwen_slow_fast"), read into this library's.

The paper's released checkpoints keep the Qwen2 fields at the top level of config.json, the slow-fast
knobs under their training-script names and the weights under LLaVA names. Their config only names the
vision tower (mm_vision_tower): its config comes from what that name resolves to offline (a local
model directory, a model in the local Hugging Face cache, or a known tower), its sizes from its
weights, and a vision config given here overrides both.

`SlowFastForConditionalGeneration.from_pretrained` reads such checkpoints through this module, and the
`slowfast-vlm convert` command (`slowfast_vlm.convert`) saves them in this library's format.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, Qwen2Config

from ..config import SlowFastConfig
from .vision import CNN_MODEL_TYPES

REFERENCE_MODEL_TYPES = ("llava_qwen_slow_fast",)
# Reference gating names -> SlowFastConfig.gate_type. Only this one has a counterpart here.
GATING_TYPES = {"whole-dynamic-tanh-warmup": "tanh-warmup"}
# Reference fields read without a default (the slow branch cannot be built without them).
REQUIRED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "mm_vision_tower",
    "mm_video_pooling_stride",
    "cross_attn_every_n_layers",
    "cross_attn_implementation",
    "cross_attn_gating_type",
    "fast_token_spatial_stride",
    "fast_token_temporal_stride",
    "fast_token_temporal_sampling_stride",
)
# Vision config fields that must be known to build each kind of tower.
VIT_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)
VISION_REQUIRED_FIELDS = {
    "siglip_vision_model": VIT_REQUIRED_FIELDS,
    "clip_vision_model": VIT_REQUIRED_FIELDS,
    "convnext": ("hidden_sizes", "depths", "num_stages", "image_size", "patch_size"),
}
VISION_MODEL_TYPE_ALIASES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}
# The ConvNeXt-XXL CLIP tower of the released checkpoints (timm `convnext_xxlarge`, open_clip weights).
CONVNEXT_XXL = {
    "model_type": "convnext",
    "num_stages": 4,
    "depths": [3, 4, 30, 3],
    "hidden_sizes": [384, 768, 1536, 3072],
    "patch_size": 4,
}
# Tower names the reference builds by itself rather than from a transformers config: its builder maps
# "convnext-576" (the released checkpoints' mm_vision_tower) to timm's "convnext_xxlarge.clip_laion2b_soup"
# at 576 px; that timm name alone leaves the input size to `input_image_size`.
KNOWN_TOWERS = {
    "convnext-576": {**CONVNEXT_XXL, "image_size": 576},
    "convnext_xxlarge.clip_laion2b_soup": CONVNEXT_XXL,
}
# timm's ConvNeXt (the reference's only CNN tower) normalises every LayerNorm with this eps.
TIMM_CONVNEXT_NORM_EPS = 1e-5
# Tower names -> model type, first match wins ("convnext-xxl-clip" is a ConvNeXt).
TOWER_NAME_HINTS = (
    ("convnext", "convnext"),
    ("siglip", "siglip_vision_model"),
    ("clip", "clip_vision_model"),
)

REFERENCE_TOWER_PREFIX = "model.vision_tower.vision_tower."
TOWER_PREFIX = "model.vision_tower."
# Reference weight names -> ours:
#     model.embed_tokens / model.layers.N / model.norm   ->  model.language_model.*
#     model.mm_projector.{0,2}                           ->  model.multi_modal_projector.{0,2}
#     model.vision_tower.vision_tower.vision_model.*     ->  model.vision_tower.*  (SigLIP / CLIP, 4.x layout)
#     model.vision_tower.vision_tower.stem / stages.*    ->  model.vision_tower.*  (timm -> HF ConvNext)
#     lm_head                                            ->  lm_head
# The hybrid layers' cross_attn_kv_proj rows are already in HybridAttention's per-head
# (head, [key | value], head_dim) layout and are copied as they are.
# (reference prefix, our prefix), first match wins; the tower's own names are mapped by TOWER_RULES.
PREFIX_RULES = (
    (REFERENCE_TOWER_PREFIX, TOWER_PREFIX),
    ("model.mm_projector.", "model.multi_modal_projector."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
VIT_RULES = ((r"^vision_model\.", ""),)  # transformers 4.x `*VisionModel.vision_model` level
# timm ConvNeXt (the reference's ConvNeXt-XXL CLIP tower) -> transformers ConvNextModel.
CONVNEXT_RULES = (
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.stages.\1.layers.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(weight|gamma)$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
)
TOWER_RULES = {
    "siglip_vision_model": VIT_RULES,
    "clip_vision_model": VIT_RULES,
    "convnext": CONVNEXT_RULES,
}
# Reference weights with no counterpart here: the ConvNeXt CLIP head (unused by the feature path) and
# RoPE frequencies that older transformers versions saved.
DROPPED_KEYS = re.compile(
    r"^model\.vision_tower\.vision_tower\.head\.(fc|pre_logits)\.|\.rotary_emb\.inv_freq$"
)
WARM_UP_GATE = "cross_attn_warm_up_gate"
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

Shapes = Mapping[str, Sequence[int]]


# ----- config -------------------------------------------------------------------------------------
def load_vision_config(spec: str | os.PathLike | Mapping | PretrainedConfig) -> dict[str, Any]:
    """A vision config given as a dict, a JSON string, a `config.json` file, a model directory or a
    `PretrainedConfig` -> a plain dict (a full CLIP / SigLIP model config gives its `vision_config`)."""
    if isinstance(spec, PretrainedConfig):
        spec = getattr(spec, "vision_config", None) or spec
        fields = spec.to_dict()
    elif isinstance(spec, Mapping):
        fields = dict(spec)
    elif isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ValueError(f"vision_config: invalid JSON {spec!r}: {error}") from None
    elif Path(spec).is_dir():
        return load_vision_config(AutoConfig.from_pretrained(spec))
    elif Path(spec).is_file():
        fields = json.loads(Path(spec).read_text())
    else:
        raise ValueError(
            f"vision_config: {spec!r} is neither a JSON object, a config.json file nor a model directory"
        )
    if isinstance(fields.get("vision_config"), Mapping):
        fields = dict(fields["vision_config"])
    for key in ("architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    if "model_type" in fields:
        fields["model_type"] = VISION_MODEL_TYPE_ALIASES.get(fields["model_type"], fields["model_type"])
    return fields


def _tower_directory(tower_name: str) -> Path | None:
    """The local directory `tower_name` names: itself, or its snapshot in the local Hugging Face cache
    (looked up on disk only: not even a metadata request)."""
    if tower_name and Path(tower_name).is_dir():
        return Path(tower_name)
    try:
        cached = try_to_load_from_cache(tower_name, "config.json")
    except ValueError:  # not a repository id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_tower_config(tower_name: str) -> dict[str, Any]:
    """The vision config fields that `mm_vision_tower` names, found without the network: a local model
    directory, else a hub id already in the local Hugging Face cache, else a `KNOWN_TOWERS` entry; `{}`
    if it names none of these."""
    directory = _tower_directory(tower_name)
    if directory is not None:
        try:
            return load_vision_config(directory)
        except (OSError, ValueError):  # no transformers config there
            pass
    return dict(KNOWN_TOWERS.get(tower_name, {}))


def tower_family(tower_name: str, weight_shapes: Shapes | None = None) -> str | None:
    """The vision model type of the reference tower, from its weight names, else from its name."""
    names = [
        k[len(REFERENCE_TOWER_PREFIX) :] for k in weight_shapes or () if k.startswith(REFERENCE_TOWER_PREFIX)
    ]
    if any(n.startswith(("stem.", "embeddings.patch_embeddings.")) for n in names):
        return "convnext"
    if any(n.startswith(("vision_model.", "embeddings.patch_embedding.")) for n in names):
        return "clip_vision_model" if any("class_embedding" in n for n in names) else "siglip_vision_model"
    return next((model_type for key, model_type in TOWER_NAME_HINTS if key in tower_name.lower()), None)


def rename_tower_key(name: str, model_type: str) -> str:
    """A reference tower weight name (below `model.vision_tower.vision_tower.`) -> our tower's name."""
    for pattern, replacement in TOWER_RULES.get(model_type, ()):
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


def infer_vision_fields(model_type: str, tower_shapes: Shapes) -> dict[str, Any]:
    """The vision config fields that the tower's weight shapes determine (names as in our tower)."""
    fields: dict[str, Any] = {}
    if model_type in CNN_MODEL_TYPES:
        stem = tower_shapes.get("embeddings.patch_embeddings.weight")  # (C_0, channels, p, p)
        if stem is not None:
            fields.update(num_channels=stem[1], patch_size=stem[2])
        channels: dict[int, dict[int, int]] = {}  # stage -> {layer: channels of its depthwise conv}
        for key, shape in tower_shapes.items():
            if match := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight", key):
                channels.setdefault(int(match[1]), {})[int(match[2])] = shape[0]
        if channels and set(channels) == set(range(len(channels))):
            stages = [channels[i] for i in range(len(channels))]
            fields.update(
                num_stages=len(stages),
                depths=[len(stage) for stage in stages],
                hidden_sizes=[max(stage.values()) for stage in stages],
            )
        return fields
    patch = tower_shapes.get("embeddings.patch_embedding.weight")  # (hidden, channels, p, p)
    # (grid cells [+ class token], hidden)
    positions = tower_shapes.get("embeddings.position_embedding.weight")
    if patch is not None:
        fields.update(hidden_size=patch[0], num_channels=patch[1], patch_size=patch[2])
        if positions is not None:
            cells = positions[0] - (model_type == "clip_vision_model")
            if math.isqrt(cells) ** 2 == cells:
                fields["image_size"] = math.isqrt(cells) * patch[2]
    layers = {int(m.group(1)) for k in tower_shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if layers:
        fields["num_hidden_layers"] = max(layers) + 1
    if "encoder.layers.0.mlp.fc1.weight" in tower_shapes:
        fields["intermediate_size"] = tower_shapes["encoder.layers.0.mlp.fc1.weight"][0]
    if model_type == "siglip_vision_model" and patch is not None:
        # LLaVA-style towers may drop the attention-pooling head: build ours without it too.
        fields["vision_use_head"] = any(k.startswith("head.") for k in tower_shapes)
    return fields


def reference_image_size(reference_config: Mapping[str, Any]) -> int | None:
    """The tower's input size when its weights cannot tell (CNNs): `input_image_size`, else the
    number ending the tower name (`convnext-576`)."""
    size = reference_config.get("input_image_size")
    if isinstance(size, int):
        return size
    match = re.search(r"(\d+)$", str(reference_config.get("mm_vision_tower", "")).rstrip("/"))
    return int(match.group(1)) if match else None


def convert_vision_config(
    reference_config: Mapping[str, Any],
    vision_config: str | os.PathLike | Mapping | PretrainedConfig | None = None,
    weight_shapes: Shapes | None = None,
) -> PretrainedConfig:
    """The vision encoder's config: the fields of the tower `mm_vision_tower` resolves to (see
    `resolve_tower_config`), overridden by those inferred from the weights, then by `vision_config`."""
    tower_name = str(reference_config.get("mm_vision_tower", ""))
    given = load_vision_config(vision_config) if vision_config is not None else {}
    resolved = resolve_tower_config(tower_name)
    model_type = (
        given.get("model_type") or resolved.get("model_type") or tower_family(tower_name, weight_shapes)
    )
    if model_type not in VISION_REQUIRED_FIELDS:
        raise ValueError(
            f"cannot tell the vision tower type of {tower_name!r} (got {model_type!r}); pass vision_config with a "
            f"model_type in {sorted(VISION_REQUIRED_FIELDS)}"
        )
    tower_shapes = {
        rename_tower_key(k[len(REFERENCE_TOWER_PREFIX) :], model_type): v
        for k, v in (weight_shapes or {}).items()
        if k.startswith(REFERENCE_TOWER_PREFIX)
    }
    # a resolved config of another model type (vision_config overrode it) has nothing to give
    fields = dict(resolved) if resolved.get("model_type") == model_type else {}
    fields.update(infer_vision_fields(model_type, tower_shapes))
    if model_type in CNN_MODEL_TYPES:
        fields["layer_norm_eps"] = TIMM_CONVNEXT_NORM_EPS  # the final norm, as timm's head norm
        if reference_image_size(reference_config):
            fields["image_size"] = reference_image_size(reference_config)
    fields.update(given)
    fields["model_type"] = model_type
    missing = [f for f in VISION_REQUIRED_FIELDS[model_type] if f not in fields]
    if missing:
        found = (
            "its weights do not determine" if tower_shapes else "the checkpoint has no tower weights to infer"
        )
        if not resolved:
            found += (
                f" and the name is neither a local model directory, a model in the local Hugging Face cache "
                f"nor a known tower ({', '.join(KNOWN_TOWERS)})"
            )
        raise ValueError(
            f"the vision tower {tower_name!r} ({model_type}) needs {missing}, which {found}; pass vision_config "
            f"as a JSON object with them (e.g. '{{\"{missing[0]}\": ...}}') or a directory holding the tower's "
            f"transformers config.json"
        )
    return AutoConfig.for_model(**fields)


def convert_reference_config(
    reference_config: Mapping[str, Any],
    vision_config: str | os.PathLike | Mapping | PretrainedConfig | None = None,
    weight_shapes: Shapes | None = None,
) -> SlowFastConfig:
    """A reference `config.json` (as a dict) -> the equivalent `SlowFastConfig`.

    Args:
        reference_config: the checkpoint's config, `model_type` "llava_qwen_slow_fast".
        vision_config: the vision tower's config, which reference configs only name
            (`mm_vision_tower`): a dict / JSON string of fields (merged over those of the named tower
            and those inferred from `weight_shapes`), a `config.json` file, a model directory or a
            `PretrainedConfig`. Needed only where the name resolves to nothing and the weights leave
            fields open.
        weight_shapes: `{reference weight name: shape}`, to infer the tower's sizes.
    """
    model_type = reference_config.get("model_type")
    if model_type not in REFERENCE_MODEL_TYPES:
        raise ValueError(
            f"not a reference slow-fast config: model_type {model_type!r}, expected {REFERENCE_MODEL_TYPES}"
        )
    missing = [f for f in REQUIRED_FIELDS if reference_config.get(f) is None]
    if missing:
        raise ValueError(f"reference config lacks {missing}")
    gating = reference_config["cross_attn_gating_type"]
    if gating not in GATING_TYPES:
        raise ValueError(f"unknown cross_attn_gating_type {gating!r}: supported are {sorted(GATING_TYPES)}")
    implementation = reference_config["cross_attn_implementation"]
    # The reference dispatches on these prefixes; "masksystem" is honoured only by the text-only path.
    if implementation.startswith("text-only-vanilla"):
        queries, mask_system = "text", "masksystem" in implementation
    elif implementation.startswith("vanilla"):
        queries, mask_system = "all", False
    else:
        raise ValueError(
            f"unknown cross_attn_implementation {implementation!r}: expected one starting with "
            f"'text-only-vanilla' (text tokens query) or 'vanilla' (all tokens query)"
        )

    text_fields = set(Qwen2Config().to_dict()) | {"rope_theta", "rope_scaling"}
    text_fields -= {"architectures", "transformers_version", "_name_or_path", "dtype", "model_type"}
    text_config = {k: v for k, v in reference_config.items() if k in text_fields}
    vision = convert_vision_config(reference_config, vision_config, weight_shapes)
    return SlowFastConfig(
        text_config={**text_config, "model_type": "qwen2"},
        vision_config=vision,
        projector_type=reference_config.get("mm_projector_type", "linear"),
        # the reference's ConvNeXt tower always takes its last stage
        vision_feature_layer=-1
        if vision.model_type in CNN_MODEL_TYPES
        else reference_config.get("mm_vision_select_layer", -1),
        vision_norm_eps=TIMM_CONVNEXT_NORM_EPS if vision.model_type in CNN_MODEL_TYPES else None,
        video_pooling_stride=reference_config["mm_video_pooling_stride"],
        fast_temporal_sampling_stride=reference_config["fast_token_temporal_sampling_stride"],
        fast_temporal_pooling_stride=reference_config["fast_token_temporal_stride"],
        fast_spatial_pooling_stride=reference_config["fast_token_spatial_stride"],
        min_fast_frames=reference_config.get("min_fast_frames") or 1,
        hybrid_every_n_layers=reference_config["cross_attn_every_n_layers"],
        hybrid_min_depth=reference_config.get("cross_attn_min_layer_depth") or 0,
        hybrid_max_depth=reference_config.get("cross_attn_max_layer_depth"),
        cross_attn_queries=queries,
        mask_system_tokens=mask_system,
        gate_type=GATING_TYPES[gating],
        tie_word_embeddings=bool(reference_config.get("tie_word_embeddings", False)),
    )


# ----- weights ------------------------------------------------------------------------------------
def rename_reference_key(name: str, config: SlowFastConfig) -> str | None:
    """A reference weight name -> ours; None for weights with no counterpart here (`DROPPED_KEYS`)."""
    if DROPPED_KEYS.search(name):
        return None
    for old, new in PREFIX_RULES:
        if name.startswith(old):
            rest = name[len(old) :]
            if old == REFERENCE_TOWER_PREFIX:
                rest = rename_tower_key(rest, config.vision_config.model_type)
            return new + rest
    return name


def map_reference_keys(
    weight_shapes: Shapes, config: SlowFastConfig, expected: Shapes, optional: set[str]
) -> dict[str, str]:
    """`{reference name: our name}` for every weight to load, given the model's `{name: shape}` and the
    names that may be absent (tied to another); raises naming every missing, unexpected or mis-shaped
    weight."""
    mapping = {}
    for name in weight_shapes:
        ours = rename_reference_key(name, config)
        if ours is not None:
            mapping[name] = ours
    unexpected = sorted(ref for ref, ours in mapping.items() if ours not in expected)
    missing = sorted(set(expected) - set(mapping.values()) - optional)
    mismatched = [
        f"{ref} {tuple(weight_shapes[ref])} -> {ours} {expected[ours]}"
        for ref, ours in mapping.items()
        if ours in expected
        and tuple(weight_shapes[ref]) != expected[ours]
        # the warm-up gate may be stored as a scalar or as (1,)
        and not (ours.endswith(WARM_UP_GATE) and math.prod(weight_shapes[ref]) == math.prod(expected[ours]))
    ]
    problems = []
    if missing:
        hint = ""
        if all(k.startswith(TOWER_PREFIX) for k in missing):
            hint = (
                f" (the checkpoint has no weights for the vision tower: expected {REFERENCE_TOWER_PREFIX}*)"
            )
        problems.append(f"{len(missing)} missing weights{hint}: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights: {_some(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights with the wrong shape: {_some(mismatched)}")
    if problems:
        raise ValueError("reference checkpoint does not match its config: " + "; ".join(problems))
    return mapping


def _some(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def convert_reference_tensor(name: str, tensor, config: SlowFastConfig):
    """Our value of weight `name` from the reference's (a tensor, or a lazy safetensors slice that is
    returned as is unless it needs changing)."""
    if not name.endswith(WARM_UP_GATE):
        return tensor
    gate = tensor[...].reshape(1)
    if config.cross_attn_queries == "all":
        # The reference's "vanilla" path multiplies by the raw warm-up gate w, the text-only path (and
        # ours) by tanh(w): store atanh(w).
        if gate.abs().max() >= 1:
            raise ValueError(
                f"{name}: warm-up gate {gate.item():.4f} of a 'vanilla' checkpoint has no tanh equivalent (|w| >= 1)"
            )
        gate = torch.atanh(gate.float()).to(gate.dtype)
    return gate


def convert_reference_state_dict(
    tensors: Mapping[str, Any], config: SlowFastConfig, expected: Shapes, optional: set[str]
) -> dict[str, Any]:
    """A reference state dict (tensors, or lazy safetensors slices) -> ours for `config` (from
    `convert_reference_config`), whose model has the weights `expected` (`optional` may be absent).

    Renames every weight, drops those with no counterpart, reshapes the warm-up gates; raises naming
    any missing, unexpected or mis-shaped weight.
    """
    mapping = map_reference_keys({k: weight_shape(v) for k, v in tensors.items()}, config, expected, optional)
    return {ours: convert_reference_tensor(ours, tensors[ref], config) for ref, ours in mapping.items()}


# ----- checkpoints --------------------------------------------------------------------------------
def local_checkpoint_dir(path: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> Path:
    """A local checkpoint directory, downloading a hub repository id if needed."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), **hub_kwargs))


def read_config(path: str | os.PathLike | None, hub_kwargs: Mapping[str, Any]) -> dict | None:
    """The checkpoint's config.json as a dict, or None if there is none to read."""
    if path is None:
        return None
    if Path(path).is_dir():
        file = Path(path) / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from transformers.utils import cached_file

    try:
        file = cached_file(
            str(path),
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except (OSError, ValueError):  # not a repository id, or the hub cannot be reached
        return None
    return json.loads(Path(file).read_text()) if file else None


def is_reference_checkpoint(path: str | os.PathLike | None, **kwargs) -> bool:
    """Whether `path` (a directory or a hub repository id) holds a reference-format checkpoint."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    config = read_config(path, {k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    return config is not None and config.get("model_type") in REFERENCE_MODEL_TYPES


def reference_weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: the shards of an index, else a single file."""
    for index_name in WEIGHT_INDEXES:
        index = directory / index_name
        if index.is_file():
            shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            files = [directory / shard for shard in shards]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index}: shards {absent} are missing from {directory}")
            return files
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{directory} holds no weights: expected one of {WEIGHT_INDEXES + WEIGHT_FILES}")


def open_weights(files: list[Path], stack: ExitStack) -> dict[str, Any]:
    """`{name: lazy tensor}` over all files: safetensors slices (read when loaded) or mmapped tensors."""
    tensors: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(file, framework="pt"))
            tensors.update({name: handle.get_slice(name) for name in handle.keys()})
        else:
            tensors.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return tensors


def weight_shape(tensor) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy safetensors slice."""
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def weight_dtype(tensor) -> torch.dtype:
    """Dtype of a tensor or of a lazy safetensors slice."""
    return (
        tensor.dtype
        if isinstance(tensor, torch.Tensor)
        else SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.int64)
    )


@dataclass
class ReferenceCheckpoint:
    """An open reference checkpoint: its converted config, its weights (reference names -> tensors or
    lazy safetensors slices, valid while open) and the dtype they are stored in."""

    directory: Path
    config: SlowFastConfig
    tensors: dict[str, Any]
    dtype: torch.dtype | str


@contextmanager
def open_reference_checkpoint(
    path: str | os.PathLike,
    vision_config: str | os.PathLike | Mapping | PretrainedConfig | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[ReferenceCheckpoint]:
    """Open a reference checkpoint (directory or hub repository id); its weights are read lazily, tensor
    by tensor from safetensors shards (or mmapped `.bin` files), until the context closes."""
    directory = local_checkpoint_dir(path, hub_kwargs or {})
    reference_config = read_config(directory, {})
    if reference_config is None:
        raise ValueError(f"{directory} has no config.json")
    with ExitStack() as stack:
        tensors = open_weights(reference_weight_files(directory), stack)
        shapes = {name: weight_shape(tensor) for name, tensor in tensors.items()}
        config = convert_reference_config(reference_config, vision_config, shapes)
        # as from_pretrained: the config's dtype, else the weights'
        dtype = reference_config.get("torch_dtype") or reference_config.get("dtype")
        dtype = dtype or next(d for d in map(weight_dtype, tensors.values()) if d.is_floating_point)
        yield ReferenceCheckpoint(directory, config, tensors, dtype)
