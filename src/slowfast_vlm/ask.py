"""Answer a question about a video: `slowfast-vlm ask [--model PATH_OR_ID] VIDEO QUESTION` (arguments:
`commands.add_ask_arguments`).

The answer streams to stdout as it is generated; progress goes to stderr. Exit status 0 on
success; 2 with a one-line reason on stderr for a bad video, a missing model, a model id that
cannot be fetched offline, or a bad device.
"""

from __future__ import annotations

import argparse
import sys
import time

from transformers import TextStreamer

from .attention_maps import save_attention_map_png
from .default_model import default_model_path
from .inference import answer, compute_attention_map, first_line, load_model, resolve_device, resolve_dtype
from .processing.video import load_video


def _progress(message: str) -> None:
    print(f"[slowfast-vlm] {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        model_id = args.model or str(default_model_path())
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm ask: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    _progress(f"loading {model_id} on {device} ({str(dtype).removeprefix('torch.')})")
    try:
        model, processor = load_model(model_id, device, dtype)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm ask: cannot load model {model_id!r}: {first_line(error)}", file=sys.stderr)
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
    reply = answer(model, processor, frames, args.question, args.max_new_tokens, args.temperature, streamer)
    _progress(f"done in {time.perf_counter() - started:.1f} s")

    if args.attention_map is not None:
        attention = compute_attention_map(model, reply.output, reply.video)
        save_attention_map_png(attention, args.attention_map, frames=frames, title=args.question)
        _progress(f"attention map (peak at frame {attention.peak_frame}) written to {args.attention_map}")
    return 0
