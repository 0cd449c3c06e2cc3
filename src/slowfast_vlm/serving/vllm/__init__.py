"""vLLM plugin: serve checkpoints saved by this library with vLLM (entry point `vllm.general_plugins`).

vLLM calls `register()` in each of its processes; nothing in `slowfast_vlm` imports vLLM otherwise. It
registers the model (`model.py`, `processor.py`) and the video loader `slowfast` (`video_loader.py`). The
model runs on vLLM's encoder-decoder path (`model.py`), so the checkpoint's config is given
`is_encoder_decoder=True` there (`EncoderDecoderSlowFastConfig`); the saved `config.json` is unchanged.
"""

from __future__ import annotations

ARCHITECTURE = "SlowFastForConditionalGeneration"


def register() -> None:
    """Register the slow-fast architecture and its config with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from .config import EncoderDecoderSlowFastConfig
    from .video_loader import BACKEND, SlowFastVideoLoader

    _CONFIG_REGISTRY[EncoderDecoderSlowFastConfig.model_type] = EncoderDecoderSlowFastConfig
    VIDEO_LOADER_REGISTRY.register(BACKEND)(SlowFastVideoLoader)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "slowfast_vlm.serving.vllm.model:SlowFastForConditionalGeneration"
        )
