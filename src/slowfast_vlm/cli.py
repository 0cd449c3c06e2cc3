"""`slowfast-vlm` command line: one entry point, one subcommand per task.

Each subcommand lives in the module that implements it, which exposes
`add_arguments(parser)` and `main(args) -> int`; modules are imported only when their
subcommand runs, so `slowfast-vlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("ask", "slowfast_vlm.ask", "answer a question about a video (streams the answer to stdout)"),
    ("flops", "slowfast_vlm.compute", "FLOPs and memory of a slow-fast model vs a self-attention-only LLM"),
    ("train", "slowfast_vlm.training.runner", "train a slow-fast model (stage 1 / stage 2 / custom)"),
    ("eval", "slowfast_vlm.evaluation.evaluator", "evaluate a model on a local video QA set"),
    ("synth", "slowfast_vlm.synth", "write the synthetic fine-detail video QA benchmark"),
    ("convert", "slowfast_vlm.convert", "convert a released reference checkpoint to this library's format"),
    ("demo", "slowfast_vlm.serving.demo", "browser demo: chat about a video, see which frames it read"),
    ("serve", "slowfast_vlm.serving.server", "OpenAI-compatible HTTP API (/v1/chat/completions) for a model"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slowfast-vlm", description="Slow-Fast video LLMs: run, train, evaluate."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        sub = subparsers.add_parser(name, help=help_text, add_help=False)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily in main(): only the chosen subcommand's module is imported.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(prog=f"slowfast-vlm {known.command}", description=module.__doc__)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
