"""Build a small slow-fast model from scratch: a random SigLIP-style encoder, a random Qwen2-style LLM and
a byte-level BPE tokenizer trained on the task's texts (for the CPU-scale experiments, `experiments/synth`).

Every component is random; nothing is downloaded. The same builder gives the self-attention-only
baselines (`hybrid_layers=[]`) and the slow-fast model, so they differ only in the knobs passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Qwen2Config, SiglipVisionConfig

from ..config import SlowFastConfig
from ..modeling.model import SlowFastForConditionalGeneration
from ..processing.processor import SlowFastProcessor
from .build import _with_chatml
from .tiny import train_tokenizer


@dataclass
class ScratchGeometry:
    """Sizes of a from-scratch model (vision encoder, LLM) and its slow-fast knobs."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    llm_hidden: int = 128
    llm_intermediate: int = 512
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 1
    slowfast: dict[str, Any] = field(default_factory=dict)


def scratch_vision_config(geometry: ScratchGeometry) -> SiglipVisionConfig:
    """The SigLIP-style encoder config of a from-scratch model (also what a vision pre-training stage builds)."""
    return SiglipVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=4 * geometry.vision_hidden,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
    )


def build_scratch_model(
    texts: list[str], geometry: ScratchGeometry, video_defaults: dict | None = None, seed: int = 0
) -> tuple[SlowFastForConditionalGeneration, SlowFastProcessor]:
    """A randomly initialised slow-fast model and its processor, with a tokenizer trained on `texts`.

    `geometry.slowfast` holds `SlowFastConfig` knobs (e.g. `hybrid_layers`); `video_defaults` is saved
    with the processor (what `slowfast-vlm ask` samples by default).
    """
    tokenizer = _with_chatml(train_tokenizer(["You are a helpful assistant.", *texts]))
    vision_config = scratch_vision_config(geometry)
    text_config = Qwen2Config(
        vocab_size=len(tokenizer) + 2,  # + the <video> / <image> placeholders the processor adds
        hidden_size=geometry.llm_hidden,
        intermediate_size=geometry.llm_intermediate,
        num_hidden_layers=geometry.llm_layers,
        num_attention_heads=geometry.llm_heads,
        num_key_value_heads=geometry.llm_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config = SlowFastConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **geometry.slowfast
    )
    torch.manual_seed(seed)
    model = SlowFastForConditionalGeneration(config)
    processor = SlowFastProcessor.from_model_config(config, tokenizer, video_defaults=video_defaults)
    processor.prepare_model(model)
    return model, processor
