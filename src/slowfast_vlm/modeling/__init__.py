from .fast_tokens import build_fast_tokens, fast_token_count
from .host import (
    SlowFastLlavaNextVideoConfig,
    SlowFastLlavaNextVideoForConditionalGeneration,
    SlowFastLlavaOnevisionConfig,
    SlowFastLlavaOnevisionForConditionalGeneration,
    convert_host,
    freeze_all_but_slow_branch,
    from_host,
    processor_from_host,
)
from .hybrid import HybridAttention, SlowCache, add_hybrid_layers, cross_attention_parameters, query_positions
from .model import SlowFastForConditionalGeneration, SlowFastModel, SlowFastPreTrainedModel

__all__ = [
    "HybridAttention",
    "SlowCache",
    "SlowFastLlavaNextVideoConfig",
    "SlowFastLlavaNextVideoForConditionalGeneration",
    "SlowFastLlavaOnevisionConfig",
    "SlowFastLlavaOnevisionForConditionalGeneration",
    "SlowFastForConditionalGeneration",
    "SlowFastModel",
    "SlowFastPreTrainedModel",
    "add_hybrid_layers",
    "build_fast_tokens",
    "convert_host",
    "cross_attention_parameters",
    "fast_token_count",
    "freeze_all_but_slow_branch",
    "from_host",
    "processor_from_host",
    "query_positions",
]
