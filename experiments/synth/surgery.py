"""The command-line frame of the scripts that change a trained checkpoint's shape without changing what it
computes (`widen_kv_heads.py`, `add_hybrid_layer.py`): load, change, save with the checkpoint's processor."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration
from slowfast_vlm.processing.processor import SlowFastProcessor

Surgery = Callable[[SlowFastForConditionalGeneration, argparse.Namespace], SlowFastForConditionalGeneration]


def surgery_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every such script takes: the checkpoint and `--out`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def rewrite_checkpoint(
    parser: argparse.ArgumentParser, surgery: Surgery
) -> tuple[argparse.Namespace, SlowFastForConditionalGeneration]:
    """Parse `checkpoint`, `--out` and the script's options, load the checkpoint in fp32, apply `surgery`
    (its ValueError is the command's usage error, exit 2) and save the result with the checkpoint's
    processor to `--out`. Returns the parsed arguments and the changed model."""
    args = parser.parse_args()
    model = SlowFastForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    try:
        changed = surgery(model, args)
    except ValueError as error:
        parser.error(str(error))
    changed.save_pretrained(args.out)
    SlowFastProcessor.from_pretrained(args.checkpoint).save_pretrained(args.out)
    return args, changed
