"""`SlowFastForConditionalGeneration` for vLLM: the slow-fast model on vLLM's encoder-decoder path.

How the architecture (docs/architecture.md, 1.2-1.5) maps onto vLLM 0.32, whose encoder-decoder mode (the one
Whisper uses) keeps each request's encoder keys/values in a cross-attention KV cache for every decode step:

    encoder       vision tower + projector + pooling (this library's modules): frames -> slow tokens (N, D)
    prefill       fast tokens built from the slow tokens (`build_fast_tokens`) replace the decoder prompt's
                  placeholders; each hybrid layer projects the slow tokens once into its `CrossAttention` cache
    hybrid layer  Qwen2 self-attention; its RoPE'd queries also read the slow-token cache (no RoPE on those
                  keys); `tanh(gate_proj(attn_out)) * tanh(w)` gates the result at the querying tokens

Tensor parallelism: `cross_attn_kv_proj` is column-parallel, its rows laid out per kv head
`(head, [key | value], head_dim)`, so each rank holds whole kv heads (kv heads must divide by the TP size);
`cross_attn_gate_proj` is row-parallel over the heads it reads (its one output all-reduced); the scalar
warm-up gate and the vision side are replicated. Only Qwen2-family LLMs (Qwen2, Qwen2.5) are served.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...modeling.fast_tokens import build_fast_tokens
from ...modeling.model import SlowFastModel
from ...modeling.vision import build_projector, build_vision_tower, vision_feature_size
from .processor import SlowFastDummyInputsBuilder, SlowFastMultiModalProcessor, SlowFastProcessingInfo

SUPPORTED_LLMS = ("qwen2",)


class StepLayout(NamedTuple):
    """Where this step's flattened tokens `(L,)` come from."""

    request: torch.Tensor  # (L,) index of each token's request in the batch
    starts: torch.Tensor  # (R,) first token of each request
    is_prefill: torch.Tensor  # (L,) bool, a prompt token (not a generated one)
    has_slow: torch.Tensor  # (L,) bool, its request has slow tokens


class HybridQwen2DecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer whose attention block also reads the slow tokens (architecture 1.5).

    The new parameters sit on `self_attn` under the checkpoint's names: `cross_attn_kv_proj`,
    `cross_attn_gate_proj.0` (gate "tanh-warmup") and `cross_attn_warm_up_gate`.
    """

    def __init__(
        self, config, cache_config=None, quant_config=None, prefix: str = "", gate_type="tanh-warmup"
    ):
        super().__init__(config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        attn = self.self_attn
        tp_size = get_tensor_model_parallel_world_size()
        if attn.total_num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size {tp_size}: the slow-token projection is sharded per kv head and "
                f"{attn.total_num_kv_heads} kv heads do not divide by it"
            )
        self.gate_type = gate_type
        # (D) -> (2 * kv_heads * hd), rows (head, [key | value], hd): a column shard holds whole kv heads
        attn.cross_attn_kv_proj = ColumnParallelLinear(
            self.hidden_size,
            2 * attn.total_num_kv_heads * attn.head_dim,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn.cross_attn_kv_proj",
        )
        if gate_type == "tanh-warmup":
            # (H * hd) -> 1 over all heads: row-parallel, the partial sums all-reduced
            attn.cross_attn_gate_proj = nn.ModuleList(
                [
                    RowParallelLinear(
                        attn.total_num_heads * attn.head_dim, 1, bias=True, prefix=f"{prefix}.gate"
                    )
                ]
            )
            attn.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1))
        attn.cross_attn = CrossAttention(
            attn.num_heads,
            attn.head_dim,
            attn.scaling,
            num_kv_heads=attn.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn.cross_attn",
        )

    def project_slow(self, slow_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N, D)` slow tokens -> this rank's keys and values, each `(N, kv_heads_local * hd)`."""
        attn = self.self_attn
        kv, _ = attn.cross_attn_kv_proj(self.input_layernorm(slow_tokens))
        kv = kv.view(slow_tokens.shape[0], attn.num_kv_heads, 2, attn.head_dim)
        return kv[:, :, 0].flatten(1), kv[:, :, 1].flatten(1)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        slow_tokens: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(hidden_states)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        attn_out = attn.attn(q, k, v)  # (L, H_local * hd), before o_proj

        # keys/values enter the cross-attention cache at the request's first step, read from it afterwards
        key, value = self.project_slow(slow_tokens) if slow_tokens is not None else (None, None)
        cross = attn.cross_attn(q, key, value)  # (L, H_local * hd), non-causal
        if self.gate_type == "tanh-warmup":
            gate, _ = attn.cross_attn_gate_proj[0](attn_out)  # (L, 1)
            cross = torch.tanh(gate) * torch.tanh(attn.cross_attn_warm_up_gate) * cross
        # (a request without slow tokens reads an empty cache: `query_mask` drops whatever came out)
        attn_out = attn_out + torch.where(query_mask[:, None], cross, torch.zeros_like(cross)).to(
            attn_out.dtype
        )
        hidden_states, _ = attn.o_proj(attn_out)

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class SlowFastLanguageModel(nn.Module):
    """The Qwen2 decoder with hybrid layers at `config.hybrid_layer_indices`."""

    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        hybrid = set(config.hybrid_layer_indices)
        self.embed_tokens = VocabParallelEmbedding(
            text_config.vocab_size, text_config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            [
                HybridQwen2DecoderLayer(
                    text_config,
                    cache_config,
                    quant_config,
                    f"{prefix}.layers.{i}",
                    gate_type=config.gate_type,
                )
                if i in hybrid
                else Qwen2DecoderLayer(text_config, cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
                for i in range(text_config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor,
        slow_tokens: torch.Tensor | None,
        query_mask: torch.Tensor,
    ) -> torch.Tensor:
        hidden_states, residual = inputs_embeds, None
        for layer in self.layers:
            if isinstance(layer, HybridQwen2DecoderLayer):
                hidden_states, residual = layer(positions, hidden_states, residual, slow_tokens, query_mask)
            else:
                hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # q/k/v and gate/up stacked as in vLLM's Qwen2; the gate's `.0` is the ModuleList's index
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


@MULTIMODAL_REGISTRY.register_processor(
    SlowFastMultiModalProcessor, info=SlowFastProcessingInfo, dummy_inputs=SlowFastDummyInputsBuilder
)
class SlowFastForConditionalGeneration(nn.Module, SupportsMultiModal):
    """A checkpoint saved by this library, served by vLLM (`config.json` architecture of the same name)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": ""})

    # the library's own encoding of visual items (vision tower, projector, pooling): same attributes here
    encode_visual_items = SlowFastModel.encode_visual_items
    visual_grid = SlowFastModel.visual_grid

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == "video":
            return "<video>"
        raise ValueError(f"modality {modality!r}: send a video (a still image as a one-frame video)")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.text_config.model_type not in SUPPORTED_LLMS:
            raise ValueError(
                f"text_config.model_type {config.text_config.model_type!r}: the vLLM plugin serves {SUPPORTED_LLMS} "
                "LLMs; serve this checkpoint with `slowfast-vlm serve`"
            )
        self.config = config
        self.vision_tower = build_vision_tower(config.vision_config, config.vision_norm_eps)
        self.multi_modal_projector = build_projector(
            config.projector_type, vision_feature_size(config.vision_config), config.text_config.hidden_size
        )
        self.language_model = SlowFastLanguageModel(
            vllm_config, prefix=maybe_prefix(prefix, "language_model")
        )
        text_config = config.text_config
        self.lm_head = ParallelLMHead(
            text_config.vocab_size, text_config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text_config.vocab_size)
        self.placeholder_ids = {config.video_token_id: "video", config.image_token_id: "image"}

    # ----- encoder: frames -> slow tokens ----------------------------------------------------------
    def embed_multimodal(self, pixel_values_videos=None, **kwargs: object) -> list[torch.Tensor]:
        """Each video's slow tokens `(N_i, D)` from its frames (`pixel_values_videos`: `(B, T, 3, S, S)` or a
        list of `(T_i, 3, S, S)`; a one-frame video is a still image, not pooled)."""
        if pixel_values_videos is None:
            return []
        return [slow.flatten(0, 1) for slow in self.encode_visual_items(list(pixel_values_videos))]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        return self.language_model.embed_tokens(input_ids)

    # ----- decoder ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        embeds = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        layout = self.step_layout(input_ids, positions)
        slow_tokens = None
        if encoder_outputs:
            # a generated token is never a placeholder, even if the model writes one
            prompt_ids = torch.where(layout.is_prefill, input_ids, -1)
            embeds, slow_tokens = self.scatter_fast_tokens(
                prompt_ids, layout.request, embeds, encoder_outputs
            )
        return self.language_model(positions, embeds, slow_tokens, self.query_mask(input_ids, layout))

    def placeholder_runs(self, input_ids: torch.Tensor, request: torch.Tensor) -> list[tuple[int, int, str]]:
        """`(start, end, kind)` of each run of one placeholder id within one request, in this step's
        flattened tokens `(L,)` (negative ids: tokens to skip); `request` `(L,)` is each token's request."""
        keys = list(zip(input_ids.tolist(), request.tolist())) + [(None, None)]
        runs, start = [], None
        for i, key in enumerate(keys):
            if start is not None and key != keys[start]:
                runs.append((start, i, self.placeholder_ids[keys[start][0]]))
                start = None
            if start is None and key[0] in self.placeholder_ids:
                start = i
        return runs

    def scatter_fast_tokens(
        self,
        input_ids: torch.Tensor,
        request: torch.Tensor,
        embeds: torch.Tensor,
        encoder_outputs: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast tokens into the prefilling requests' placeholders; their slow tokens `(sum N_i, D)` in batch order.

        The encoder outputs come in the order of the requests that started this step, which is the batch's
        order of their placeholder runs; `<image>` runs are one-frame items (a still image, not pooled).
        """
        runs = self.placeholder_runs(input_ids, request)
        if len(runs) != len(encoder_outputs):
            raise RuntimeError(f"{len(encoder_outputs)} encoder outputs for {len(runs)} placeholder runs")
        embeds = embeds.clone()
        ordered = []
        for (start, end, kind), slow in zip(runs, encoder_outputs):  # slow (N, D)
            h, w = self.visual_grid(1 if kind == "image" else 2)  # a still image (one frame) is not pooled
            num_frames = slow.shape[0] // (h * w)
            fast = build_fast_tokens(slow.view(num_frames, h * w, -1), (h, w), self.config)
            if fast.shape[0] != end - start:
                raise RuntimeError(
                    f"{kind}: {fast.shape[0]} fast tokens for a run of {end - start} placeholders"
                )
            embeds[start:end] = fast.to(embeds.dtype)
            ordered.append(slow)
        return embeds, torch.cat(ordered).to(embeds.dtype)

    def step_layout(self, input_ids: torch.Tensor, positions: torch.Tensor) -> StepLayout:
        """Which request each of this step's `(L,)` tokens belongs to, from the cross-attention metadata."""
        metadata = self.cross_attention_metadata()
        num_tokens, device = input_ids.shape[0], input_ids.device
        if metadata is None:  # a dummy run (profiling, warm-up): no request reads slow tokens
            none = torch.zeros(num_tokens, dtype=torch.bool, device=device)
            return StepLayout(
                torch.zeros_like(input_ids), torch.zeros(1, dtype=torch.long, device=device), none, none
            )
        starts = metadata.query_start_loc.to(device)[:-1].long()
        lengths = metadata.query_start_loc.to(device).diff()
        request = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        pad = num_tokens - request.shape[0]  # padding tokens past the last request belong to none
        has_slow = torch.cat([(metadata.seq_lens.to(device) > 0)[request], request.new_zeros(pad).bool()])
        request = torch.cat([request, request.new_zeros(pad)])
        # a prefill starts at position 0 (the encoder-decoder mode has no chunked prefill, no prefix cache)
        is_prefill = (positions[starts.clamp(max=num_tokens - 1)] == 0)[request]
        return StepLayout(request, starts, is_prefill, has_slow)

    def query_mask(self, input_ids: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """`(L,)` bool: the tokens of this step whose queries read their request's slow tokens (architecture
        1.5.3, the library's `query_positions`): prompt text (or every prompt token, `cross_attn_queries="all"`;
        with `mask_system_tokens`, none before the first visual token) and, when `generated_tokens_see_slow`,
        generated tokens; never a token of a request without slow tokens."""
        is_visual = torch.isin(input_ids, torch.tensor(list(self.placeholder_ids), device=input_ids.device))
        prompt = ~is_visual if self.config.cross_attn_queries == "text" else torch.ones_like(is_visual)
        if self.config.mask_system_tokens:
            seen = torch.cumsum(is_visual.long(), 0)  # (L,) visual tokens up to each token, over the step
            before = (seen - is_visual.long())[layout.starts.clamp(max=len(seen) - 1)][layout.request]
            prompt = prompt & (seen - before > 0)
        generated = torch.full_like(is_visual, bool(self.config.generated_tokens_see_slow))
        return torch.where(layout.is_prefill, prompt, generated) & layout.has_slow

    def cross_attention_metadata(self):
        """This step's metadata of the first hybrid layer's cross-attention (per request: query start, slow
        token count), or None outside a real step."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        if not metadata:
            return None
        layer = next(m for m in self.language_model.layers if isinstance(m, HybridQwen2DecoderLayer))
        return metadata.get(layer.self_attn.cross_attn.layer_name)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["lm_head."] if self.config.tie_word_embeddings else None
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(
            weights, mapper=self.hf_to_vllm_mapper
        )
