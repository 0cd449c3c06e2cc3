"""`slowfast-vlm serve --engine vllm`: vLLM's OpenAI server for a slow-fast checkpoint, with this plugin.

It runs `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console script does not start)
in this interpreter, with the settings the model needs: the `slowfast` video loader at the checkpoint's
frame sampling, one video per request, `--max-frames` as the hard cap a request cannot raise, and
message text escaped so that it never spells control tokens (`escaping.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys

import torch

from ...processing.processor import SlowFastProcessor
from .escaping import MODEL_ENV, EscapeControlTokens
from .video_loader import BACKEND, LIMITS_ENV

CPU_KV_CACHE_GIB = 2
"""`VLLM_CPU_KVCACHE_SPACE` (GiB) on a CPU machine unless the environment sets it."""


def vllm_server_argv(args: argparse.Namespace, processor: SlowFastProcessor) -> list[str]:
    """The `vllm.entrypoints.openai.api_server` command line for `args` (`slowfast-vlm serve` options).

    Requests may set `media_io_kwargs` / `mm_processor_kwargs` (`--trust-request-mm-kwargs`): the plugin
    accepts only frame counts and rates there, within the caps of `video_limits` and `--max-frames`."""
    defaults = processor.sampling_defaults()
    video_io = {
        "video_backend": BACKEND,
        "num_frames": min(int(defaults["num_frames"]), args.max_frames),
        "fps": float(defaults["fps"]),
    }
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    argv += ["--host", args.host, "--port", str(args.port)]
    argv += ["--served-model-name", args.served_model_name or os.path.basename(os.path.normpath(args.model))]
    argv += ["--dtype", args.dtype, "--limit-mm-per-prompt", json.dumps({"video": 1})]
    argv += ["--media-io-kwargs", json.dumps({"video": video_io}), "--trust-request-mm-kwargs"]
    # the processor's hard cap on frames per video (a request's num_frames above it is refused)
    argv += ["--hf-overrides", json.dumps({"max_num_frames": args.max_frames})]
    from .processor import num_slow_tokens  # (imports vLLM)

    # no chunked prefill in vLLM's encoder-decoder mode: a step must hold one video's slow tokens
    batched = max(num_slow_tokens(processor, args.max_frames), 8192)
    argv += ["--max-num-batched-tokens", str(batched)]
    # typed text never becomes control tokens (escaping.py)
    argv += ["--middleware", f"{EscapeControlTokens.__module__}.{EscapeControlTokens.__name__}"]
    return argv + shlex.split(args.vllm_args or "")  # (vLLM takes an option's last value)


def video_limits_env(args: argparse.Namespace, processor: SlowFastProcessor) -> dict[str, str]:
    """The environment entry that gives the `slowfast` video loader its hard limits."""
    limits = {
        "max_frames": args.max_frames,
        "max_source_pixels": args.max_video_pixels,
        "max_duration": args.max_video_seconds,
        "short_side": processor.decode_short_side(),
    }
    return {LIMITS_ENV: json.dumps(limits)}


def main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("vllm") is None:
        print(
            "slowfast-vlm serve: --engine vllm: vLLM is not installed in this Python "
            "(bash scripts/install_vllm_cpu.sh, then run the venv's slowfast-vlm)",
            file=sys.stderr,
        )
        return 2
    if not args.model:
        print("slowfast-vlm serve: --engine vllm needs --model (a checkpoint directory)", file=sys.stderr)
        return 2
    processor = SlowFastProcessor.from_pretrained(args.model)
    argv = vllm_server_argv(args, processor)
    env = {**os.environ, **video_limits_env(args, processor), MODEL_ENV: args.model}
    if not torch.cuda.is_available() or args.device == "cpu":
        # vLLM's CPU backend otherwise reserves 92% of the host's memory, refused on a busy machine
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    os.execve(argv[0], argv, env)
    return 0  # not reached
