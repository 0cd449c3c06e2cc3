"""Answer a question about a video: `slowfast-vlm ask [--model PATH_OR_ID] VIDEO QUESTION`.

The answer streams to stdout as it is generated; progress goes to stderr. Exit status 0 on
success; 2 with a one-line reason on stderr for a bad video, a missing model, or a model id that
cannot be fetched offline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="path to a video file")
    parser.add_argument("question", help="the question to answer")
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the shipped demo model)")
    parser.add_argument("--frames", type=int, default=None, help="frames to sample (default: the model's)")
    parser.add_argument("--fps", type=float, default=None, help="target sampling rate (default: the model's)")
    parser.add_argument("--sampling", choices=("fps", "uniform"), default=None, help="frame-selection rule")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="default: bfloat16 on GPU")
    parser.add_argument("--attention-map", type=Path, help="also write the slow-token attention map PNG here")


def _progress(message: str) -> None:
    print(f"[slowfast-vlm] {message}", file=sys.stderr, flush=True)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA with bfloat16 when available, else CPU with float32."""
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    chosen = DTYPES[dtype] or (torch.bfloat16 if resolved.type == "cuda" else torch.float32)
    return resolved, chosen


def load_model_and_processor(model_id: str, device: torch.device, dtype: torch.dtype):
    """Load a slow-fast checkpoint (ours or the reference release's format) and its processor.

    Raises `OSError` with a readable reason when the model cannot be found or fetched.
    """
    from . import SlowFastForConditionalGeneration
    from .processing.processor import SlowFastProcessor

    model = SlowFastForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = SlowFastProcessor.from_pretrained(model_id)
    return model, processor


def answer(
    model,
    processor,
    frames,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Generate an answer for `frames` `(T, H, W, 3)` uint8; returns (text, full ids (1, L), video tensor)."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return reply(model, processor, conversation, frames, max_new_tokens, temperature, streamer)


def reply(
    model,
    processor,
    conversation: list[dict],
    frames=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
    **generate_kwargs,
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """Generate the assistant's next turn of a (multi-turn) chat-template `conversation`.

    `frames` `(T, H, W, 3)` uint8 fill its one `{"type": "video"}` part (None: a text-only chat);
    `generate_kwargs` go to `model.generate`. Returns (text, full ids (1, L), video tensor or None).
    """
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    videos = None if frames is None else [frames]
    inputs = processor(text=prompt, videos=videos, return_tensors="pt").to(model.device)
    video = None if frames is None else inputs["pixel_values_videos"][0].to(model.dtype)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    output = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values_videos=None if video is None else [video],
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        **sampling,
        **generate_kwargs,
    )
    text = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return text.strip(), output, video


def main(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from .default_model import default_model_path
    from .processing.video import load_video

    try:
        model_id = args.model or str(default_model_path())
    except OSError as error:
        print(f"slowfast-vlm ask: {error}", file=sys.stderr)
        return 2
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    started = time.perf_counter()
    _progress(f"loading {model_id} on {device} ({str(dtype).removeprefix('torch.')})")
    try:
        model, processor = load_model_and_processor(model_id, device, dtype)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"slowfast-vlm ask: cannot load model {model_id!r}: {reason}", file=sys.stderr)
        return 2
    defaults = processor.sampling_defaults()
    num_frames = args.frames or defaults["num_frames"]
    fps = args.fps or defaults["fps"]
    sampling = args.sampling or defaults["sampling"]

    _progress(f"decoding {args.video} ({num_frames} frames, {sampling} sampling at {fps} fps)")
    try:
        frames, metadata = load_video(args.video, num_frames, fps=fps, sampling=sampling)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm ask: {error}", file=sys.stderr)
        return 2
    _progress(f"{len(frames)} frames of {metadata.duration:.1f} s; generating")

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        _, output, video = answer(
            model, processor, frames, args.question, args.max_new_tokens, args.temperature, streamer
        )
    _progress(f"done in {time.perf_counter() - started:.1f} s")

    if args.attention_map is not None:
        from .attention_maps import compute_attention_map, save_attention_map_png

        attention = compute_attention_map(model, output, video)
        save_attention_map_png(attention, args.attention_map, frames=frames, title=args.question)
        _progress(f"attention map (peak at frame {attention.peak_frame}) written to {args.attention_map}")
    return 0
