"""The `slowfast-vlm` subcommands: what each one is, its arguments, and the module whose `main(args)` runs it.

Arguments are defined here, with argparse and plain constants only, so that `--help` and usage
errors answer before anything imports torch; the implementing module is imported once the command
line has parsed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .model_options import DTYPES, add_model_arguments
from .named_configs import DESIGNS, NAMED_CONFIGS
from .synth_spec import MIN_FRAMES, QUESTIONS_PER_CLIP, SPLITS


def _bounded(kind: type, minimum: float, inclusive: bool, wording: str) -> Callable[[str], float]:
    """An argparse `type` that reads a finite `kind` and refuses values below `minimum` (argparse then
    exits 2 naming the option): an out-of-range value is an error, never replaced by a default."""

    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value

    read.__name__ = wording  # argparse names the type in some messages
    return read


positive_int = _bounded(int, 1, True, "an integer >= 1")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0, False, "a finite number > 0")
non_negative_float = _bounded(float, 0, True, "a finite number >= 0")


def add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def add_visual_cache_argument(parser: argparse.ArgumentParser) -> None:
    """`--visual-cache-mb`: the budget of the `VisualCache` (encoded videos, conversations) in MiB."""
    parser.add_argument(
        "--visual-cache-mb",
        type=non_negative_float,
        default=1024,
        help="memory for encoded videos (and conversations) kept for reuse, in MiB (0: none; default 1024)",
    )


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="path to a video file")
    parser.add_argument("question", help="the question to answer")
    add_model_arguments(parser)
    parser.add_argument(
        "--frames", type=positive_int, default=None, help="frames to sample (default: the model's)"
    )
    parser.add_argument(
        "--fps", type=positive_float, default=None, help="target sampling rate (default: the model's)"
    )
    parser.add_argument("--sampling", choices=("fps", "uniform"), default=None, help="frame-selection rule")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--attention-map", type=Path, help="also write the slow-token attention map PNG here")


def add_flops_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default="reference-7b",
        metavar="NAME",
        help=f"a named config (SlowFastConfig.from_name): {', '.join(NAMED_CONFIGS)}",
    )
    source.add_argument("--config", help="a saved SlowFastConfig: model directory or config.json")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="frame counts")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens in the prompt")
    parser.add_argument("--design", choices=DESIGNS, nargs="+", default=list(DESIGNS))
    parser.add_argument("--dtype", default="bfloat16", help="dtype of parameters and caches")
    add_set_argument(
        parser,
        "override a config field, e.g. fast_temporal_sampling_stride=2 or text_config.num_hidden_layers=32",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array of records")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/)")
    add_set_argument(
        parser, "override a config value, e.g. --set training.max_steps=10 (repeatable; value parsed as YAML)"
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved model and its processor")
    parser.add_argument("--data", required=True, help="questions: .json, .jsonl or .parquet")
    parser.add_argument(
        "--video-root", help="folder the video paths are relative to (default: the data file's)"
    )
    parser.add_argument("--output", required=True, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    parser.add_argument("--frames", type=positive_int, help="most frames per video (default: the model's)")
    parser.add_argument("--fps", type=positive_float, help="frame sampling rate (default: the model's)")
    parser.add_argument(
        "--sampling", choices=("fps", "uniform"), help="frame sampling rule (default: the model's)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="questions per generate call (default 1)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="answer length cap (default 128)"
    )
    parser.add_argument(
        "--num-workers", type=positive_int, default=2, help="video decoding threads (default 2)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16 on a GPU that supports it, else float32",
    )
    parser.add_argument("--limit", type=non_negative_int, help="evaluate only the first N samples")
    add_visual_cache_argument(parser)


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (videos/ and <split>.jsonl)")
    parser.add_argument(
        "--num", type=int, required=True, help=f"number of samples ({QUESTIONS_PER_CLIP} per clip)"
    )
    parser.add_argument("--split", choices=SPLITS, default="train", help="split (default train)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--frames", type=int, default=64, help=f"frames per clip, >= {MIN_FRAMES} (default 64)"
    )
    parser.add_argument("--size", type=int, default=64, help="frame width and height in px (default 64)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the videos (default 8)")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="reference (or, with --from-host, host) checkpoint: directory or hub id")
    parser.add_argument("dst", help="output directory (save_pretrained format)")
    parser.add_argument(
        "--vision-config",
        metavar="PATH_OR_JSON",
        help="vision tower config, over the one the checkpoint's mm_vision_tower resolves to and its weights "
        "imply: a JSON object of fields, a config.json file or a transformers model directory",
    )
    parser.add_argument("--dtype", help="weight dtype, e.g. bfloat16 (default: the checkpoint's)")
    host = parser.add_argument_group("plug-and-play: add the slow branch to a transformers video LLM")
    host.add_argument(
        "--from-host",
        action="store_true",
        help="SRC is a LLaVA-OneVision / LLaVA-NeXT-Video checkpoint in transformers' format",
    )
    host.add_argument("--frames", type=int, default=64, help="frames per video given to the model")
    host.add_argument("--fast-frames", type=int, default=16, help="of those, the frames the host sees")
    host.add_argument("--hybrid-every-n-layers", type=int, default=8)
    host.add_argument("--video-pooling-stride", type=int, default=1)
    host.add_argument("--no-processor", action="store_true", help="do not copy the host's processor files")


def add_server_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """What the demo and the API server share: the model and where to listen."""
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=port)
    add_visual_cache_argument(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, port=7860)
    parser.add_argument(
        "--samples", nargs="*", type=Path, help="sample videos to offer (default: the demo clip)"
    )
    parser.add_argument("--max-upload-mb", type=positive_float, default=256, help="largest video upload")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, port=8000)
    parser.add_argument("--media-root", type=Path, help="directory whose videos requests may name by path")
    parser.add_argument("--served-model-name", help="model name in the API (default: the checkpoint's name)")
    parser.add_argument(
        "--max-body-mb", type=positive_float, default=64, help="largest request body (413 above)"
    )
    parser.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting or running (503 above)"
    )
    parser.add_argument(
        "--max-frames", type=positive_int, default=256, help="largest num_frames a request may ask"
    )
    parser.add_argument(
        "--default-max-tokens", type=positive_int, default=256, help="when a request sets none"
    )
    parser.add_argument(
        "--max-decoding",
        type=positive_int,
        default=2,
        help="requests decoding their video at once (default 2)",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=positive_float,
        default=None,
        help="bytes that request bodies and decoded frames may hold at once, in MiB (503 above; "
        "default: no budget beyond --max-queue and --max-decoding)",
    )
    parser.add_argument(
        "--max-video-pixels",
        type=positive_int,
        default=4096 * 4096,
        help="largest source frame in pixels, width x height (default 4096x4096)",
    )
    parser.add_argument(
        "--max-video-seconds", type=positive_float, default=4 * 3600, help="longest video (default 4 h)"
    )
    parser.add_argument(
        "--engine",
        choices=("native", "vllm"),
        default="native",
        action=EngineAction,
        help="native: this project's server; vllm: vLLM's OpenAI server with the slowfast_vlm plugin "
        "(continuous batching; run from the vLLM venv, docs/serving.md)",
    )
    parser.add_argument("--vllm-args", help='more vLLM server options, one string (e.g. "--max-num-seqs 32")')


class EngineAction(argparse.Action):
    """`--engine vllm` runs `slowfast_vlm.serving.vllm.launch` instead of the project's server."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        if value == "vllm":
            namespace._module = "slowfast_vlm.serving.vllm.launch"


class Subcommand(NamedTuple):
    name: str
    module: str  # whose `main(args) -> int` runs it
    summary: str  # one line, in `slowfast-vlm --help`
    description: str  # in `slowfast-vlm NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]


SUBCOMMANDS = (
    Subcommand(
        "ask",
        "slowfast_vlm.ask",
        "answer a question about a video (streams the answer to stdout)",
        "Answer a question about a video. The answer streams to stdout as it is generated; progress goes "
        "to stderr. Exit status 0 on success; 2 with a one-line reason on stderr for a bad video, a "
        "missing model, a model id that cannot be fetched offline, or a bad device.",
        add_ask_arguments,
    ),
    Subcommand(
        "flops",
        "slowfast_vlm.compute",
        "FLOPs and memory of a slow-fast model vs a self-attention-only LLM",
        "Count the FLOPs and memory of a slow-fast model at given frame counts, against a "
        "self-attention-only LLM, from the config alone (no weights are loaded; docs/compute.md).",
        add_flops_arguments,
    ),
    Subcommand(
        "train",
        "slowfast_vlm.training.runner",
        "train a slow-fast model (stage 1 / stage 2 / custom)",
        "Train a slow-fast model from a YAML config (stage 1, stage 2 or a custom recipe), on one CPU or "
        "many GPUs (launch with torchrun or accelerate). A run resumes by itself from the newest complete "
        "checkpoint in its output directory. Example: slowfast-vlm train configs/tiny_cpu.yaml "
        "--set training.max_steps=20",
        add_train_arguments,
    ),
    Subcommand(
        "eval",
        "slowfast_vlm.evaluation.evaluator",
        "evaluate a model on a local video QA set",
        "Evaluate a model on a local video QA set (multiple-choice or open-ended; JSON, JSONL or "
        "parquet). Predictions are written sample by sample to OUTPUT/predictions.jsonl (--resume "
        "continues where a run stopped); accuracy overall, per category and per duration goes to "
        "OUTPUT/metrics.json.",
        add_eval_arguments,
    ),
    Subcommand(
        "synth",
        "slowfast_vlm.synth",
        "write the synthetic fine-detail video QA benchmark",
        "Write the synthetic fine-detail video QA benchmark: digits flashed for one frame by bouncing "
        "squares, which only a model that sees every frame separately can read (docs/synth.md).",
        add_synth_arguments,
    ),
    Subcommand(
        "convert",
        "slowfast_vlm.convert",
        "convert a released reference checkpoint to this library's format",
        "Save a released reference checkpoint (or, with --from-host, a LLaVA-OneVision / "
        "LLaVA-NeXT-Video model with the slow branch added) in this library's save_pretrained format "
        "(docs/convert.md).",
        add_convert_arguments,
    ),
    Subcommand(
        "demo",
        "slowfast_vlm.serving.demo",
        "browser demo: chat about a video, see which frames it read",
        "A browser demo: upload or pick a video, chat about it with streamed answers, and see which "
        "frames each answer read (the slow-token attention map).",
        add_demo_arguments,
    ),
    Subcommand(
        "serve",
        "slowfast_vlm.serving.server",
        "OpenAI-compatible HTTP API (/v1/chat/completions) for a model",
        "Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions (streaming or not), "
        "/v1/models, /health (docs/serving.md).",
        add_serve_arguments,
    ),
)
