"""Where the slow branch's time goes: per-operator self time of a slow-fast call against its baseline.

Two comparisons, each on the named config "bench-scaled" ("bench-quick" with `--quick`) in bf16 (one thread by default):

- `decoding`: one greedy decoding step with the slow keys/values cached against the text-only step of
  the same length (`benchmarks.decoding`'s `GreedyDecoder` and inputs), at `--frames` and `--batch`.
- `prefill`: the equal-budget pair of `benchmarks.prefill` (self-attention at 16 frames, slow-fast at
  128 frames, the same 320-token sequence).

`torch.profiler` records `--steps` calls of each (after 3 unrecorded ones), the two alternating call by
call; the table gives each operator's self CPU time per call for both and their difference, largest
first, and the median wall time per call under the profiler (which adds a little per operator). Like
the timing scripts it refuses to start above `--max-load` and prints the load average before and after.

    python -m benchmarks.profile_ops decoding --batch 16      # issue 18's batch-16 decoding step
    python -m benchmarks.profile_ops prefill                  # the equal-budget prefill pair
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from slowfast_vlm import SlowFastConfig

from .common import (
    DTYPES,
    LoadRecord,
    add_load_arguments,
    build_model,
    config_name,
    markdown_table,
    median,
    visual_tokens,
)
from .decoding import GreedyDecoder, generation_inputs
from .prefill import Prefill, build_models

WARMUP_CALLS = 3


def decoding_calls(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """One decoding step of each variant (`cached`, `text-only`), after its prefill."""
    model = build_model(SlowFastConfig.from_name(config_name(args)), DTYPES[args.dtype])
    calls = {}
    for variant in ("cached", "text-only"):
        decoder = GreedyDecoder(model, generation_inputs(model, variant, args.frames, args.batch, 64))
        decoder.start()
        calls[variant] = decoder.step
    return calls


def prefill_calls(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The prefill of each design at the equal-budget pair (slow-fast 128 frames, self-attention 16)."""
    dtype = DTYPES[args.dtype]
    models = build_models(dtype, config_name(args))
    config = models["slowfast"].config
    return {
        "slowfast": Prefill(models["slowfast"], "slowfast", visual_tokens(config, 128, dtype), 64),
        "self-attention": Prefill(
            models["self-attention"], "self-attention", visual_tokens(config, 16, dtype), 64
        ),
    }


def interleaved_self_times(
    calls: dict[str, Callable[[], object]], steps: int
) -> dict[str, tuple[dict[str, tuple[float, float]], float]]:
    """Per variant: per operator (self ms per call, calls per call) over `steps` profiled calls, and the
    median ms per call. The variants alternate call by call (each call profiled on its own, the order
    flipped every round), so drift in the machine's speed falls on both alike."""
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()
    totals: dict[str, dict[str, list[float]]] = {name: {} for name in calls}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(steps):
        for name in list(calls)[:: 1 if round_ % 2 == 0 else -1]:
            with profile(activities=[ProfilerActivity.CPU]) as recorded:
                start = time.perf_counter()
                calls[name]()
                seconds[name].append(time.perf_counter() - start)
            for event in recorded.key_averages():
                total = totals[name].setdefault(event.key, [0.0, 0.0])
                total[0] += event.self_cpu_time_total / 1e3
                total[1] += event.count
    return {
        name: (
            {op: (ms / steps, count / steps) for op, (ms, count) in totals[name].items()},
            median(seconds[name]) * 1e3,
        )
        for name in calls
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", choices=("decoding", "prefill"))
    parser.add_argument("--frames", type=int, default=128, help="decoding: frames of the video")
    parser.add_argument("--batch", type=int, default=16, help="decoding: sequences per step")
    parser.add_argument("--steps", type=int, default=10, help="profiled calls of each")
    parser.add_argument("--rows", type=int, default=15, help="operators shown")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny config, 2 calls: checks the script runs"
    )
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 2
    if min(args.frames, args.batch, args.steps, args.rows, args.threads) < 1:
        parser.error("--frames, --batch, --steps, --rows and --threads must be >= 1")
    load = LoadRecord(args, parser)
    torch.set_num_threads(args.threads)
    calls = (decoding_calls if args.comparison == "decoding" else prefill_calls)(args)
    name, base_name = calls
    with torch.inference_mode():
        profiled = interleaved_self_times(calls, args.steps)
    (ops, wall), (base_ops, base_wall) = profiled[name], profiled[base_name]
    load.finish()

    def diff(op: str) -> float:
        return ops.get(op, (0.0, 0))[0] - base_ops.get(op, (0.0, 0))[0]

    rows = []
    for op in sorted(set(ops) | set(base_ops), key=diff, reverse=True)[: args.rows]:
        (mine, count), (theirs, base_count) = ops.get(op, (0.0, 0)), base_ops.get(op, (0.0, 0))
        rows.append(
            [op, f"{mine:.3f}", f"{theirs:.3f}", f"{mine - theirs:+.3f}", f"{count:g}", f"{base_count:g}"]
        )
    total, base_total = (sum(t for t, _ in table.values()) for table in (ops, base_ops))
    rows.append(["all operators", f"{total:.3f}", f"{base_total:.3f}", f"{total - base_total:+.3f}", "", ""])
    shape = f"{args.frames} frames, batch {args.batch}" if args.comparison == "decoding" else "equal budget"
    print(
        f"{args.comparison} ({shape}), {args.dtype}, {args.threads} thread(s), {args.steps} profiled calls each; "
        f"median wall time per call under the profiler: {name} {wall:.2f} ms, {base_name} {base_wall:.2f} ms "
        f"({wall / base_wall:.2f}x); {load.note()}\n"
    )
    headers = [
        "operator",
        f"{name} (ms/call)",
        f"{base_name} (ms/call)",
        "difference (ms)",
        f"calls, {name}",
        f"calls, {base_name}",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
