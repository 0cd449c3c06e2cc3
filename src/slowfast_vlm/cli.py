"""`slowfast-vlm` command line: one entry point, one subcommand per task (`commands.SUBCOMMANDS`).

The whole command line is parsed first, from argument definitions that import no torch, so `--help`
and usage errors (exit 2) answer at once; then the subcommand's module is imported and its
`main(args) -> int` runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import SUBCOMMANDS


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit 2): the command, the option, the problem."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slowfast-vlm", description="Slow-Fast video LLMs: run, train, evaluate, serve.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        sub = subparsers.add_parser(command.name, help=command.summary, description=command.description)
        command.add_arguments(sub)
        sub.set_defaults(_module=command.module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
