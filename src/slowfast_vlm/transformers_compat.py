"""Every difference between the transformers releases this package supports, named once.

Supported: the range declared in `pyproject.toml` (CI runs the suite at both ends). Each difference
is detected from the installed library's own API, never from its version string, and gets one name
here; the rest of the package uses these names and no version checks of its own.
"""

from __future__ import annotations

from typing import Any

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
