"""What every host plug-in shares: the slow-fast knobs on a host config, the slow branch on a host model,
and the `<video>` expansion for the fast frames on a host processor.

A host family (one file each) combines these mixins with its transformers classes and says how its
videos become fast and slow tokens (`SlowFastHostMixin.video_inputs`): LLaVA-style hosts
(`LlavaHostMixin`: one feature grid per frame) here, Qwen-VL hosts (flattened patches with
`video_grid_thw`) in `qwen2_5_vl.py` (shared with `qwen3_vl.py`).

The model takes all the frames in `pixel_values_videos` and picks the fast ones itself, so every
`<video>` placeholder run in `input_ids` is as long as the host's run for the fast frames; the host's
processor, converted by `processor_from_host`, expands it that way.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from transformers.modeling_outputs import ModelOutput
from transformers.utils.generic import can_return_tuple

from ..config import SlowBranchConfig
from ..modeling.hybrid import HybridAttention, add_hybrid_layers
from ..modeling.slow_tokens import (
    SlowCache,
    SlowCacheGenerationMixin,
    build_slow_cache,
    pool_frames,
    query_mask,
)
from ..modeling.vision import vision_grid
from ..processing.video import uniform_sample_indices

# Arguments of the host's `get_image_features` beyond pixels and sizes, when images come with videos.
IMAGE_FEATURE_KWARGS = ("vision_aspect_ratio", "batch_num_images")


def select_fast_frames(num_frames: int, fast_frames: int) -> list[int]:
    """Which of a video's `num_frames` frames the host sees: `min(fast_frames, num_frames)` uniform ones."""
    return uniform_sample_indices(num_frames, min(fast_frames, num_frames))


class SlowFastHostConfig(SlowBranchConfig):
    r"""The slow-fast knobs, mixed into a host config class (one per host family): the slow branch's
    (`SlowBranchConfig`, as in [`SlowFastConfig`]) and these.

    Args:
        frames: frames per video the model is meant to be given (what to decode, e.g.
            `load_video(path, config.frames)`); the model accepts any number.
        fast_frames: how many of a video's frames, chosen uniformly, the host sees as its video.
        video_pooling_stride: as in `SlowBranchConfig`, but 1 (unpooled) by default: a host's frame
            grid is already its own compromise between tokens and detail.
    """

    frames: int = 64
    fast_frames: int = 16
    video_pooling_stride: int = 1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        name = type(self).__name__
        for field in ("frames", "fast_frames"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be an integer >= 1, got {value!r}")
        if self.fast_frames > self.frames:
            raise ValueError(f"{name}.fast_frames={self.fast_frames} is more than frames={self.frames}")


# The fields a host config gets on top of its own (what `from_host` takes as knobs).
KNOBS = tuple(SlowBranchConfig.__annotations__) + tuple(SlowFastHostConfig.__annotations__)


class SlowFastHostMixin(SlowCacheGenerationMixin):
    """The slow branch on top of a host `...ForConditionalGeneration` (mixed in before the host class).

    Videos: `pixel_values_videos` holds every frame of every video. A family's `video_inputs` encodes
    them once, puts the fast tokens into the host's forward arguments (as the host itself would for the
    fast frames) and returns each video's slow tokens; everything else (images, positions, loss) is the
    host's own code. The slow tokens reach the hybrid layers as `slow_cache=` / `slow_query_mask=` through
    the host's forward kwargs, built by the same `slow_tokens` functions as in
    `SlowFastForConditionalGeneration`.
    """

    config: SlowFastHostConfig
    output_class: type[ModelOutput]  # the host's causal-LM output plus `slow_cache`
    # Whether the host's forward takes `input_ids` next to `inputs_embeds` (Qwen-VL computes its
    # multimodal positions from them; LLaVA refuses both).
    ids_with_embeds: bool = False
    # Whether `video_inputs` hands the host the fast frames' pixels to encode itself (Qwen3-VL: its
    # deepstack features of the video tokens go into its early layers, which embeddings cannot carry).
    host_encodes_fast_frames: bool = False

    def __init__(self, config: SlowFastHostConfig):
        super().__init__(config)
        add_hybrid_layers(self.model.language_model, config)

    @property
    def hybrid_attentions(self) -> list[HybridAttention]:
        """The cross-attention blocks of the hybrid decoder layers, in layer order."""
        return [m for m in self.model.language_model.modules() if isinstance(m, HybridAttention)]

    def video_inputs(
        self, pixel_values_videos: torch.Tensor, kwargs: dict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encode every frame of every video once. Returns each video's fast tokens `(N_fast, D)` (the
        host's video tokens for its fast frames) and slow tokens `(N_slow, D)`; `kwargs` (the host's
        forward arguments) are updated to describe the fast frames where the host needs it."""
        raise NotImplementedError

    def embed_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """`embeds` `(B, L, D)` with any images' features, when the host cannot add them itself."""
        return embeds

    def slow_cache_for(
        self,
        input_ids: torch.Tensor,
        slow: list[torch.Tensor],
        fast_lengths: list[int],
        record_attention: bool = False,
    ) -> SlowCache:
        """Gather each row's slow tokens: video k fills the k-th run of `fast_lengths[k]` `<video>` tokens
        of `input_ids` in row-major order, as the host scatters them."""
        rows = (input_ids == self.config.video_token_id).nonzero()[:, 0]  # row of every <video> token
        if rows.numel() != sum(fast_lengths) or any(
            run[0] != run[-1] for run in rows.split(fast_lengths) if run.numel()
        ):
            raise ValueError(
                f"input_ids hold {rows.numel()} <video> tokens, but the {len(slow)} video(s) given need "
                f"one run each of {fast_lengths} (the host's tokens for their fast frames); expand <video> "
                "with the processor from `processor_from_host` and pass all frames of every video"
            )
        per_row: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        for run, video_slow in zip(rows.split(fast_lengths), slow):
            per_row[int(run[0])].append(video_slow)
        dim = slow[0].shape[-1]
        row_slow = [torch.cat(videos) if videos else slow[0].new_zeros(0, dim) for videos in per_row]
        # K/V caching only pays off across generation steps; in training the cache dies with the step.
        return build_slow_cache(
            row_slow, slow[0], cache_kv=not self.training, record_attention=record_attention
        )

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        # `forward` takes the host's arguments as **kwargs: what the host's forward takes is used.
        host_arguments = inspect.signature(super().forward).parameters
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in host_arguments})

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
        position_ids: torch.LongTensor | None = None,
        slow_cache: SlowCache | None = None,
        slow_query_mask: torch.Tensor | None = None,
        record_slow_attention: bool = False,
        **kwargs,
    ) -> ModelOutput:
        r"""The host's forward (same arguments), with all frames of each video in `pixel_values_videos`.

        Args:
            input_ids: `(B, L)`; each `<video>` run is the host's run for the video's fast frames.
            pixel_values_videos: every frame of every video, in the family's layout.
            position_ids: as for the host (named here so that `generate` prepares them as for the host).
            slow_cache: the slow tokens of an earlier call (`generate` carries it between steps).
            slow_query_mask: `(B, L)` bool, overrides which positions query the slow tokens.
            record_slow_attention: accumulate the hybrid layers' cross-attention probabilities in the
                returned `slow_cache` (`slow_cache.attention_map()`), for attention maps.
        """
        is_visual = None
        if pixel_values_videos is not None:
            if input_ids is None:
                raise ValueError("pixel_values_videos need input_ids to locate their <video> tokens")
            fast, slow = self.video_inputs(pixel_values_videos, kwargs)
            slow_cache = self.slow_cache_for(input_ids, slow, [len(f) for f in fast], record_slow_attention)
            if not self.host_encodes_fast_frames:
                # The fast tokens go where the host scatters its video features; the host then gets the
                # embeddings (transformers before 5.18 has no way to pass it video features).
                embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
                embeds = self.scatter_features(
                    embeds, input_ids == self.config.video_token_id, torch.cat(fast)
                )
                kwargs["inputs_embeds"] = self.embed_images(input_ids, embeds, kwargs)
            visual_ids = torch.tensor([self.config.video_token_id, self.config.image_token_id])
            is_visual = torch.isin(input_ids, visual_ids.to(input_ids.device))
        if slow_query_mask is None:
            new = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            slow_query_mask = query_mask(self.config, new.shape[:2], is_visual, attention_mask, slow_cache)
        outputs = super().forward(
            input_ids=None if "inputs_embeds" in kwargs and not self.ids_with_embeds else input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            slow_cache=slow_cache,
            slow_query_mask=slow_query_mask,
            **kwargs,
        )
        return self.output_class(**outputs, slow_cache=slow_cache)


class LlavaHostMixin(SlowFastHostMixin):
    """LLaVA-style hosts (`vision_tower` + `multi_modal_projector`, one feature grid per frame):

        frames (B, T, 3, H, W) --host vision tower (feature layer) + projector--> (B, T, h*w, D)
            fast: the host's own video tokens of `fast_frames` frames chosen uniformly out of T
            slow: all T grids, average-pooled with `video_pooling_stride`, (T * h' * w', D)

    A family says how its video tokens are made from the fast frames (`fast_video_tokens`).
    """

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
        slow = pool_frames(grids, self.config.video_pooling_stride).reshape(num_videos, -1, grids.shape[-1])
        return fast, slow

    def video_inputs(
        self, pixel_values_videos: torch.Tensor, kwargs: dict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`(B_v, T, 3, H, W)` videos -> per video fast `(N_fast, D)` and slow `(T*h'*w', D)` tokens."""
        fast, slow = self.video_tokens(pixel_values_videos)
        return list(fast), list(slow)

    def embed_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The host's image features scattered at its `<image>` tokens (it is given embeddings only)."""
        if kwargs.get("pixel_values") is None:
            return embeds
        image_kwargs = {k: kwargs[k] for k in IMAGE_FEATURE_KWARGS if k in kwargs}
        image_features = self.model.get_image_features(
            kwargs.pop("pixel_values"), kwargs.get("image_sizes"), return_dict=True, **image_kwargs
        ).pooler_output  # per image (N_i, D)
        return self.scatter_features(
            embeds, input_ids == self.config.image_token_id, torch.cat(image_features)
        )


class SlowFastHostProcessorMixin:
    """Expands each `<video>` for the video's fast frames only, while `pixel_values_videos` keeps every
    frame (the model picks the fast ones with the same `select_fast_frames`)."""

    fast_frames: int | None = None

    def checked_fast_frames(self) -> int:
        """`fast_frames`, which `processor_from_host` sets."""
        if self.fast_frames is None:
            raise ValueError(
                f"{type(self).__name__}.fast_frames is not set: build the processor with "
                "processor_from_host(processor_or_path, model.config)"
            )
        return self.fast_frames

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        index = select_fast_frames(len(video), self.checked_fast_frames())
        fast = video[index] if isinstance(video, torch.Tensor) else [video[i] for i in index]
        return super().replace_video_token({"pixel_values_videos": {video_idx: fast}}, video_idx, **kwargs)


class HostFamily(NamedTuple):
    """A supported host: its transformers classes and their slow-fast subclasses."""

    host_model_type: str
    host_model: type
    host_processor: type
    model: type
    processor: type
