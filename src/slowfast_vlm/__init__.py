"""slowfast-vlm: the Slow-Fast architecture for video multi-modal LLMs."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .config import SlowFastConfig
from .modeling import (
    SlowFastForConditionalGeneration,
    SlowFastModel,
    add_hybrid_layers,
    build_fast_tokens,
    fast_token_count,
    freeze_all_but_slow_branch,
    from_host,
    processor_from_host,
)
from .processing.processor import SlowFastProcessor, image_processor_for
from .processing.video import VideoDecodeError, VideoMetadata, load_video

AutoConfig.register(SlowFastConfig.model_type, SlowFastConfig)
AutoModel.register(SlowFastConfig, SlowFastModel)
AutoModelForImageTextToText.register(SlowFastConfig, SlowFastForConditionalGeneration)

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
__version__ = "0.1.0"
