"""Every difference between the transformers releases this package supports, named once.

Supported: the range declared in `pyproject.toml` (CI runs the suite at both ends). Each difference
is detected from the installed library's own API, never from its version string, and gets one name
here; the rest of the package uses these names and no version checks of its own.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# 5.24 renamed the KV cache `past_key_values` -> `cache`, both as the forward argument of every model
# and layer (the old input name is deprecated, removal announced for 5.40) and as the output field.
CACHE_NAME: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(outputs: Any) -> Any:
    """The KV cache a transformers model output carries (None when it has none)."""
    return getattr(outputs, CACHE_NAME, None)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the KV cache from a layer's forward kwargs (under this release's name)."""
    return kwargs.pop(CACHE_NAME, None)


def cache_field(cache: Any) -> dict[str, Any]:
    """`{name: cache}` to build a model output or call a model under this release's cache name."""
    return {CACHE_NAME: cache}


# 5.24 renamed `TrainingArguments.gradient_checkpointing(_kwargs)` -> `activation_checkpointing(_kwargs)`
# (the old names stay as deprecated aliases until 6). Configs use the new names.
ACTIVATION_CHECKPOINTING_NAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def training_arguments_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` keyword arguments with this release's names for activation checkpointing."""
    from transformers import TrainingArguments  # imported here: it loads the whole training stack

    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return dict(fields)
    return {ACTIVATION_CHECKPOINTING_NAMES.get(key, key): value for key, value in fields.items()}


# Before 5.24, the Trainer resumed a multi-process CPU run's optimizer state with `torch.load(...,
# map_location=args.device)`, and that device is the indexed "cpu:0", a location torch cannot restore
# (the resume failed); 5.24 maps it to "cpu". Restoring "cpu:N" as "cpu" gives every release 5.24's result.
def _restore_indexed_cpu(storage: Any, location: str) -> Any:
    return storage if re.fullmatch(r"cpu:\d+", location) else None


@functools.cache  # register once
def allow_indexed_cpu_map_location() -> None:
    """Let `torch.load(map_location="cpu:N")` load onto the CPU."""
    torch.serialization.register_package(100, lambda obj: None, _restore_indexed_cpu)


# Before 5.17, Qwen2.5-VL's rotary embedding returned one cos/sin per position axis, `(3, B, L, hd)`, and
# its attention composed them with `mrope_section` (`apply_multimodal_rotary_pos_emb`); later releases
# compose them inside the rotary embedding, which returns `(B, L, hd)` like any LLM's.
def compose_multimodal_rotary(
    cos: torch.Tensor, sin: torch.Tensor, config: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` of shape `(B, L, hd)` from what this release's rotary embedding gives the attention."""
    if cos.dim() == 3:
        return cos, sin
    section = config.rope_parameters["mrope_section"] * 2  # the halves of head_dim are rotated alike
    return tuple(
        torch.cat([part[i % 3] for i, part in enumerate(x.split(section, dim=-1))], dim=-1)
        for x in (cos, sin)
    )


def multimodal_output_class(module: Any, family_class_name: str) -> type:
    """The causal-LM output class of a Qwen-VL host: its own (e.g. `Qwen2_5_VLCausalLMOutputWithPast`)
    before 5.23, transformers' shared `MultimodalCausalLMOutputWithPast` from 5.23 on."""
    if hasattr(module, family_class_name):
        return getattr(module, family_class_name)
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    return MultimodalCausalLMOutputWithPast
