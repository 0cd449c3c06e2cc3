"""Build a small slow-fast model from scratch: the named config "scratch" (a random SigLIP-style encoder,
a random Qwen2-style LLM) and a byte-level BPE tokenizer trained on the task's texts (for the CPU-scale
experiments, `experiments/synth`).

Every component is random; nothing is downloaded. The same builder gives the self-attention-only
baselines (`hybrid_layers=[]`) and the slow-fast model, so they differ only in the knobs passed.
"""

from __future__ import annotations

import torch

from ..config import SlowFastConfig
from ..modeling.model import SlowFastForConditionalGeneration
from ..processing.processor import SlowFastProcessor
from .build import _with_chatml
from .tiny import train_tokenizer


def build_scratch_model(
    texts: list[str], video_defaults: dict | None = None, seed: int = 0, **knobs
) -> tuple[SlowFastForConditionalGeneration, SlowFastProcessor]:
    """A randomly initialised model of the named config "scratch" and its processor, with a tokenizer
    trained on `texts`.

    `knobs` replace the config's `SlowFastConfig` knobs (e.g. `hybrid_layers`); `video_defaults` is saved
    with the processor (what `slowfast-vlm ask` samples by default).
    """
    tokenizer = _with_chatml(train_tokenizer(["You are a helpful assistant.", *texts]))
    # + the <video> / <image> placeholders the processor adds
    config = SlowFastConfig.from_name("scratch", text_config={"vocab_size": len(tokenizer) + 2}, **knobs)
    torch.manual_seed(seed)
    model = SlowFastForConditionalGeneration(config)
    processor = SlowFastProcessor.from_model_config(config, tokenizer, video_defaults=video_defaults)
    processor.prepare_model(model)
    return model, processor
