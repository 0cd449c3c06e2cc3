"""The checkpoint's `SlowFastConfig` as vLLM sees it: an encoder-decoder model (slow tokens = encoder output)."""

from __future__ import annotations

from ...config import SlowFastConfig


class EncoderDecoderSlowFastConfig(SlowFastConfig):
    """`SlowFastConfig` with `is_encoder_decoder=True`, which routes the model onto vLLM's cross-attention path."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = True
        # vLLM asks for one; unused: the decoder prompt is the whole chat prompt (`skip_decoder_start_token`)
        if getattr(self, "decoder_start_token_id", None) is None:
            self.decoder_start_token_id = getattr(self.text_config, "bos_token_id", None) or 0
