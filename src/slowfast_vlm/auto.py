"""The one place that registers slow-fast models with transformers' Auto classes.

Importing this module registers the native model and every host family, so that
`AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(dir)` load
their checkpoints. Any top-level name of `slowfast_vlm` imports it first (the package itself loads
lazily, so `slowfast-vlm --help` never imports torch).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from .config import SlowFastConfig
from .hosts import HOST_FAMILIES
from .modeling import SlowFastForConditionalGeneration, SlowFastModel


def _register() -> None:
    AutoConfig.register(SlowFastConfig.model_type, SlowFastConfig, exist_ok=True)
    AutoModel.register(SlowFastConfig, SlowFastModel, exist_ok=True)
    AutoModelForImageTextToText.register(SlowFastConfig, SlowFastForConditionalGeneration, exist_ok=True)
    for family in HOST_FAMILIES:
        config_class = family.model.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, family.model, exist_ok=True)
        AutoProcessor.register(config_class, family.processor, exist_ok=True)
        # Checkpoints keep the host's on-disk key layout (transformers saves a loaded host in it); the
        # host's mapping is registered under its model type (LLaVA) or its class name (Qwen-VL).
        mapping = get_checkpoint_conversion_mapping(
            family.host_model_type
        ) or get_checkpoint_conversion_mapping(family.host_model.__name__)
        register_checkpoint_conversion_mapping(config_class.model_type, mapping, overwrite=True)


_register()
