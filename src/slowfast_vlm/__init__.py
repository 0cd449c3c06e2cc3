"""slowfast-vlm: the Slow-Fast architecture for video multi-modal LLMs.

The package loads lazily (the idea of transformers' `_LazyModule`): `import slowfast_vlm` and the
`slowfast-vlm` command's `--help` import neither torch nor transformers. The first public name used
imports its module, after `slowfast_vlm.auto` has registered the models with the Auto classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SlowFastConfig": "config",
    "SlowFastForConditionalGeneration": "modeling",
    "SlowFastModel": "modeling",
    "add_hybrid_layers": "modeling",
    "build_fast_tokens": "modeling",
    "fast_token_count": "modeling",
    "freeze_all_but_slow_branch": "modeling",
    "from_host": "hosts",
    "processor_from_host": "hosts",
    "SlowFastProcessor": "processing.processor",
    "image_processor_for": "processing.processor",
    "VideoDecodeError": "processing.video",
    "VideoMetadata": "processing.video",
    "load_video": "processing.video",
}
__all__ = [
    "SlowFastConfig",
    "SlowFastForConditionalGeneration",
    "SlowFastModel",
    "SlowFastProcessor",
    "VideoDecodeError",
    "VideoMetadata",
    "add_hybrid_layers",
    "build_fast_tokens",
    "fast_token_count",
    "freeze_all_but_slow_branch",
    "from_host",
    "image_processor_for",
    "load_video",
    "processor_from_host",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slowfast_vlm' has no attribute {name!r}")
    importlib.import_module(".auto", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from .config import SlowFastConfig
    from .hosts import from_host, processor_from_host
    from .modeling import (
        SlowFastForConditionalGeneration,
        SlowFastModel,
        add_hybrid_layers,
        build_fast_tokens,
        fast_token_count,
        freeze_all_but_slow_branch,
    )
    from .processing.processor import SlowFastProcessor, image_processor_for
    from .processing.video import VideoDecodeError, VideoMetadata, load_video
