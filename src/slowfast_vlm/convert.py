"""`slowfast-vlm convert`: save a released reference checkpoint (or, with --from-host, a host video LLM
with the slow branch added) in this library's `save_pretrained` format.

What the reference format is and how it maps: `slowfast_vlm.modeling.reference_format` and
docs/convert.md. `SlowFastForConditionalGeneration.from_pretrained` also reads reference checkpoints
directly; converting once saves doing it at every load and adds the processor.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig

from .modeling import SlowFastForConditionalGeneration
from .modeling.reference_format import REFERENCE_MODEL_TYPES, is_reference_checkpoint, local_checkpoint_dir
from .processing.processor import SlowFastProcessor

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    vision_config: str | os.PathLike | Mapping | PretrainedConfig | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert the reference checkpoint `src` into a `save_pretrained` directory `dst`.

    With a tokenizer in `src`, `dst` also gets a `SlowFastProcessor` (tokenizer with `<video>` /
    `<image>` added, matching image processor), the model's `video_token_id` / `image_token_id` are
    set and its embeddings grown if the tokenizer outgrew them. Returns `dst`.
    """
    dst = Path(dst)
    directory = local_checkpoint_dir(src, {})
    logger.info("loading reference checkpoint %s", directory)
    model = SlowFastForConditionalGeneration.from_reference_checkpoint(
        directory, vision_config=vision_config, dtype=dtype
    )
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        processor = SlowFastProcessor.from_model_config(
            model.config, AutoTokenizer.from_pretrained(directory)
        )
        processor.prepare_model(model)
        logger.info(
            "tokenizer: %d tokens, video_token_id=%d, image_token_id=%d",
            len(processor.tokenizer),
            processor.video_token_id,
            processor.image_token_id,
        )
        processor.save_pretrained(dst)
    else:
        logger.warning(
            "%s has no tokenizer: %s gets no processor and video_token_id / image_token_id stay unset",
            src,
            dst,
        )
    logger.info("saving %s", dst)
    model.save_pretrained(dst)
    return dst


# ----- command line -------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("slowfast-vlm convert: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.from_host:
            from .hosts import convert_host

            convert_host(
                args.src,
                args.dst,
                save_processor=not args.no_processor,
                frames=args.frames,
                fast_frames=args.fast_frames,
                hybrid_every_n_layers=args.hybrid_every_n_layers,
                video_pooling_stride=args.video_pooling_stride,
                **({"dtype": getattr(torch, args.dtype)} if args.dtype else {}),
            )
        elif not is_reference_checkpoint(args.src):
            raise ValueError(
                f"{args.src} is not a reference checkpoint (no config.json with model_type {REFERENCE_MODEL_TYPES})"
            )
        else:
            convert_checkpoint(args.src, args.dst, vision_config=args.vision_config, dtype=args.dtype)
    except (ValueError, OSError) as error:
        print(f"slowfast-vlm convert: error: {error}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
    print(f"slowfast-vlm convert: wrote {args.dst}", file=sys.stderr)
    return 0


__all__ = ["convert_checkpoint"]
