"""The worker of `gpu_check.py`: runs the torch parts in one interpreter, one JSON result line per part.

Each part gets a deadline that keeps the later parts' estimates free ("claim" has none: it takes what is
left); a part whose time left is under half its estimate is skipped with the numbers. A part that raises
is "failed" with the error in one line (the traceback goes to stderr, the log).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from gpu_check import PARTS, RESULT_LINE, START_LINE


@dataclass
class Context:
    """What every part gets: where to run, at which sizes, until when."""

    device: object  # torch.device
    dry_run: bool
    deadline: float  # time.time() at which the part must be done
    out: Path
    vllm_python: str | None

    def time_left(self) -> float:
        return self.deadline - time.time()


def runners() -> dict:
    from gpu_check_engines import claim, engines
    from gpu_check_model import correctness, geometry

    return {"correctness": correctness, "geometry": geometry, "engines": engines, "claim": claim}


def worker(args: argparse.Namespace) -> int:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        torch.set_num_threads(1)  # tiny matrices: one thread is faster than two on a shared 2-core machine
    column = 1 if args.dry_run else 0
    parts = runners()
    for index, name in enumerate(args.parts):
        print(START_LINE + name, flush=True)
        estimate = PARTS[name][column]
        reserved = sum(PARTS[later][column] for later in args.parts[index + 1 :])
        context = Context(device, args.dry_run, args.deadline - reserved, args.out, args.vllm_python)
        start = time.monotonic()
        if device.type != "cuda" and not args.dry_run:
            result = {"status": "skipped", "reason": "no CUDA device: on a CPU, run with --dry-run"}
        elif context.time_left() < max(estimate / 2, 1):
            result = {"status": "skipped", "reason": f"needs ~{estimate} s, {context.time_left():.0f} s left"}
        else:
            try:
                result = parts[name](context)
            except Exception as error:  # one part's failure must not cost the others their turn
                traceback.print_exc()
                result = {
                    "status": "failed",
                    "reason": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}",
                }
        result = {
            "name": name,
            "estimate_s": estimate,
            "seconds": round(time.monotonic() - start, 1),
            **result,
        }
        print(RESULT_LINE + json.dumps(result), flush=True)
    return 0
