"""Shared builders for tests: tiny random configs and models (no downloads)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration
from slowfast_vlm.training.tiny import train_tokenizer

_TINY = SlowFastConfig.from_name("tiny")
VOCAB = _TINY.text_config.vocab_size
VIDEO_TOKEN_ID = _TINY.video_token_id
IMAGE_TOKEN_ID = _TINY.image_token_id


def tiny_config(llm: str = "qwen2", vision: str = "siglip", **overrides) -> SlowFastConfig:
    """The named config "tiny-<llm>-<vision>": a 4-layer, 64-wide LLM (4 heads, 2 kv heads) with hybrid
    layers 0 and 2, and a 32 px encoder; `overrides` as in `SlowFastConfig.from_name`."""
    return SlowFastConfig.from_name(f"tiny-{llm}-{vision}", **overrides)


def tiny_model(config: SlowFastConfig | None = None, attn: str = "sdpa", seed: int = 0, **overrides):
    """A random `SlowFastForConditionalGeneration` in eval mode, fp32."""
    torch.manual_seed(seed)
    config = config or tiny_config(**overrides)
    model = SlowFastForConditionalGeneration._from_config(config, attn_implementation=attn)
    return model.eval()


def open_gates(model: SlowFastForConditionalGeneration, value: float = 1.0) -> None:
    """Set every warm-up gate to `value` (they start at 0, i.e. the branch is off)."""
    with torch.no_grad():
        for layer in model.hybrid_attentions:
            if layer.gate_type == "tanh-warmup":
                layer.cross_attn_warm_up_gate.fill_(value)


TOKENIZER_CORPUS = [
    "You are a helpful assistant.",
    "What happens in this video? Describe it in detail.",
    "A cat jumps over the fence and runs into the garden.",
    "The man is cooking pasta in a small kitchen.",
    "Is there a dog in the image? Yes, a brown dog is sleeping.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (300 tokens) trained here on a few sentences, with Qwen's ChatML
    special tokens: `<|endoftext|>` (id 0, padding), `<|im_start|>` (1), `<|im_end|>` (2, end of turn).
    It has no `<video>` / `<image>` token; `SlowFastProcessor` adds them (ids 300, 301)."""
    return train_tokenizer(TOKENIZER_CORPUS, vocab_size=300)


def write_random_video(path, num_frames: int = 8, size: int = 32, fps: int = 8, seed: int = 0):
    """Write an h264 mp4 of random frames; returns the frames `(T, size, size, 3)` uint8."""
    import numpy as np

    from slowfast_vlm.processing.video import write_video

    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    write_video(path, frames, fps)
    return frames


def save_tiny_checkpoint(path, seed: int = 0, gates: float | None = 1.0, **overrides):
    """Save a tiny model + processor (tiny tokenizer, placeholders wired) as a checkpoint directory."""
    from slowfast_vlm import SlowFastProcessor

    model = tiny_model(seed=seed, **overrides)
    if gates is not None:
        open_gates(model, gates)
    processor = SlowFastProcessor.from_model_config(model.config, tiny_tokenizer())
    processor.prepare_model(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor
