"""Plug and play: add the slow branch to another transformers video LLM, one file per host family.

    from_host(model_or_path, **knobs)        a host model -> its slow-fast subclass, in place
    processor_from_host(processor, config)   its processor, expanding `<video>` for the fast frames
    convert_host(src, dst, **knobs)          both, saved (`slowfast-vlm convert --from-host`)

Every host weight keeps its own name; with the gates closed the model computes what the host computes on
the fast frames (docs/plug_and_play.md). Auto classes know these models once `slowfast_vlm.auto` has run
(any top-level `slowfast_vlm` name runs it).
"""

from __future__ import annotations

import dataclasses
import os

from torch import nn
from transformers import AutoConfig, AutoProcessor, ProcessorMixin

from ..modeling.hybrid import add_hybrid_layers
from . import llava_next_video, llava_onevision, qwen2_5_vl, qwen3_vl
from .base import KNOBS, HostFamily, SlowFastHostConfig, SlowFastHostMixin, select_fast_frames

HOST_FAMILIES: tuple[HostFamily, ...] = (
    llava_onevision.FAMILY,
    llava_next_video.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
)


def from_host(model_or_path: nn.Module | str | os.PathLike, **options) -> SlowFastHostMixin:
    """Add the slow branch to a LLaVA-OneVision / LLaVA-NeXT-Video / Qwen2.5-VL / Qwen3-VL model, in place.

    Args:
        model_or_path: a loaded `LlavaOnevisionForConditionalGeneration` /
            `LlavaNextVideoForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` /
            `Qwen3VLForConditionalGeneration` (converted in place and returned), or a checkpoint path /
            hub id of one, loaded with the host class's `from_pretrained`.
        options: the slow-fast knobs (fields of `SlowFastHostConfig`: `frames`, `fast_frames`,
            `hybrid_every_n_layers`, `hybrid_min_depth`, `hybrid_max_depth`, `video_pooling_stride`,
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
    add_hybrid_layers(model.model.language_model, config)
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


__all__ = [
    "HOST_FAMILIES",
    "KNOBS",
    "HostFamily",
    "SlowFastHostConfig",
    "SlowFastHostMixin",
    "convert_host",
    "from_host",
    "processor_from_host",
    "select_fast_frames",
]
