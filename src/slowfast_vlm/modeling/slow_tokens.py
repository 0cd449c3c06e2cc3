"""Slow tokens: every uncompressed visual token of a request, read by the hybrid layers, never in the sequence.

Architecture sections 1.2 and 1.5 (docs/architecture.md). This file is their one home, used alike by the
native model (`model.py`) and the host plug-ins (`slowfast_vlm.hosts`):

    frame grids (T, h, w, D) --pool_frames (videos)--> (T, h', w', D) --flatten--> one sample's slow tokens
    samples' slow tokens --build_slow_cache--> SlowCache: tokens (B, N, D) + mask (B, N), per request
    query_mask: which positions of the sequence read them (prompt text; later the generated tokens)
    SlowCacheGenerationMixin: `generate` carries the SlowCache from the prefill to every later step

The cache also keeps each hybrid layer's projected keys/values after their first use, so a generation
projects the slow tokens once (on a CPU, in bf16, kept in the layouts of `cpu_decode_attention`'s kernel
instead of SDPA's), and can record the cross-attention probabilities (attention maps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..config import SlowBranchConfig
from . import cpu_decode_attention


def pool_frames(grids: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool each frame's grid with kernel = stride: `(T, h, w, D)` -> `(T, h // s, w // s, D)`."""
    if stride == 1:
        return grids
    pooled = F.avg_pool2d(grids.permute(0, 3, 1, 2), kernel_size=stride, stride=stride)
    return pooled.permute(0, 2, 3, 1)


def slow_grid(frame_grid: tuple[int, int], num_frames: int, video_pooling_stride: int) -> tuple[int, int]:
    """`(h, w)` of one frame's slow tokens: video frames (T > 1) are pooled, still images are not."""
    stride = video_pooling_stride if num_frames > 1 else 1
    return frame_grid[0] // stride, frame_grid[1] // stride


@dataclass
class SlowCache:
    """The slow tokens of a batch and, when `cache_kv`, their projected keys/values per hybrid layer.

    Attributes:
        tokens: `(B, N, D)` slow tokens, zero-padded to the longest sample.
        mask: `(B, N)` bool, True at real slow tokens.
        cache_kv: keep each layer's keys/values after their first computation (generation).
        key_values: the cached keys/values in SDPA's layout, per layer;
        packed: or, where the CPU decoding kernel reads them, in its layouts only (`cpu_decode_attention`).
        record_attention: accumulate the cross-attention probabilities per layer (attention maps).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    cache_kv: bool = True
    record_attention: bool = False
    key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    packed: dict[int, cpu_decode_attention.PackedKeyValue] = field(default_factory=dict)
    normalized: dict[float, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        # Derived once per request, not at every layer and decoding step:
        # `has_slow` (B,): which samples have any slow token;
        # `key_mask` (B, N): the cross-attention's key padding, None when nothing is padded. A sample
        # without slow tokens would give an all-masked softmax (NaN), so it sees its padding instead;
        # its queries are discarded anyway.
        # `attn_bias` (B, 1, 1, N): `key_mask` as SDPA's additive mask in the tokens' dtype (0 / -inf),
        # which SDPA's CPU kernel reads as is (a boolean mask it converts at every call);
        # `autocast_bias`: the same in autocast's dtype when the cache is built under autocast, whose
        # queries come in that dtype (set here, never later: a captured decoding step mutates nothing).
        self.has_slow = self.mask.any(dim=1)
        self.key_mask = None if bool(self.mask.all()) else self.mask | ~self.has_slow[:, None]
        self.attn_bias = self.autocast_bias = None
        if self.key_mask is not None:
            bias = torch.zeros(self.key_mask.shape, dtype=self.tokens.dtype, device=self.tokens.device)
            self.attn_bias = bias.masked_fill(~self.key_mask, float("-inf"))[:, None, None, :]
            device_type = self.tokens.device.type
            if torch.is_autocast_enabled(device_type):
                self.autocast_bias = self.attn_bias.to(torch.get_autocast_dtype(device_type))

    def querying(self, query_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L)` bool: the positions of `query_mask` `(B, L)` whose sample has slow tokens to read."""
        return query_mask & self.has_slow[:, None]

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`attn_bias` `(B, 1, 1, N)` in `dtype`; None when nothing is padded. The tokens' and autocast's
        dtypes were converted once per request; any other is converted per call, not kept."""
        for bias in (self.attn_bias, self.autocast_bias):
            if bias is not None and bias.dtype == dtype:
                return bias
        return None if self.attn_bias is None else self.attn_bias.to(dtype)

    def get(self, layer_idx: int, project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        """`(key, value)` of layer `layer_idx`, each `(B, kv_heads, N, head_dim)`, projecting at most once.

        Cached keys/values are stored once: contiguous in SDPA's own layout, or, where the CPU decoding
        kernel reads them (bf16 on a CPU with AVX512-BF16), in its layouts only (`read_packed`); the steps
        that need SDPA's layout there (attention maps, more than 8 query rows per kv head) unpack them.
        They are packed here, at prefill, even when no decoding step follows (a one-token generation:
        0.22 ms per layer at 2,048 keys, BENCHMARKS.md), so that decoding steps only read the cache and a
        captured one mutates nothing."""
        if layer_idx in self.key_values or layer_idx in self.packed:
            self.normalized.clear()  # every layer has projected: a decoding step needs only the cache
            if layer_idx in self.key_values:
                return self.key_values[layer_idx]
            return cpu_decode_attention.unpack(self.packed[layer_idx])
        key_value = project(self.tokens)
        if self.cache_kv:
            key_value = tuple(tensor.contiguous() for tensor in key_value)
            if cpu_decode_attention.usable(key_value[0]):
                self.packed[layer_idx] = cpu_decode_attention.pack(*key_value, self.attn_bias)
            else:
                self.key_values[layer_idx] = key_value
        return key_value

    def read_packed(self, layer_idx: int) -> cpu_decode_attention.PackedKeyValue:
        """Layer `layer_idx`'s cached keys/values in the CPU decoding kernel's layouts (a decoding step)."""
        self.normalized.clear()  # as `get`: every layer has projected
        return self.packed[layer_idx]

    def rms_normalized(self, eps: float) -> torch.Tensor:
        """`(B, N, D)` tokens divided by their root mean square (in fp32, back in their dtype): the
        Llama-family RMSNorm before its weight, the same in every hybrid layer, so computed once per
        request (and freed once the keys/values are cached)."""
        if eps not in self.normalized:
            tokens = self.tokens.float()
            tokens = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + eps)
            self.normalized[eps] = tokens.to(self.tokens.dtype)
        return self.normalized[eps]

    def record(self, layer_idx: int, probs_sum: torch.Tensor, num_queries: torch.Tensor) -> None:
        """Accumulate one call's cross-attention: `probs_sum` `(B, H, N)` summed over its `num_queries` `(B,)`."""
        total, count = self.attention.get(layer_idx, (0.0, 0))
        self.attention[layer_idx] = (total + probs_sum.detach().float(), count + num_queries.detach())

    def attention_map(self) -> torch.Tensor:
        """`(B, hybrid layers, H, N)`: cross-attention probabilities averaged over every recorded query token."""
        if not self.attention:
            raise ValueError("no cross-attention was recorded: pass record_slow_attention=True")
        maps = [total / count.clamp(min=1)[:, None, None] for total, count in self.attention.values()]
        return torch.stack(maps, dim=1)


def build_slow_cache(
    per_sample: Sequence[torch.Tensor],
    like: torch.Tensor,
    cache_kv: bool = True,
    record_attention: bool = False,
) -> SlowCache:
    """One `SlowCache` for a batch from each sample's slow tokens `(N_i, D)` (`N_i` may be 0).

    `like` `(B, L, D)` (the sequence's embeddings) gives the dtype and device. A batch without any
    visual input gets one masked dummy slot, which keeps every shape valid.
    """
    dim = like.shape[-1]
    lengths = torch.tensor([tokens.shape[0] for tokens in per_sample], device=like.device)
    tokens = pad_sequence([t.to(like.dtype) for t in per_sample], batch_first=True)  # (B, N, D), zero-padded
    if tokens.shape[1] == 0:
        tokens = like.new_zeros(len(per_sample), 1, dim)
    mask = torch.arange(tokens.shape[1], device=like.device)[None] < lengths[:, None]
    return SlowCache(tokens=tokens, mask=mask, cache_kv=cache_kv, record_attention=record_attention)


def query_positions(
    is_visual: torch.Tensor, attention_mask: torch.Tensor | None, config: SlowBranchConfig
) -> torch.Tensor:
    """`(B, L)` bool: the prompt positions whose queries read the slow tokens (architecture 1.5.3).

    Text positions (`cross_attn_queries="text"`) or all non-padding ones (`"all"`); with
    `mask_system_tokens`, none before the first visual token. `is_visual` `(B, L)` marks the fast
    tokens (visual placeholders), `attention_mask` `(B, L)` the non-padding positions.
    """
    not_pad = torch.ones_like(is_visual) if attention_mask is None else attention_mask.bool()
    queries = not_pad & ~is_visual if config.cross_attn_queries == "text" else not_pad
    if config.mask_system_tokens:
        queries = queries & (is_visual.cumsum(dim=1) > 0)
    return queries


def query_mask(
    config: SlowBranchConfig,
    new_positions: torch.Size,
    is_visual: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    slow_cache: SlowCache | None,
) -> torch.Tensor | None:
    """Which of this call's `new_positions` `(B, L)` read the slow tokens, for both the native and the host
    models: with the visual inputs (a prefill), the prompt positions of `query_positions`; in a later
    `generate` step (a `slow_cache` carried over), every new position when `generated_tokens_see_slow`
    (generated tokens read the slow tokens like the prompt's text), else none (None)."""
    if is_visual is not None:
        return query_positions(is_visual, attention_mask, config)
    if slow_cache is not None and config.generated_tokens_see_slow:
        return torch.ones(new_positions, dtype=torch.bool, device=slow_cache.tokens.device)
    return None


class SlowCacheGenerationMixin:
    """Carries the `slow_cache` a prefill returns into every later `generate` step (mixed in before
    `GenerationMixin`): the slow tokens and their projected keys/values serve the whole request."""

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if getattr(outputs, "slow_cache", None) is not None:
            model_kwargs["slow_cache"] = outputs.slow_cache
        return model_kwargs
