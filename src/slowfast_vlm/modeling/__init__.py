from .fast_tokens import build_fast_tokens, fast_token_count
from .hybrid import HybridAttention, SlowCache, add_hybrid_layers, cross_attention_parameters
from .model import SlowFastForConditionalGeneration, SlowFastModel, SlowFastPreTrainedModel

__all__ = [
    "HybridAttention",
    "SlowCache",
    "SlowFastForConditionalGeneration",
    "SlowFastModel",
    "SlowFastPreTrainedModel",
    "add_hybrid_layers",
    "build_fast_tokens",
    "cross_attention_parameters",
    "fast_token_count",
]
