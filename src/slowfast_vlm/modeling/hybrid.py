"""Hybrid decoder layers: a pretrained LLM attention block plus gated cross-attention to slow tokens.

Architecture section 1.5 (docs/architecture.md). A chosen decoder layer keeps every pretrained weight under its own name;
its `self_attn` is swapped for a `HybridAttention` that adopts the original projections and adds
three new parameters (the torchtune "fusion layer" pattern):

    self_attn.cross_attn_kv_proj      Linear(D, 2 * kv_heads * head_dim), rows laid out per kv-head
                                      as (head, [key | value], head_dim), as in the reference weights
    self_attn.cross_attn_gate_proj.0  Linear(heads * head_dim, 1)      (gate "tanh-warmup" only)
    self_attn.cross_attn_warm_up_gate scalar, initialised to 0          (gate "tanh-warmup" only)

Slow tokens travel through the forward call inside a `SlowCache` (`slow_tokens.py`), which also caches
their projected keys/values per layer for the whole of a generation. The gate is `TanhWarmupGate`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ..config import SlowBranchConfig
from ..transformers_compat import compose_multimodal_rotary, pop_cache
from . import cpu_decode_attention
from .slow_tokens import SlowCache

CROSS_ATTN_PARAM_PREFIXES = ("cross_attn_kv_proj", "cross_attn_gate_proj", "cross_attn_warm_up_gate")


def gathered_for_init(module: nn.Module):
    """A context in which `module`'s parameters are whole: under ZeRO-3 (`deepspeed.zero.Init`, a
    partitioned build) they are gathered, changed on rank 0 and partitioned again on exit."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


class TanhWarmupGate:
    """The published gate ("whole-dynamic-tanh-warmup", architecture 1.5.5) of a hybrid attention block:

        g = tanh(cross_attn_gate_proj(attn_out)) * tanh(cross_attn_warm_up_gate)    per querying token

    `cross_attn_gate_proj` is Linear(H*hd, 1) (in a Sequential, index 0, as in the reference weights) and
    `cross_attn_warm_up_gate` a scalar w. w = 0 closes the gate, so a new hybrid layer computes exactly
    what the LLM computed. The two parameters live on the attention block itself under the reference's
    names (checkpoints keep them; sharding wrappers see them as the block's own); this unit adds,
    initialises and applies them.
    """

    @staticmethod
    def add_to(block: nn.Module, width: int, device: torch.device, dtype: torch.dtype) -> None:
        """Give `block` the gate's two parameters (values set by `reset`)."""
        block.cross_attn_gate_proj = nn.Sequential(nn.Linear(width, 1, device=device, dtype=dtype))
        block.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    @staticmethod
    @torch.no_grad()
    def reset(block: nn.Module, warm_up: float, std: float) -> None:
        """Projection drawn from N(0, std), bias 0, the scalar w at `warm_up` (0: closed)."""
        nn.init.normal_(block.cross_attn_gate_proj[0].weight, std=std)
        nn.init.zeros_(block.cross_attn_gate_proj[0].bias)
        nn.init.constant_(block.cross_attn_warm_up_gate, warm_up)

    @staticmethod
    def apply(block: nn.Module, gate_input: torch.Tensor) -> torch.Tensor:
        """`(B, Q, H*hd)` self-attention outputs of the querying tokens -> their gates `(B, Q, 1)`."""
        return torch.tanh(block.cross_attn_gate_proj(gate_input)) * torch.tanh(block.cross_attn_warm_up_gate)


class HybridAttention(nn.Module):
    """A Llama-family attention block (Qwen2/2.5/3, Llama, Mistral) with a slow-token cross-attention branch.

    Built from an existing attention module, whose submodules (q/k/v/o projections, Qwen3's q/k
    norms) it adopts under their original names. `slow_norm` is the decoder layer's
    `input_layernorm`, shared with the self-attention input (architecture 1.5.1); it is held outside the
    module tree so that its weight keeps its single name.
    """

    def __init__(self, attention: nn.Module, slow_norm: nn.Module, config: SlowBranchConfig):
        super().__init__()
        for name, child in attention.named_children():
            self.add_module(name, child)
        for name in (
            "config",
            "layer_idx",
            "head_dim",
            "num_key_value_groups",
            "scaling",
            "attention_dropout",
        ):
            setattr(self, name, getattr(attention, name))
        self.is_causal = True
        self.sliding_window = getattr(attention, "sliding_window", None)
        self._slow_norm = (slow_norm,)
        self.gate_type = config.gate_type
        self.gate_init = config.cross_attn_gate_init

        hidden_size = self.q_proj.in_features
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        device, dtype = self.q_proj.weight.device, self.q_proj.weight.dtype
        self.cross_attn_kv_proj = nn.Linear(
            hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=True, device=device, dtype=dtype
        )
        if self.gate_type == "tanh-warmup":
            TanhWarmupGate.add_to(self, self.num_heads * self.head_dim, device, dtype)

    @property
    def slow_norm(self) -> nn.Module:
        return self._slow_norm[0]

    @torch.no_grad()
    def reset_cross_parameters(self, init_from_lm: bool, std: float = 0.02) -> None:
        """Initialise the new parameters: warm-up gate at `cross_attn_gate_init` (0: branch off); key/value
        projection from k_proj/v_proj or random."""
        with gathered_for_init(self):
            kv_weight = self.cross_attn_kv_proj.weight.view(self.num_kv_heads, 2, self.head_dim, -1)
            kv_bias = self.cross_attn_kv_proj.bias.view(self.num_kv_heads, 2, self.head_dim)
            if init_from_lm:
                for slot, proj in enumerate((self.k_proj, self.v_proj)):
                    kv_weight[:, slot].copy_(proj.weight.view(self.num_kv_heads, self.head_dim, -1))
                    kv_bias[:, slot].copy_(
                        proj.bias.view(self.num_kv_heads, self.head_dim) if proj.bias is not None else 0.0
                    )
            else:
                nn.init.normal_(self.cross_attn_kv_proj.weight, std=std)
                nn.init.zeros_(self.cross_attn_kv_proj.bias)
            if self.gate_type == "tanh-warmup":
                TanhWarmupGate.reset(self, self.gate_init, std)
        # Tell transformers' post-init weight pass that these are set (it would re-draw them at random).
        for name, module in self.named_modules():
            if name.startswith("cross_attn") or module is self:
                module._is_hf_initialized = True
        for name, param in self.named_parameters():
            if name.startswith("cross_attn"):
                param._is_hf_initialized = True

    def project_slow(
        self, slow_tokens: torch.Tensor, normalized: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, N, D)` slow tokens -> keys and values `(B, kv_heads, N, head_dim)` (no RoPE on keys).

        `normalized`: the tokens already divided by their RMS (`SlowCache.rms_normalized`), which the
        layer's RMSNorm then only scales by its weight (the same values as `slow_norm(slow_tokens)`)."""
        batch, num_slow, _ = slow_tokens.shape
        normed = self.slow_norm(slow_tokens) if normalized is None else self.slow_norm.weight * normalized
        kv = self.cross_attn_kv_proj(normed)
        kv = kv.view(batch, num_slow, self.num_kv_heads, 2, self.head_dim)
        return kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        slow_cache: SlowCache | None = None,
        slow_query_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # Self-attention exactly as in the host family; `query_states` is reused by the cross branch.
        query_states, key_states = self.rotated_queries_keys(hidden_states, position_embeddings)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        kv_cache = pop_cache(kwargs)  # the decoder layer passes it under the release's own name
        if kv_cache is not None:
            key_states, value_states = kv_cache.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, L, H*hd), before o_proj

        if slow_cache is not None and slow_query_mask is not None:
            attn_output = attn_output + self.cross_attention(
                query_states, attn_output, slow_cache, slow_query_mask
            )
        return self.o_proj(attn_output), attn_weights

    def rotated_queries_keys(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, L, D)` hidden states -> the self-attention's queries `(B, H, L, hd)` and keys `(B, kv_heads, L,
        hd)` after RoPE, as the host family computes them; the queries are the cross-attention's too."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):  # Qwen3
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        cos, sin = compose_multimodal_rotary(*position_embeddings, self.config)  # (B, L, hd) each
        return apply_rotary_pos_emb(query_states, key_states, cos, sin)

    def cross_attention(
        self,
        query_states: torch.Tensor,
        attn_output: torch.Tensor,
        slow_cache: SlowCache,
        query_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Gated cross-attention of the querying positions to the slow tokens.

        Args:
            query_states: `(B, H, L, hd)` self-attention queries after RoPE (shared, architecture 1.5.3).
            attn_output: `(B, L, H*hd)` self-attention output before `o_proj` (the gate's input).
            query_mask: `(B, L)` bool, positions that query the slow tokens.

        Returns:
            `(B, L, H*hd)`: `g * cross_out` at querying positions, zero elsewhere.

        A decoding step (L = 1) runs `decoding_cross_attention`; a longer call (a prefill) gathers its
        querying positions first, as they are usually a few of L.
        """
        if query_states.shape[2] == 1:
            return self.decoding_cross_attention(query_states, attn_output, slow_cache, query_mask)
        valid = slow_cache.querying(query_mask)  # (B, L)
        batch, num_heads, _, head_dim = query_states.shape
        num_queries = int(valid.sum(dim=1).max())
        if num_queries == 0:
            return torch.zeros_like(attn_output)
        # Gather the querying positions of each sample to the front: (B, Q), padded with other positions.
        positions = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :num_queries]
        valid = valid.gather(1, positions)  # (B, Q)
        queries = query_states.gather(
            2, positions[:, None, :, None].expand(batch, num_heads, num_queries, head_dim)
        )
        gather_index = positions[..., None].expand(batch, num_queries, attn_output.shape[-1])
        cross = self._querying_only(queries, attn_output.gather(1, gather_index), slow_cache, valid)
        return torch.zeros_like(attn_output).scatter(1, gather_index, cross)

    def slow_keys_values(self, slow_cache: SlowCache) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slow keys/values `(B, kv_heads, N, hd)` from the cache, or projected. Without autograd
        (inference: a tensor shared across layers would escape activation checkpointing's recomputation),
        a Llama-family RMSNorm (`variance_epsilon`; its weight whole, not ZeRO-3-partitioned) shares the
        normalisation of the slow tokens with the other hybrid layers."""
        eps = getattr(self.slow_norm, "variance_epsilon", None)
        if eps is None or self.training or torch.is_grad_enabled() or is_deepspeed_zero3_enabled():
            return slow_cache.get(self.layer_idx, self.project_slow)
        return slow_cache.get(
            self.layer_idx, lambda tokens: self.project_slow(tokens, slow_cache.rms_normalized(eps))
        )

    def decoding_cross_attention(
        self,
        query_states: torch.Tensor,
        attn_output: torch.Tensor,
        slow_cache: SlowCache,
        query_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`cross_attention` of one new position per sample (`(B, H, 1, hd)` queries, `(B, 1)` mask): every
        sample's query is computed and the non-querying ones are zeroed. No data-dependent shape and no
        host synchronisation, so a decoding step can be captured whole (`torch.compile`, CUDA graphs)."""
        return self._querying_only(query_states, attn_output, slow_cache, slow_cache.querying(query_mask))

    def _querying_only(
        self, queries: torch.Tensor, gate_input: torch.Tensor, slow_cache: SlowCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """`gated_slow_attention` `(B, Q, H*hd)` with the rows that `valid` `(B, Q)` does not mark zeroed."""
        cross = self.gated_slow_attention(queries, gate_input, slow_cache, valid)
        return torch.where(valid[..., None], cross, 0.0)

    def _kernel_reads(self, slow_cache: SlowCache, grouped: torch.Tensor) -> bool:
        """Whether the CPU decoding kernel answers these `(B, kv_heads, R, hd)` queries: their layer's keys/values
        are packed for it, R is within its registers, nothing asks for a gradient and no attention map is
        recorded (it returns no probabilities)."""
        return (
            not slow_cache.record_attention
            and self.layer_idx in slow_cache.packed
            and grouped.shape[2] <= cpu_decode_attention.MAX_ROWS
            and grouped.dtype == torch.bfloat16
            and not torch.is_grad_enabled()
        )

    def _sdpa_layout_attention(
        self, grouped: torch.Tensor, slow_cache: SlowCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """`(B, kv_heads, R, hd)` grouped queries -> `(B, kv_heads, R, hd)` over the keys/values in SDPA's
        layout: SDPA, or an explicit softmax whose probabilities go into the attention map."""
        key, value = self.slow_keys_values(slow_cache)  # (B, kv_heads, N, hd)
        bias = slow_cache.bias(grouped.dtype)  # (B, 1, 1, N), or None when no slow token is padding
        if not slow_cache.record_attention:
            return F.scaled_dot_product_attention(grouped, key, value, attn_mask=bias, scale=self.scaling)
        scores = (grouped @ key.transpose(-1, -2)) * self.scaling  # (B, kv_heads, groups*Q, N)
        probs = (scores if bias is None else scores + bias).float().softmax(dim=-1)
        batch, num_queries = valid.shape
        per_head = probs.view(batch, -1, num_queries, probs.shape[-1])  # (B, H, Q, N)
        slow_cache.record(self.layer_idx, (per_head * valid[:, None, :, None]).sum(dim=2), valid.sum(dim=1))
        return probs.to(value.dtype) @ value

    def gated_slow_attention(
        self, queries: torch.Tensor, gate_input: torch.Tensor, slow_cache: SlowCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """`(B, H, Q, hd)` queries -> gated cross-attention outputs `(B, Q, H*hd)` in `gate_input`'s dtype.

        `gate_input` `(B, Q, H*hd)` is the queries' self-attention output; `valid` `(B, Q)` marks the real
        queries (what an attention map records)."""
        batch, num_heads, num_queries, head_dim = queries.shape
        # Query heads are kv-head-major (as `repeat_kv` lays them out): each kv head's group of heads reads
        # it as one longer non-causal query block, (B, kv_heads, groups*Q, hd), with no copy of the keys.
        grouped = queries.reshape(batch, self.num_kv_heads, -1, head_dim)
        if self._kernel_reads(slow_cache, grouped):  # a decoding step on a CPU (cpu_decode_attention.py)
            cross = cpu_decode_attention.attend(grouped, slow_cache.read_packed(self.layer_idx), self.scaling)
        else:
            cross = self._sdpa_layout_attention(grouped, slow_cache, valid)
        cross = (
            cross.reshape(batch, num_heads, num_queries, head_dim)
            .transpose(1, 2)
            .reshape(batch, num_queries, -1)
        )
        if self.gate_type == "tanh-warmup":
            cross = TanhWarmupGate.apply(self, gate_input) * cross
        # (the fp32 warm-up gate would otherwise promote a bf16 branch under autocast)
        return cross.to(gate_input.dtype)


def add_hybrid_layers(
    language_model: nn.Module, config: SlowBranchConfig, init_weights: bool = True
) -> list[int]:
    """Turn the decoder layers `config.hybrid_layer_indices` of `language_model` into hybrid layers, in place.

    `language_model` is a transformers decoder (e.g. `Qwen2Model`) whose `.layers[i]` have `self_attn`
    and `input_layernorm`. Every pretrained weight keeps its name and value. With `init_weights`,
    the new parameters are initialised (from k_proj/v_proj when `config.init_cross_kv_from_lm`).
    Returns the converted layer indices.
    """
    layers = language_model.layers
    std = getattr(config.text_config, "initializer_range", 0.02)
    for index in config.hybrid_layer_indices:
        layer = layers[index]
        attention = layer.self_attn
        if isinstance(attention, HybridAttention):
            continue
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attention, n)]
        if missing or not hasattr(layer, "input_layernorm"):
            raise TypeError(
                f"layer {index} ({type(layer).__name__}) is not a Llama-family decoder layer "
                f"(missing {missing or ['input_layernorm']}); hybrid layers support Qwen2/2.5/3, Llama and Mistral"
            )
        hybrid = HybridAttention(attention, layer.input_layernorm, config)
        if init_weights:
            hybrid.reset_cross_parameters(config.init_cross_kv_from_lm, std=std)
        layer.self_attn = hybrid
    return list(config.hybrid_layer_indices)


def cross_attention_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The `(name, parameter)` pairs that the hybrid layers added (what stage 1 trains besides the projector)."""
    return [
        (name, param)
        for name, param in model.named_parameters()
        if any(f".{prefix}" in name for prefix in CROSS_ATTN_PARAM_PREFIXES)
    ]


def freeze_all_but_slow_branch(model: nn.Module) -> list[nn.Parameter]:
    """Stage 1 of plug-and-play training: freeze every pretrained weight; only the hybrid layers' new
    parameters (`cross_attention_parameters`) keep `requires_grad`. Returns them, for the optimizer."""
    trainable = [param for _, param in cross_attention_parameters(model)]
    if not trainable:
        raise ValueError(f"freeze_all_but_slow_branch: {type(model).__name__} has no hybrid layers")
    keep = {id(param) for param in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return trainable
