"""Shared by the vLLM tests: tiny checkpoints whose answers depend on the slow tokens, and the library's
greedy answer as the independent reference."""

import gc
import os

import torch
from helpers import open_gates, save_tiny_checkpoint

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: no spawn

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


def reference(model, processor, prompt: str, video=None, image=None, **processor_kwargs) -> list[int]:
    """Greedy new token ids from the library's `generate` (the independent reference)."""
    inputs = processor(
        text=prompt,
        videos=None if video is None else [video],
        images=None if image is None else [image],
        return_tensors="pt",
        **processor_kwargs,
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1] :].tolist()


def vllm_request(prompt: str, video=None, image=None, **mm_kwargs) -> dict:
    request = {"prompt": prompt}
    if video is not None:
        metadata = {"fps": 8.0, "total_num_frames": len(video), "frames_indices": list(range(len(video)))}
        request["multi_modal_data"] = {"video": (video, metadata)}
    if (
        image is not None
    ):  # a still image travels as a one-frame video (one modality per request in vLLM 0.32)
        request["multi_modal_data"] = {
            "video": (image[None], {"fps": 1.0, "total_num_frames": 1, "frames_indices": [0]})
        }
    if mm_kwargs:
        request["mm_processor_kwargs"] = mm_kwargs
    return request


def make_engine(path, **options):
    """vLLM's offline engine on a checkpoint directory (fp32, eager: ~20 s to start on CPU)."""
    from vllm import LLM

    settings = dict(max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=8)
    return LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        limit_mm_per_prompt={"video": 1},
        seed=0,
        **{**settings, **options},
    )


def close_engine(engine) -> None:
    """Free an in-process engine and vLLM's process groups, so that the next module can start its own."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine.llm_engine.engine_core.shutdown()  # its workers too (tensor parallel)
    del engine
    gc.collect()
    cleanup_dist_env_and_memory()


def greedy(engine, requests) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    return [list(out.outputs[0].token_ids) for out in engine.generate(requests, params, use_tqdm=False)]
