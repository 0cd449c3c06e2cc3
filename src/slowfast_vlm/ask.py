"""Answer a question about a video: `slowfast-vlm ask [--model PATH_OR_ID] VIDEO QUESTION` (arguments:
`commands.add_ask_arguments`).

The answer streams to stdout as it is generated; progress goes to stderr. Exit status 0 on
success; 2 with a one-line reason on stderr for a bad video, a missing model, a model id that
cannot be fetched offline, a bad device, an unwritable --attention-map path, or a prompt longer than
the model's positions. Out-of-range options are refused while parsing (`commands`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from transformers import TextStreamer

from .attention_maps import save_attention_map_png
from .default_model import default_model_path
from .inference import (
    PromptTooLongError,
    answer,
    compute_attention_map,
    first_line,
    load_model,
    resolve_device,
    resolve_dtype,
    text_span,
)
from .visual_cache import VisualCache


def _progress(message: str) -> None:
    print(f"[slowfast-vlm] {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"slowfast-vlm ask: {message}", file=sys.stderr)
    return 2


def check_writable(path: Path) -> None:
    """Raise `OSError` unless a file can be written at `path` (checked before the work, not after)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory")
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such directory {str(folder)!r}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{path}: not writable")


def main(args: argparse.Namespace) -> int:
    try:
        model_id = args.model or str(default_model_path())
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.attention_map is not None:
            check_writable(args.attention_map)
    except OSError as error:
        return _fail(f"--attention-map {error}")
    except ValueError as error:
        return _fail(str(error))
    if not os.path.isfile(args.video):  # before the model loads, which takes a while
        return _fail(f"{args.video}: no such video file")
    started = time.perf_counter()
    _progress(f"loading {model_id} on {device} ({str(dtype).removeprefix('torch.')})")
    try:
        model, processor = load_model(model_id, device, dtype)
    except (OSError, ValueError) as error:
        return _fail(f"cannot load model {model_id!r}: {first_line(error)}")
    # None means "not given": the parser has refused 0 and negatives, so nothing is replaced silently
    options = processor.sampling_options(args.frames, args.fps, args.sampling)
    num_frames, fps, sampling = options["num_frames"], options["fps"], options["sampling"]

    _progress(f"decoding {args.video} ({num_frames} frames, {sampling} sampling at {fps} fps)")
    try:
        frames, metadata = processor.load_video(args.video, num_frames, fps=fps, sampling=sampling)
    except (OSError, ValueError) as error:
        return _fail(first_line(error))
    _progress(f"{len(frames)} frames of {metadata.duration:.1f} s; generating")

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cache = VisualCache(budget_bytes=2**40)  # this one video: encoded once, for the answer and its map
    try:
        reply = answer(
            model, processor, frames, args.question, args.max_new_tokens, args.temperature, streamer, cache
        )
    except PromptTooLongError as error:
        return _fail(str(error))
    _progress(f"done in {time.perf_counter() - started:.1f} s")

    if args.attention_map is not None:
        try:  # what the question's own tokens read: the evidence it asks about
            span = text_span(processor, reply.prompt, args.question, len(frames))
        except ValueError as error:
            return _fail(f"--attention-map: {first_line(error)}")
        attention = compute_attention_map(model, reply.output, reply.video, span)
        try:
            save_attention_map_png(attention, args.attention_map, frames=frames, title=args.question)
        except OSError as error:
            return _fail(f"--attention-map {args.attention_map}: {first_line(error)}")
        _progress(
            f"attention map of the question's tokens (peak at frame {attention.peak_frame}) written to "
            f"{args.attention_map}"
        )
    return 0
