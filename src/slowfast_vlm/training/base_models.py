"""A new slow-fast model from a base causal LM checkpoint and a vision encoder checkpoint (how stage 1
starts), built the way `from_pretrained` builds a saved slow-fast model, so that it is partitioned
wherever that is:

- the two checkpoints' safetensors files are memory-mapped and their weights renamed to ours (nothing is
  read yet);
- `SlowFastForConditionalGeneration.from_pretrained(None, state_dict=...)` builds the model from them.
  Without DeepSpeed the parameters are the mapped file pages (FSDP2's `fully_shard` then copies each
  process's own shard; DDP copies the whole model when it moves it to its device). Under ZeRO-3
  (`TrainingArguments` holding the DeepSpeed config) transformers builds inside `deepspeed.zero.Init`:
  each process allocates only its partition, and rank 0 copies the values in one module at a time;
- the new parameters (projector, each hybrid layer's cross-attention key/value projection and gate) are
  then drawn from torch's generator reset to `seed`, in module order, on whole parameters (gathered under
  ZeRO-3, where rank 0's values are kept): every process, and a single-process build, get the same values.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_utils import set_zero3_state
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from ..config import SlowFastConfig
from ..modeling.hybrid import CROSS_ATTN_PARAM_PREFIXES, gathered_for_init
from ..modeling.model import SlowFastForConditionalGeneration
from ..modeling.reference_format import (
    local_checkpoint_dir,
    open_weights,
    reference_weight_files,
    weight_dtype,
    weight_shape,
)

LANGUAGE_MODEL = "model.language_model."
VISION_TOWER = "model.vision_tower."
LM_HEAD = "lm_head.weight"
WEIGHTS_ONLY = {"allow_patterns": ["*.json", "*.safetensors"]}  # a hub repository's download: no .bin copies


def vision_encoder_config(config: PretrainedConfig) -> PretrainedConfig:
    """The encoder's config: a two-tower model's (SigLIP, CLIP) vision tower, else the config itself."""
    return getattr(config, "vision_config", None) or config


def base_config(llm: str, vision: str, knobs: dict[str, Any]) -> SlowFastConfig:
    """The slow-fast config of a model built from the causal LM `llm` and the encoder `vision` (hub ids or
    directories) with the `SlowFastConfig` `knobs`."""
    vision_config = vision_encoder_config(AutoConfig.from_pretrained(vision))
    text_config = AutoConfig.from_pretrained(llm)
    return SlowFastConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **knobs)


def _rename(keys: list[str], base_prefix: str, ours: str, expected: set[str]) -> dict[str, str]:
    """`{our name: checkpoint name}` for the checkpoint `keys` that are a weight `ours + key` of our model,
    with the checkpoint's base-model prefix (`model.` of a causal LM, `convnext.` ...) or without it."""
    mapping = {}
    for key in keys:
        name = key[len(base_prefix) + 1 :] if key.startswith(base_prefix + ".") else key
        if ours + name in expected:
            mapping[ours + name] = key
    return mapping


def base_weights(
    config: SlowFastConfig, llm: dict[str, Any], vision: dict[str, Any], llm_prefix: str, vision_prefix: str
) -> dict[str, Any]:
    """Our `{name: weight}` from the LLM's and the encoder's `{name: weight}` (lazy safetensors slices);
    raises naming what does not fit. Weights our model has no place for (a text tower, a classifier) are
    left out; the model's only weights that neither holds are the new ones."""
    with set_zero3_state():  # a meta-device skeleton: transformers must not open deepspeed.zero.Init for it
        shapes, tied = SlowFastForConditionalGeneration.expected_weights(config)
    expected = set(shapes)
    text = _rename(list(llm), llm_prefix, LANGUAGE_MODEL, expected)
    # an LLM with tied embeddings has no lm_head weight: an untied slow-fast model starts from the embeddings
    head = LM_HEAD if LM_HEAD in llm else text.get(LANGUAGE_MODEL + "embed_tokens.weight")
    if head is not None and LM_HEAD not in tied:
        text[LM_HEAD] = head
    tower = _rename(list(vision), vision_prefix, VISION_TOWER, expected)
    new = {
        n
        for n in expected
        if n.startswith(LANGUAGE_MODEL) and any(f".{p}" in n for p in CROSS_ATTN_PARAM_PREFIXES)
    }
    for source, mapping, wanted in (
        ("model.llm", text, {n for n in expected if n.startswith(LANGUAGE_MODEL)} - new | {LM_HEAD}),
        ("model.vision", tower, {n for n in expected if n.startswith(VISION_TOWER)}),
    ):
        missing = sorted(wanted - set(mapping) - tied)
        if missing:
            raise ValueError(f"{source}: the checkpoint lacks the weights {missing[:5]}")
    weights = {ours: (llm[key] if ours in text else vision[key]) for ours, key in {**text, **tower}.items()}
    for name, weight in weights.items():
        shape = weight_shape(weight)
        if shape != tuple(shapes[name]):
            raise ValueError(
                f"{name}: the base checkpoint's shape {shape} does not fit {tuple(shapes[name])}"
            )
    return weights


@torch.no_grad()
def init_new_parameters(model: SlowFastForConditionalGeneration, seed: int) -> None:
    """Draw the parameters the base checkpoints do not hold from torch's generator reset to `seed`: the
    projector's linear layers (normal, std `initializer_range`; zero bias) and each hybrid layer's
    cross-attention (`reset_cross_parameters`: from the loaded k_proj / v_proj, gate closed)."""
    std = getattr(model.config.text_config, "initializer_range", 0.02)
    device = model.get_input_embeddings().weight.device
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # transformers leaves the hybrid layers' new parameters unallocated (not "missing")
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, nn.Parameter(torch.empty_like(param, device=device)))
    torch.manual_seed(seed)
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, nn.Linear):
            with gathered_for_init(module):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
    for layer in model.hybrid_attentions:
        layer.reset_cross_parameters(model.config.init_cross_kv_from_lm, std=std)


def build_from_base(
    llm: str,
    vision: str,
    knobs: dict[str, Any],
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int,
) -> SlowFastForConditionalGeneration:
    """The slow-fast model of the causal LM `llm` and the encoder `vision` (hub ids or directories holding
    safetensors weights), partitioned while built under ZeRO-3, memory-mapped otherwise (module docstring)."""
    config = base_config(llm, vision, knobs)
    llm_prefix = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)].base_model_prefix
    vision_prefix = MODEL_MAPPING[type(config.vision_config)].base_model_prefix
    with ExitStack() as stack:
        weights = [
            open_weights(reference_weight_files(local_checkpoint_dir(path, WEIGHTS_ONLY)), stack)
            for path in (llm, vision)
        ]
        for source, path, tensors in zip(("model.llm", "model.vision"), (llm, vision), weights):
            if any(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError(f"{source}: {path} holds .bin weights; the build reads safetensors only")
        state_dict = base_weights(config, *weights, llm_prefix, vision_prefix)
        # mapped tensors (nothing read yet); under ZeRO-3 only rank 0 copies values: the others need shapes
        meta = is_deepspeed_zero3_enabled() and torch.distributed.get_rank() != 0
        state_dict = {
            name: torch.empty(s.get_shape(), dtype=weight_dtype(s), device="meta") if meta else s[...]
            for name, s in state_dict.items()
        }
        model = SlowFastForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, attn_implementation=attn_implementation
        )
    init_new_parameters(model, seed)
    return model
