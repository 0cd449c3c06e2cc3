"""slowfast-vlm: the Slow-Fast architecture for video multi-modal LLMs."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .config import SlowFastConfig
from .modeling import (
    SlowFastForConditionalGeneration,
    SlowFastModel,
    add_hybrid_layers,
    build_fast_tokens,
    fast_token_count,
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
    "image_processor_for",
    "load_video",
]
__version__ = "0.1.0"
