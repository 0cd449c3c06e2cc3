"""Shared by the vLLM tests: tiny checkpoints whose answers depend on the slow tokens, and the library's
greedy answer as the independent reference."""

import torch
from helpers import open_gates, save_tiny_checkpoint

MAX_NEW_TOKENS = 12
# vLLM's CPU attention takes head sizes >= 32: the tiny LLM widened to 4 heads of 32
VLLM_TINY = {"text_config": {"hidden_size": 128, "intermediate_size": 256}}


def save_checkpoint(path, **overrides):
    """Save a tiny checkpoint whose slow branch decides its answers; returns (model, processor)."""
    model, processor = save_tiny_checkpoint(path, **{**VLLM_TINY, **overrides})
    strengthen_slow_branch(model)
    model.save_pretrained(path)
    return model, processor


def strengthen_slow_branch(model) -> None:
    """Scale the random slow-token projection up and open the gates wide, so that the greedy tokens of the
    tiny model depend on the slow tokens (at random-init scale they do not)."""
    with torch.no_grad():
        for layer in model.hybrid_attentions:
            layer.cross_attn_kv_proj.weight.mul_(8.0)
            layer.cross_attn_gate_proj[0].bias.fill_(3.0)
    open_gates(model, 3.0)


def reference(model, processor, prompt: str, video=None, image=None) -> list[int]:
    """Greedy new token ids from the library's `generate` (the independent reference)."""
    inputs = processor(
        text=prompt,
        videos=None if video is None else [video],
        images=None if image is None else [image],
        return_tensors="pt",
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1] :].tolist()
