"""The vLLM check of `gpu_check.py`, run by the interpreter that has vllm and the project's plugin
(`--vllm-python`; vllm pins its own torch, so it lives in its own venv): prints one JSON line.

A tiny checkpoint (the "tiny" geometry widened to heads of 32, as vLLM's attention needs; gates open
and strong) is saved with its processor, then served by `vllm.LLM`, fp32, eager:
- parity: greedy answers to 8 video prompts (different random videos) equal to `generate`'s, one by one;
- throughput: generated tokens per second of 32 concurrent video requests (`ignore_eos`).

    VLLM_PYTHON scripts/gpu_check_vllm.py [--requests 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

PARITY_REQUESTS, FRAMES, SIZE = 8, 8, 32


def tiny_checkpoint(path: str):
    import torch

    from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration, SlowFastProcessor
    from slowfast_vlm.training.tiny import train_tokenizer

    config = SlowFastConfig.from_name("tiny", text_config={"hidden_size": 128, "intermediate_size": 256})
    torch.manual_seed(0)
    model = SlowFastForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    corpus = ["You are a helpful assistant.", "What happens in this video? Describe it in detail."]
    processor = SlowFastProcessor.from_model_config(config, train_tokenizer(corpus, vocab_size=300))
    processor.prepare_model(model)
    with torch.no_grad():
        for layer in model.hybrid_attentions:
            layer.cross_attn_warm_up_gate.fill_(3.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}
    ]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as path:
        model, processor = tiny_checkpoint(path)
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        expected = []
        for video in videos[:PARITY_REQUESTS]:
            inputs = processor(text=prompt, videos=[video], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            expected.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
        cuda = torch.cuda.is_available()
        engine = LLM(
            model=path,
            dtype="float32",
            enforce_eager=True,
            max_model_len=1024,
            max_num_batched_tokens=4096,
            max_num_seqs=args.requests,
            limit_mm_per_prompt={"video": 1},
            seed=0,
            **({"gpu_memory_utilization": 0.3} if cuda else {}),
        )
        metadata = {"fps": 8.0, "total_num_frames": FRAMES, "frames_indices": list(range(FRAMES))}
        requests = [{"prompt": prompt, "multi_modal_data": {"video": (v, metadata)}} for v in videos]
        greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
        outputs = engine.generate(requests[:PARITY_REQUESTS], greedy, use_tqdm=False)
        served = [list(output.outputs[0].token_ids) for output in outputs]
        equal = sum(a == b for a, b in zip(served, expected, strict=True))
        forced = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = engine.generate(requests, forced, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    result = {
        "check": "vLLM",
        "device": "cuda" if cuda else "cpu",
        "parity": f"{equal}/{PARITY_REQUESTS} greedy answers equal generate's",
        "requests": args.requests,
        "tokens_per_s": round(tokens / seconds, 1),
        "passed": equal == PARITY_REQUESTS,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM's engine core may be spawned: the guard keeps it from re-running this
    main()
