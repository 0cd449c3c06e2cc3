"""The command-line options that choose the model a command loads and where it runs (`--model`,
`--device`, `--dtype`; read by `inference.load_model`). Imports no torch, so `--help` stays fast."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (default: the shipped demo model), `--device` and `--dtype` ("auto": the rule of
    `inference.resolve_device` / `resolve_dtype`)."""
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the shipped demo model)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="default: bfloat16 on a GPU that supports it, else float32",
    )
