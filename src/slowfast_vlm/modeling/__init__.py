"""The native slow-fast model: fast tokens, slow tokens and their cache, hybrid layers and their gate,
the vision encoder + projector, and the model that joins them (host plug-ins: `slowfast_vlm.hosts`)."""

from .fast_tokens import build_fast_tokens, fast_token_count
from .hybrid import (
    HybridAttention,
    TanhWarmupGate,
    add_hybrid_layers,
    cross_attention_parameters,
    freeze_all_but_slow_branch,
)
from .model import SlowFastForConditionalGeneration, SlowFastModel, SlowFastPreTrainedModel
from .slow_tokens import SlowCache, build_slow_cache, query_mask, query_positions

__all__ = [
    "HybridAttention",
    "SlowCache",
    "SlowFastForConditionalGeneration",
    "SlowFastModel",
    "SlowFastPreTrainedModel",
    "TanhWarmupGate",
    "add_hybrid_layers",
    "build_fast_tokens",
    "build_slow_cache",
    "cross_attention_parameters",
    "fast_token_count",
    "freeze_all_but_slow_branch",
    "query_mask",
    "query_positions",
]
