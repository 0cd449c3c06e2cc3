"""Plug and play: add the slow branch to a transformers LLaVA-OneVision or LLaVA-NeXT-Video model.

The host model keeps every weight under its own name and computes exactly what it always computed,
on a uniform subset of the frames: its video tokens are the fast tokens. All the frames, projected and
optionally lightly pooled, are the slow tokens, read by hybrid layers added to its LLM
(`add_hybrid_layers`, design section 1.5):

    frames (B, T, 3, H, W) --host vision tower (feature layer) + projector--> (B, T, h*w, D)
        fast: the host's own video tokens of `fast_frames` frames chosen uniformly out of T
              LLaVA-OneVision: each grid bilinearly resized to ceil(h/2) x ceil(w/2), then one `image_newline`
              LLaVA-NeXT-Video: its `vision_resampler` pooling of the encoder grid, then the projector
        slow: all T grids, average-pooled with `slow_pooling_stride`, (T * h' * w', D) -> SlowCache

The model takes all the frames in `pixel_values_videos` and picks the fast ones itself, so every
`<video>` placeholder run in `input_ids` is as long as the host's run for the fast frames; the host's
processor, converted by `processor_from_host`, expands it that way.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PretrainedConfig,
    ProcessorMixin,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoCausalLMOutputWithPast,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionCausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from ..config import SlowFastConfig
from ..processing.video import uniform_sample_indices
from .hybrid import (
    HybridAttention,
    SlowCache,
    SlowCacheGenerationMixin,
    add_hybrid_layers,
    cross_attention_parameters,
    query_positions,
)
from .vision import pool_frames, vision_grid

# The SlowFastConfig knobs of the hybrid layers, shared with the native model.
HYBRID_KNOBS = (
    "hybrid_every_n_layers",
    "hybrid_min_depth",
    "hybrid_max_depth",
    "cross_attn_queries",
    "mask_system_tokens",
    "gate_type",
    "init_cross_kv_from_lm",
    "generated_tokens_see_slow",
)
# Arguments of the host's `get_image_features` beyond pixels and sizes, when images come with videos.
IMAGE_FEATURE_KWARGS = ("vision_aspect_ratio", "batch_num_images")


def select_fast_frames(num_frames: int, fast_frames: int) -> list[int]:
    """Which of a video's `num_frames` frames the host sees: `min(fast_frames, num_frames)` uniform ones."""
    return uniform_sample_indices(num_frames, min(fast_frames, num_frames))


# ----- configs ------------------------------------------------------------------------------------
class SlowFastHostConfig(PretrainedConfig):
    r"""The slow-fast knobs, mixed into a host config class (one per host family, below).

    Args:
        frames: frames per video the model is meant to be given (what to decode, e.g.
            `load_video(path, config.frames)`); the model accepts any number.
        fast_frames: how many of a video's frames, chosen uniformly, the host sees as its video.
        slow_pooling_stride: spatial average pooling of every frame's projected grid for the slow
            tokens (1 = unpooled).
        vision_frame_chunk_size: frames encoded at once (bounds the encoder's activation memory).
        hybrid_every_n_layers, hybrid_min_depth, hybrid_max_depth, cross_attn_queries, mask_system_tokens,
        gate_type, init_cross_kv_from_lm, generated_tokens_see_slow: as in [`SlowFastConfig`].
    """

    frames: int = 64
    fast_frames: int = 16
    slow_pooling_stride: int = 1
    vision_frame_chunk_size: int = 16
    hybrid_every_n_layers: int = 8
    hybrid_min_depth: int = 0
    hybrid_max_depth: int | None = None
    cross_attn_queries: str = "text"
    mask_system_tokens: bool = False
    gate_type: str = "tanh-warmup"
    init_cross_kv_from_lm: bool = True
    generated_tokens_see_slow: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        name = type(self).__name__
        for field in ("frames", "fast_frames", "slow_pooling_stride", "vision_frame_chunk_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be an integer >= 1, got {value!r}")
        if self.fast_frames > self.frames:
            raise ValueError(f"{name}.fast_frames={self.fast_frames} is more than frames={self.frames}")
        _ = self.slowfast_config  # building it validates the hybrid knobs against the LLM

    @property
    def slowfast_config(self) -> SlowFastConfig:
        """The hybrid-layer knobs as the `SlowFastConfig` that `add_hybrid_layers` reads."""
        knobs = {name: getattr(self, name) for name in HYBRID_KNOBS}
        # Copies: a new config would reset the attention backend of sub-configs it is handed.
        return SlowFastConfig(
            text_config=self.text_config.to_dict(), vision_config=self.vision_config.to_dict(), **knobs
        )


class SlowFastLlavaOnevisionConfig(SlowFastHostConfig, LlavaOnevisionConfig):
    """A `LlavaOnevisionConfig` (LLaVA-OneVision, LLaVA-Video) with the slow-fast knobs."""

    model_type = "slowfast_llava_onevision"


class SlowFastLlavaNextVideoConfig(SlowFastHostConfig, LlavaNextVideoConfig):
    """A `LlavaNextVideoConfig` with the slow-fast knobs."""

    model_type = "slowfast_llava_next_video"


# The fields a host config gets on top of its own (what `from_host` takes as knobs).
KNOBS = tuple(SlowFastHostConfig.__annotations__)


# ----- models -------------------------------------------------------------------------------------
# The hosts' causal-LM outputs (fields as the installed transformers names them) plus the `slow_cache`
# that `generate` carries between steps.
@dataclass
class SlowFastLlavaOnevisionOutput(LlavaOnevisionCausalLMOutputWithPast):
    slow_cache: SlowCache | None = None


@dataclass
class SlowFastLlavaNextVideoOutput(LlavaNextVideoCausalLMOutputWithPast):
    slow_cache: SlowCache | None = None


class SlowFastHostMixin(SlowCacheGenerationMixin):
    """The slow branch on top of a host `...ForConditionalGeneration` (mixed in before the host class).

    Videos: `pixel_values_videos` `(B_v, T, 3, H, W)` holds every frame. The host's vision tower runs
    once per frame; the fast tokens go to the host as its precomputed video encoder output
    (`mm_encoder_outputs`), so everything else (images, placeholders, loss) is the host's own code.
    The slow tokens reach the hybrid layers as `slow_cache=` / `slow_query_mask=` through the host's
    forward kwargs, as in `SlowFastForConditionalGeneration`.
    """

    config: SlowFastHostConfig
    output_class: type[ModelOutput]  # the host's causal-LM output plus `slow_cache`

    def __init__(self, config: SlowFastHostConfig):
        super().__init__(config)
        add_hybrid_layers(self.model.language_model, config.slowfast_config)

    @property
    def hybrid_layers(self) -> list[HybridAttention]:
        """The cross-attention blocks of the hybrid decoder layers, in layer order."""
        return [m for m in self.model.language_model.modules() if isinstance(m, HybridAttention)]

    def fast_video_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The host's video tokens `(B_v, N_fast, D)` from the fast frames' encoder features
        `(B_v, F, P, C)` and their projections `(B_v, F, P, D)`."""
        raise NotImplementedError

    def vision_features(self, frames: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` frames -> the encoder features the host selects `(N, P, C)` (its feature layer(s),
        its select strategy), `vision_frame_chunk_size` frames at a time."""
        layer, strategy = self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        chunks = []
        for chunk in frames.split(self.config.vision_frame_chunk_size):
            hidden = self.model.vision_tower(chunk, output_hidden_states=True, return_dict=True).hidden_states
            selected = (
                hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
            )
            chunks.append(selected[:, 1:] if strategy == "default" else selected)  # "default" drops CLS
        return torch.cat(chunks)

    def video_tokens(self, pixel_values_videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B_v, T, 3, H, W)` videos -> fast tokens `(B_v, N_fast, D)`, slow tokens `(B_v, T*h'*w', D)`."""
        if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
            shape = getattr(pixel_values_videos, "shape", type(pixel_values_videos).__name__)
            raise ValueError(f"pixel_values_videos must be a (videos, frames, 3, H, W) tensor, got {shape}")
        num_videos, num_frames = pixel_values_videos.shape[:2]
        features = self.vision_features(pixel_values_videos.flatten(0, 1))  # (B_v*T, P, C)
        projected = self.model.multi_modal_projector(features)  # (B_v*T, P, D)
        features = features.unflatten(0, (num_videos, num_frames))
        projected = projected.unflatten(0, (num_videos, num_frames))
        fast_index = select_fast_frames(num_frames, self.config.fast_frames)
        fast = self.fast_video_tokens(features[:, fast_index], projected[:, fast_index])
        h, w = vision_grid(self.config.vision_config)
        grids = projected.reshape(num_videos * num_frames, h, w, -1)
        slow = pool_frames(grids, self.config.slow_pooling_stride).reshape(num_videos, -1, grids.shape[-1])
        return fast, slow

    def slow_cache_for(self, input_ids: torch.Tensor, slow: torch.Tensor, fast_per_video: int) -> SlowCache:
        """Gather each row's slow tokens: video k fills the k-th run of `fast_per_video` `<video>` tokens
        of `input_ids` in row-major order, as the host scatters them."""
        rows = (input_ids == self.config.video_token_id).nonzero()[:, 0]  # row of every <video> token
        num_videos = slow.shape[0]
        starts, ends = rows[::fast_per_video], rows[fast_per_video - 1 :: fast_per_video]
        if rows.numel() != num_videos * fast_per_video or not torch.equal(starts, ends):
            raise ValueError(
                f"input_ids hold {rows.numel()} <video> tokens, but the {num_videos} video(s) given need "
                f"one run of {fast_per_video} each (the host's tokens for {self.config.fast_frames} fast "
                "frames); expand <video> with the processor from `processor_from_host` and pass all frames "
                "of every video"
            )
        per_row: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        for row, video_slow in zip(starts.tolist(), slow):
            per_row[row].append(video_slow)
        row_slow = [torch.cat(videos) if videos else slow.new_zeros(0, slow.shape[-1]) for videos in per_row]
        lengths = torch.tensor([row.shape[0] for row in row_slow], device=slow.device)
        tokens = pad_sequence(row_slow, batch_first=True)  # (B, N, D), zero-padded
        mask = torch.arange(tokens.shape[1], device=slow.device)[None] < lengths[:, None]
        # K/V caching only pays off across generation steps; in training the cache dies with the step.
        return SlowCache(tokens=tokens, mask=mask, cache_kv=not self.training)

    @staticmethod
    def scatter_features(
        embeds: torch.Tensor, positions: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Put `features` `(N, D)` at the `positions` `(B, L)` bool of `embeds` `(B, L, D)`, in row-major order."""
        if int(positions.sum()) != features.shape[0]:
            raise ValueError(
                f"input_ids hold {int(positions.sum())} placeholder tokens for {features.shape[0]} visual features"
            )
        return embeds.masked_scatter(positions[..., None], features.to(embeds.dtype))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        slow_cache: SlowCache | None = None,
        slow_query_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ModelOutput:
        r"""The host's forward (same arguments), with all frames of each video in `pixel_values_videos`.

        Args:
            input_ids: `(B, L)`; each `<video>` run is the host's run for the video's fast frames.
            pixel_values_videos: `(B_v, T, 3, H, W)`, every frame; the fast ones are `select_fast_frames`.
            slow_cache: the slow tokens of an earlier call (`generate` carries it between steps).
            slow_query_mask: `(B, L)` bool, overrides which positions query the slow tokens.
        """
        query_mask = None
        if pixel_values_videos is not None:
            if input_ids is None:
                raise ValueError("pixel_values_videos need input_ids to locate their <video> tokens")
            fast, slow = self.video_tokens(pixel_values_videos)
            slow_cache = self.slow_cache_for(input_ids, slow, fast.shape[1])
            # Scatter the fast tokens (and any images' features) into the embeddings as the host does, and
            # give the host embeddings only: transformers before 5.18 has no way to pass it video features.
            embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
            embeds = self.scatter_features(
                embeds, input_ids == self.config.video_token_id, fast.flatten(0, 1)
            )
            if kwargs.get("pixel_values") is not None:
                image_kwargs = {k: kwargs[k] for k in IMAGE_FEATURE_KWARGS if k in kwargs}
                image_features = self.model.get_image_features(
                    kwargs.pop("pixel_values"), kwargs.get("image_sizes"), return_dict=True, **image_kwargs
                ).pooler_output  # per image (N_i, D)
                is_image = input_ids == self.config.image_token_id
                embeds = self.scatter_features(embeds, is_image, torch.cat(image_features))
            kwargs["inputs_embeds"] = embeds
            visual_ids = torch.tensor([self.config.video_token_id, self.config.image_token_id])
            is_visual = torch.isin(input_ids, visual_ids.to(input_ids.device))
            query_mask = query_positions(is_visual, attention_mask, self.config)
        elif slow_cache is not None and self.config.generated_tokens_see_slow:
            # Tokens after the prompt (generated ones) read the slow tokens like the prompt's text.
            new = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            query_mask = torch.ones(new.shape[:2], dtype=torch.bool, device=new.device)
        if slow_query_mask is not None:
            query_mask = slow_query_mask
        outputs = super().forward(
            input_ids=None if "inputs_embeds" in kwargs else input_ids,
            attention_mask=attention_mask,
            slow_cache=slow_cache,
            slow_query_mask=query_mask,
            **kwargs,
        )
        return self.output_class(**outputs, slow_cache=slow_cache)


class SlowFastLlavaOnevisionForConditionalGeneration(
    SlowFastHostMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision / LLaVA-Video with the slow branch."""

    config: SlowFastLlavaOnevisionConfig
    config_class = SlowFastLlavaOnevisionConfig
    output_class = SlowFastLlavaOnevisionOutput

    def fast_video_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The host's `get_video_features`: every projected grid bilinearly resized to ceil(h/2) x ceil(w/2)
        (`apply_pooling`), frames flattened, then one `image_newline` after the video."""
        num_videos, num_frames = projected.shape[:2]
        pooled = self.model.apply_pooling(projected.flatten(0, 1)).unflatten(0, (num_videos, num_frames))
        newline = self.model.image_newline.to(pooled.dtype).expand(num_videos, 1, -1)
        return torch.cat([pooled.flatten(1, 2), newline], dim=1)


class SlowFastLlavaNextVideoForConditionalGeneration(
    SlowFastHostMixin, LlavaNextVideoForConditionalGeneration
):
    """LLaVA-NeXT-Video with the slow branch."""

    config: SlowFastLlavaNextVideoConfig
    config_class = SlowFastLlavaNextVideoConfig
    output_class = SlowFastLlavaNextVideoOutput

    def fast_video_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The host's `get_video_features`: the encoder grid pooled by `vision_resampler`, then projected."""
        num_videos, num_frames = features.shape[:2]
        pooled = self.model.multi_modal_projector(self.model.vision_resampler(features.flatten(0, 1)))
        return pooled.unflatten(0, (num_videos, num_frames)).flatten(1, 2)


# ----- processors ---------------------------------------------------------------------------------
class SlowFastHostProcessorMixin:
    """Expands each `<video>` for the video's fast frames only, while `pixel_values_videos` keeps every
    frame (the model picks the fast ones with the same `select_fast_frames`)."""

    fast_frames: int | None = None

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self.fast_frames is None:
            raise ValueError(
                f"{type(self).__name__}.fast_frames is not set: build the processor with "
                "processor_from_host(processor_or_path, model.config)"
            )
        video = video_inputs["pixel_values_videos"][video_idx]
        index = select_fast_frames(len(video), self.fast_frames)
        fast = video[index] if isinstance(video, torch.Tensor) else [video[i] for i in index]
        return super().replace_video_token({"pixel_values_videos": {video_idx: fast}}, video_idx, **kwargs)


class SlowFastLlavaOnevisionProcessor(SlowFastHostProcessorMixin, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` whose `<video>` expansion counts the fast frames."""


class SlowFastLlavaNextVideoProcessor(SlowFastHostProcessorMixin, LlavaNextVideoProcessor):
    """`LlavaNextVideoProcessor` whose `<video>` expansion counts the fast frames."""


# ----- conversion ---------------------------------------------------------------------------------
class HostFamily(NamedTuple):
    """A supported host: its transformers classes and their slow-fast subclasses."""

    host_model_type: str
    host_model: type
    host_processor: type
    model: type
    processor: type


HOST_FAMILIES = (
    HostFamily(
        "llava_onevision",
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        SlowFastLlavaOnevisionForConditionalGeneration,
        SlowFastLlavaOnevisionProcessor,
    ),
    HostFamily(
        "llava_next_video",
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        SlowFastLlavaNextVideoForConditionalGeneration,
        SlowFastLlavaNextVideoProcessor,
    ),
)


def from_host(model_or_path: nn.Module | str | os.PathLike, **options) -> SlowFastHostMixin:
    """Add the slow branch to a LLaVA-OneVision / LLaVA-NeXT-Video model, in place.

    Args:
        model_or_path: a loaded `LlavaOnevisionForConditionalGeneration` /
            `LlavaNextVideoForConditionalGeneration` (converted in place and returned), or a checkpoint
            path / hub id of one, loaded with the host class's `from_pretrained`.
        options: the slow-fast knobs (fields of `SlowFastHostConfig`: `frames`, `fast_frames`,
            `hybrid_every_n_layers`, `hybrid_min_depth`, `hybrid_max_depth`, `slow_pooling_stride`,
            `gate_type`, `init_cross_kv_from_lm`, ...); with a path, any other option goes to
            `from_pretrained` (`dtype`, `device_map`, `attn_implementation`, ...).

    Returns:
        The slow-fast model: the host's weights under their own names plus the hybrid layers' new
        `...self_attn.cross_attn_*` parameters; with the gates closed it computes what the host computes
        on the fast frames.
    """
    knobs = {k: options.pop(k) for k in list(options) if k in KNOBS}
    if isinstance(model_or_path, (str, os.PathLike)):
        model_type = AutoConfig.from_pretrained(model_or_path).model_type
        family = next((f for f in HOST_FAMILIES if f.host_model_type == model_type), None)
        if family is None:
            raise ValueError(
                f"from_host: {model_or_path} is a {model_type!r} checkpoint; the supported hosts are "
                f"{[f.host_model_type for f in HOST_FAMILIES]} (a slow-fast checkpoint: from_pretrained)"
            )
        model = family.host_model.from_pretrained(model_or_path, **options)
    elif options:
        raise TypeError(
            f"from_host: unknown options {sorted(options)}; the slow-fast knobs are {list(KNOBS)}"
        )
    else:
        model = model_or_path
    family = next((f for f in HOST_FAMILIES if type(model) is f.host_model), None)
    if family is None:
        expected = " or ".join(f.host_model.__name__ for f in HOST_FAMILIES)
        raise TypeError(f"from_host: expected a {expected}, got {type(model).__name__}")
    host_config = model.config
    fields = {f.name: getattr(host_config, f.name) for f in dataclasses.fields(host_config)}
    # The sub-configs are passed (and kept) as the same objects the LLM and vision tower hold; a new
    # config sets its attention backend on them, so hand it theirs.
    attention = {key: getattr(host_config, key)._attn_implementation for key in host_config.sub_configs}
    attention[""] = host_config._attn_implementation
    config = family.model.config_class(**{**fields, **knobs}, attn_implementation=attention)
    config._name_or_path = host_config._name_or_path
    # The host's instance becomes the slow-fast subclass: no weight is copied, moved or renamed.
    model.__class__ = family.model
    model.config = model.model.config = config
    add_hybrid_layers(model.model.language_model, config.slowfast_config)
    return model


def processor_from_host(processor_or_path: ProcessorMixin | str | os.PathLike, config: SlowFastHostConfig):
    """The host's processor (loaded, or at a path), converted in place to expand `<video>` for
    `config.fast_frames` frames; it is then given all the frames of each video."""
    processor = (
        AutoProcessor.from_pretrained(processor_or_path)
        if isinstance(processor_or_path, (str, os.PathLike))
        else processor_or_path
    )
    family = next((f for f in HOST_FAMILIES if type(processor) in (f.host_processor, f.processor)), None)
    if family is None:
        expected = " or ".join(f.host_processor.__name__ for f in HOST_FAMILIES)
        raise TypeError(f"processor_from_host: expected a {expected}, got {type(processor).__name__}")
    processor.__class__ = family.processor
    processor.fast_frames = config.fast_frames
    return processor


def convert_host(
    src: str | os.PathLike, dst: str | os.PathLike, save_processor: bool = True, **options
) -> SlowFastHostMixin:
    """`from_host(src, **options)` saved to `dst`, with the host's processor files unless `save_processor`
    is False (they need torchvision to load). The function behind `convert --from-host`.

    Reload with `AutoModelForImageTextToText.from_pretrained(dst)` and
    `processor_from_host(dst, model.config)`.
    """
    model = from_host(src, **options)
    model.save_pretrained(dst)
    if save_processor:
        AutoProcessor.from_pretrained(src).save_pretrained(dst)
    return model


def freeze_all_but_slow_branch(model: nn.Module) -> list[nn.Parameter]:
    """Stage 1 of plug-and-play training: freeze every host weight; only the hybrid layers' new
    parameters (`cross_attention_parameters`) keep `requires_grad`. Returns them, for the optimizer."""
    trainable = [param for _, param in cross_attention_parameters(model)]
    if not trainable:
        raise ValueError(f"freeze_all_but_slow_branch: {type(model).__name__} has no hybrid layers")
    keep = {id(param) for param in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return trainable


for _family in HOST_FAMILIES:
    AutoConfig.register(_family.model.config_class.model_type, _family.model.config_class)
    AutoModelForImageTextToText.register(_family.model.config_class, _family.model)
    AutoProcessor.register(_family.model.config_class, _family.processor)
    # Checkpoints keep the host's on-disk key layout (transformers saves a loaded host in it).
    register_checkpoint_conversion_mapping(
        _family.model.config_class.model_type,
        get_checkpoint_conversion_mapping(_family.host_model_type),
        overwrite=True,
    )
