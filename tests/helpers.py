"""Shared builders for tests: tiny random configs and models (no downloads)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration
from slowfast_vlm.training.tiny import train_tokenizer

VOCAB = 128
VIDEO_TOKEN_ID = VOCAB - 2
IMAGE_TOKEN_ID = VOCAB - 1

TEXT_CONFIGS = {
    "qwen2": dict(model_type="qwen2"),
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}
VISION_CONFIGS = {
    # 32 px frames; 4x4 grids
    "siglip": dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    ),
    "clip": dict(
        model_type="clip_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
    "convnext": dict(
        model_type="convnext",
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        patch_size=4,
        image_size=32,
    ),
}


def tiny_config(llm: str = "qwen2", vision: str = "siglip", **overrides) -> SlowFastConfig:
    """A 4-layer, 64-wide LLM (4 heads, 2 kv heads) with hybrid layers 0 and 2, and a 32 px encoder."""
    text = dict(
        TEXT_CONFIGS[llm],
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    knobs = dict(
        hybrid_every_n_layers=2,
        min_fast_frames=2,
        video_token_id=VIDEO_TOKEN_ID,
        image_token_id=IMAGE_TOKEN_ID,
    )
    knobs.update(overrides)
    return SlowFastConfig(text_config=text, vision_config=dict(VISION_CONFIGS[vision]), **knobs)


def tiny_model(config: SlowFastConfig | None = None, attn: str = "sdpa", seed: int = 0, **overrides):
    """A random `SlowFastForConditionalGeneration` in eval mode, fp32."""
    torch.manual_seed(seed)
    config = config or tiny_config(**overrides)
    model = SlowFastForConditionalGeneration._from_config(config, attn_implementation=attn)
    return model.eval()


def open_gates(model: SlowFastForConditionalGeneration, value: float = 1.0) -> None:
    """Set every warm-up gate to `value` (they start at 0, i.e. the branch is off)."""
    with torch.no_grad():
        for layer in model.hybrid_layers:
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
