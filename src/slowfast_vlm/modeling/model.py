"""`SlowFastForConditionalGeneration`: vision encoder + projector + an LLM with hybrid layers.

Data flow for one sample (architecture sections 1.2-1.5, docs/architecture.md):

    frames (T, 3, H, W) --encoder, projector--> (T, h, w, D) --pool if T > 1--> slow tokens (T*h'*w', D)
    slow tokens --build_fast_tokens--> fast tokens, scattered into the placeholder positions of the text
    LLM(text + fast tokens), with hybrid layers cross-attending from text positions to the slow tokens

Slow tokens never enter the sequence; they travel to the hybrid layers in a `SlowCache` passed
through the forward call, which `generate` carries from step to step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..config import SlowFastConfig
from ..transformers_compat import cache_field, cache_of
from . import reference_format
from .fast_tokens import build_fast_tokens, fast_token_count
from .hybrid import HybridAttention, add_hybrid_layers
from .slow_tokens import (
    SlowCache,
    SlowCacheGenerationMixin,
    build_slow_cache,
    pool_frames,
    query_mask,
    slow_grid,
)
from .vision import build_projector, build_vision_tower, encode_frames, vision_feature_size, vision_grid

logger = logging.getLogger(__name__)

VisualInput = torch.Tensor | list[torch.Tensor] | None


# The LLM's own outputs (whose KV-cache field is named as the installed transformers names it), plus the
# `slow_cache` that `generate` carries between steps.
@dataclass
class SlowFastModelOutput(BaseModelOutputWithPast):
    slow_cache: SlowCache | None = None


@dataclass
class SlowFastCausalLMOutput(CausalLMOutputWithPast):
    slow_cache: SlowCache | None = None


@dataclass
class EncodedVisual:
    """One video's (or image's) encoded visual tokens, ready to be used again (e.g. by a visual cache).

    Attributes:
        slow: `(T, h*w, D)` slow tokens, per frame.
        fast: `(F, D)` the fast tokens built from them (what its placeholder run holds).
    """

    slow: torch.Tensor
    fast: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes both tensors hold."""
        return sum(t.numel() * t.element_size() for t in (self.slow, self.fast))


class SlowFastPreTrainedModel(PreTrainedModel):
    config: SlowFastConfig
    config_class = SlowFastConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


def _as_list(visual: VisualInput) -> list[torch.Tensor]:
    """Videos `(B, T, 3, H, W)` / images `(N, 3, H, W)` or lists of either -> list of `(T, 3, H, W)`."""
    if visual is None:
        return []
    if isinstance(visual, torch.Tensor):
        return list(visual.unbind(0)) if visual.dim() == 5 else [image.unsqueeze(0) for image in visual]
    return [item if item.dim() == 4 else item.unsqueeze(0) for item in visual]


class SlowFastModel(SlowFastPreTrainedModel):
    """The base model: returns the LLM's last hidden states (no LM head)."""

    def __init__(self, config: SlowFastConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config, config.vision_norm_eps)
        self.multi_modal_projector = build_projector(
            config.projector_type, vision_feature_size(config.vision_config), config.text_config.hidden_size
        )
        self.language_model = AutoModel.from_config(config.text_config)
        add_hybrid_layers(self.language_model, config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ----- visual inputs -------------------------------------------------------------------------
    def visual_grid(self, num_frames: int) -> tuple[int, int]:
        """`(h, w)` of the slow tokens of one frame: videos (T > 1) are pooled, still images are not."""
        return slow_grid(vision_grid(self.config.vision_config), num_frames, self.config.video_pooling_stride)

    def split_visual_inputs(
        self, input_ids: torch.Tensor, videos: list[torch.Tensor], images: list[torch.Tensor]
    ) -> list[list[tuple[str, torch.Tensor]]]:
        """Assign videos and images to samples by their placeholder runs, in order of appearance.

        Each visual item needs exactly `fast_token_count(T)` consecutive placeholder tokens of its
        kind. Returns, per sample, its `(kind, frames (T, 3, H, W))` items in placeholder order.
        """
        queues = {}
        for token_id, given, kind in (
            (self.config.video_token_id, videos, "video"),
            (self.config.image_token_id, images, "image"),
        ):
            if given and token_id is None:
                raise ValueError(f"{kind}s given but config.{kind}_token_id is not set")
            if token_id is not None:
                queues[token_id] = (list(given), kind)
        per_sample: list[list[tuple[str, torch.Tensor]]] = []
        for b, ids in enumerate(input_ids.tolist()):
            items: list[tuple[str, torch.Tensor]] = []
            position = 0
            while position < len(ids):
                token = ids[position]
                if token not in queues:
                    position += 1
                    continue
                run_end = position
                while run_end < len(ids) and ids[run_end] == token:
                    run_end += 1
                queue, kind = queues[token]
                run, counts = run_end - position, []
                while sum(counts) < run and queue:
                    item = queue.pop(0)
                    counts.append(
                        fast_token_count(item.shape[0], self.visual_grid(item.shape[0]), self.config)
                    )
                    items.append((kind, item))
                if sum(counts) != run:
                    raise ValueError(
                        f"sample {b}: a run of {run} <{kind}> placeholder tokens at position {position} does not "
                        f"match the fast-token counts of the {kind}s given for it ({counts or 'none left'}); each "
                        f"{kind} needs exactly as many placeholder tokens as it has fast tokens"
                    )
                position = run_end
            per_sample.append(items)
        for queue, kind in queues.values():
            if queue:
                raise ValueError(f"{len(queue)} {kind}(s) given without a <{kind}> placeholder in the text")
        return per_sample

    def encode_visual_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Frames of each item `(T_i, 3, H, W)` -> its slow tokens `(T_i, h*w, D)` (pooled if a video)."""
        frames = torch.cat(items)
        grids = encode_frames(
            self.vision_tower,
            self.multi_modal_projector,
            frames,
            self.config.vision_feature_layer,
            self.config.vision_frame_chunk_size,
        )
        slow = []
        for item_grids in grids.split([item.shape[0] for item in items]):
            if item_grids.shape[0] > 1:
                item_grids = pool_frames(item_grids, self.config.video_pooling_stride)
            slow.append(item_grids.flatten(1, 2))
        return slow

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`(B, L)` bool: positions of video/image placeholder tokens (where fast tokens go)."""
        ids = [i for i in (self.config.video_token_id, self.config.image_token_id) if i is not None]
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def encode_visual(self, items: list[torch.Tensor]) -> list[EncodedVisual]:
        """Frames of each item `(T_i, 3, H, W)` -> its `EncodedVisual` (slow tokens and the fast tokens built
        from them), all items through the encoder in one call."""
        if not items:
            return []
        return [
            EncodedVisual(slow, build_fast_tokens(slow, self.visual_grid(item.shape[0]), self.config))
            for item, slow in zip(items, self.encode_visual_items(items))
        ]

    def prepare_visual_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values_videos: VisualInput,
        pixel_values: VisualInput,
        cache_slow_kv: bool,
        record_slow_attention: bool = False,
        encoded_videos: list[EncodedVisual] | None = None,
        slow_cache: SlowCache | None = None,
    ) -> tuple[torch.Tensor, SlowCache]:
        """Scatter fast tokens into `inputs_embeds` `(B, L, D)` and gather the slow tokens into a `SlowCache`.

        `encoded_videos` (`encode_visual`'s, e.g. kept in a cache) stand in for `pixel_values_videos`. A given
        `slow_cache` must hold exactly these inputs' slow tokens (kept from an earlier turn of the same
        conversation): it is used as it is, with the keys/values it has already projected.
        """
        videos = _as_list(pixel_values_videos) if encoded_videos is None else [e.slow for e in encoded_videos]
        per_sample = self.split_visual_inputs(input_ids, videos, _as_list(pixel_values))
        given = iter(encoded_videos or ())
        to_encode = [
            item
            for sample in per_sample
            for kind, item in sample
            if encoded_videos is None or kind == "image"
        ]
        encoded = iter(self.encode_visual(to_encode))
        per_sample_encoded = [
            [
                next(given) if encoded_videos is not None and kind == "video" else next(encoded)
                for kind, _ in sample
            ]
            for sample in per_sample
        ]
        fast = [item.fast for sample in per_sample_encoded for item in sample]  # each (F_i, D)
        if fast:
            inputs_embeds = inputs_embeds.masked_scatter(
                self.placeholder_mask(input_ids)[..., None], torch.cat(fast).to(inputs_embeds.dtype)
            )
        if slow_cache is None:
            slow_per_sample = [  # each (N_b, D): the sample's slow tokens, items one after another
                torch.cat([item.slow.flatten(0, 1) for item in sample])
                if sample
                else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
                for sample in per_sample_encoded
            ]
            slow_cache = build_slow_cache(
                slow_per_sample, inputs_embeds, cache_kv=cache_slow_kv, record_attention=record_slow_attention
            )
        return inputs_embeds, slow_cache

    # ----- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_videos: VisualInput = None,
        pixel_values: VisualInput = None,
        encoded_videos: list[EncodedVisual] | None = None,
        slow_cache: SlowCache | None = None,
        slow_query_mask: torch.Tensor | None = None,
        cache_slow_kv: bool = True,
        record_slow_attention: bool = False,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SlowFastModelOutput:
        r"""Inputs as in [`SlowFastForConditionalGeneration.forward`]; `slow_query_mask` `(B, L)` overrides
        which positions query the slow tokens (default: from the token types and the config)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        is_visual = None
        if pixel_values_videos is not None or pixel_values is not None or encoded_videos is not None:
            if input_ids is None:
                raise ValueError("visual inputs need input_ids to locate their placeholder tokens")
            # K/V caching only pays off across generation steps; in training the cache dies with the step.
            inputs_embeds, slow_cache = self.prepare_visual_inputs(
                input_ids,
                inputs_embeds,
                pixel_values_videos,
                pixel_values,
                cache_slow_kv=cache_slow_kv and not self.training,
                record_slow_attention=record_slow_attention,
                encoded_videos=encoded_videos,
                slow_cache=slow_cache,
            )
            is_visual = self.placeholder_mask(input_ids)
        if slow_query_mask is None:
            slow_query_mask = query_mask(
                self.config, inputs_embeds.shape[:2], is_visual, attention_mask, slow_cache
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            slow_cache=slow_cache,
            slow_query_mask=slow_query_mask,
            **kwargs,
        )
        return SlowFastModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            slow_cache=slow_cache,
            **cache_field(cache_of(outputs)),
        )


class SlowFastForConditionalGeneration(SlowCacheGenerationMixin, SlowFastPreTrainedModel, GenerationMixin):
    """Slow-fast video LLM with a language-modelling head; supports `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: SlowFastConfig):
        super().__init__(config)
        self.model = SlowFastModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, also accepting the reference release's checkpoint format
        (LLaVA-style `llava_qwen_slow_fast` configs and weight names), converted on the fly."""
        if reference_format.is_reference_checkpoint(pretrained_model_name_or_path, **kwargs):
            return cls.from_reference_checkpoint(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def expected_weights(cls, config: SlowFastConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """`{name: shape}` of the weights of a model for `config`, and the names that may be absent (tied
        to another), from a model built on the meta device (no memory)."""
        with torch.device("meta"):
            skeleton = cls(config)
        shapes = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
        return shapes, set(skeleton.all_tied_weights_keys)

    @classmethod
    def from_reference_checkpoint(
        cls,
        path: str | os.PathLike,
        vision_config: str | os.PathLike | Mapping | PretrainedConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | Mapping | torch.device | None = None,
        **kwargs,
    ) -> SlowFastForConditionalGeneration:
        """Load a reference checkpoint (directory or hub repository id; `reference_format`).

        Weights are read lazily, tensor by tensor, straight into the model. Takes `from_pretrained`'s
        keyword arguments: `torch_dtype` (alias of `dtype`; default: the checkpoint's), `attn_implementation`,
        `output_loading_info`, and the hub arguments `cache_dir`, `revision`, `token`, `local_files_only`,
        `force_download`; others are ignored with a warning. `vision_config` overrides the vision tower's
        config (see `reference_format.convert_vision_config`).
        """
        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        attn_implementation = kwargs.pop("attn_implementation", None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        hub_kwargs = {k: kwargs.pop(k) for k in reference_format.HUB_KWARGS if k in kwargs}
        if kwargs:
            logger.warning("from_reference_checkpoint ignores %s", sorted(kwargs))
        with reference_format.open_reference_checkpoint(path, vision_config, hub_kwargs) as checkpoint:
            config = checkpoint.config
            state_dict = reference_format.convert_reference_state_dict(
                checkpoint.tensors, config, *cls.expected_weights(config)
            )
            # `None` + `state_dict`: transformers' own loading (dtype, device_map, buffers, tied weights)
            loaded = cls.from_pretrained(
                None,
                config=config,
                state_dict=state_dict,
                dtype=checkpoint.dtype if dtype in (None, "auto") else dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                output_loading_info=output_loading_info,
            )
        model = loaded[0] if output_loading_info else loaded
        if (checkpoint.directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(checkpoint.directory)
        return loaded

    @property
    def hybrid_attentions(self) -> list[HybridAttention]:
        """The cross-attention blocks of the hybrid decoder layers, in layer order."""
        return [m for m in self.model.language_model.modules() if isinstance(m, HybridAttention)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_videos: VisualInput = None,
        pixel_values: VisualInput = None,
        encoded_videos: list[EncodedVisual] | None = None,
        labels: torch.LongTensor | None = None,
        slow_cache: SlowCache | None = None,
        slow_query_mask: torch.Tensor | None = None,
        cache_slow_kv: bool = True,
        record_slow_attention: bool = False,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SlowFastCausalLMOutput:
        r"""
        Args:
            input_ids: `(B, L)`; each video's placeholder run is exactly as long as its fast-token count.
            pixel_values_videos: `(B_v, T, 3, H, W)` or a list of `(T_i, 3, H, W)`, in order of appearance.
            pixel_values: still images `(N, 3, H, W)` or a list of `(3, H, W)`, in order of appearance.
            encoded_videos: the videos already encoded (`SlowFastModel.encode_visual`), in place of
                `pixel_values_videos`.
            labels: `(B, L)` with -100 where no loss is taken; the usual shifted cross-entropy.
            slow_cache: the slow tokens of an earlier call (`generate` carries it between steps); given
                with visual inputs, it must be theirs (an earlier turn's) and is used instead of a new one.
            slow_query_mask: `(B, L)` bool, overrides which positions query the slow tokens.
            cache_slow_kv: keep the projected slow keys/values for later steps (False = re-project
                them at every step, only useful to measure what caching saves).
            record_slow_attention: accumulate the hybrid layers' cross-attention probabilities in the
                returned `slow_cache` (`slow_cache.attention_map()`), for attention maps.
            logits_to_keep: compute logits for the last N positions only (0 = all).
            **kwargs: passed to the LLM, the KV cache among them under the installed transformers'
                name (`cache` from 5.24, `past_key_values` before; see `transformers_compat`).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            pixel_values_videos=pixel_values_videos,
            pixel_values=pixel_values,
            encoded_videos=encoded_videos,
            slow_cache=slow_cache,
            slow_query_mask=slow_query_mask,
            cache_slow_kv=cache_slow_kv,
            record_slow_attention=record_slow_attention,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return SlowFastCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            slow_cache=outputs.slow_cache,
            **cache_field(cache_of(outputs)),
        )

    # ----- generation --------------------------------------------------------------------------
    def _expand_inputs_for_generation(
        self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs
    ):
        # Visual inputs are not one-per-sample tensors: repeat each sample's own items `expand_size` times.
        video_key = "pixel_values_videos" if model_kwargs.get("encoded_videos") is None else "encoded_videos"
        videos, images = model_kwargs.get(video_key), model_kwargs.get("pixel_values")
        if expand_size > 1 and input_ids is not None and (videos is not None or images is not None):
            given = {"video": list(videos) if video_key == "encoded_videos" else _as_list(videos)}
            given["image"] = _as_list(images)
            frames = [v.slow if video_key == "encoded_videos" else v for v in given["video"]]  # (T_i, ...)
            per_sample = self.model.split_visual_inputs(input_ids, frames, given["image"])
            queues = {kind: iter(items) for kind, items in given.items()}
            expanded = {"video": [], "image": []}
            for items in per_sample:
                own = [(kind, next(queues[kind])) for kind, _ in items]
                for _ in range(expand_size):
                    for kind, item in own:
                        expanded[kind].append(item)
            model_kwargs[video_key] = expanded["video"] or None
            model_kwargs["pixel_values"] = expanded["image"] or None
        return super()._expand_inputs_for_generation(
            expand_size=expand_size,
            is_encoder_decoder=is_encoder_decoder,
            input_ids=input_ids,
            **model_kwargs,
        )

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        # Encoded videos serve the prefill only, like pixels (which transformers drops by name).
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs.pop("encoded_videos", None)
        return model_kwargs
