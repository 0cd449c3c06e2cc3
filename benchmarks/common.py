"""Shared pieces of the benchmark scripts: the model, interleaved timing, tables and plots.

The models are named configs (`SlowFastConfig.from_name`): "bench-scaled" (Qwen2-7B's shape ratios at
D = 512, a one-layer 64 px SigLIP, s2t4 knobs), "bench-train" (the same at D = 256, 4 layers) and
"bench-quick" (D = 128, 4 layers, under `--quick`).

Every script measures its variants side by side in one process, each once per round in a shuffled
order, and reports medians (ratios: medians of per-round ratios), so that load from other jobs on a
shared machine hits all variants alike. Interleaving evens out load but does not remove it: a loaded
machine hides fixed per-call costs behind slower shared work (memory bandwidth, caches). The decoding
and prefill scripts therefore refuse to start when the 1-minute load average exceeds `--max-load`
(`--allow-load` runs anyway and flags the tables as taken under load), and print the load average
before and after the run beside their ratios (`LoadRecord`; "before" is read when the script starts,
before torch is imported).

`build_model` builds on any device and `synchronizer` gives the timers' CUDA synchronisation, so that
`scripts/gpu_check_model.py` measures with these same pieces on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration
from slowfast_vlm.modeling.fast_tokens import build_fast_tokens
from slowfast_vlm.modeling.slow_tokens import slow_grid
from slowfast_vlm.modeling.vision import vision_grid

from . import STARTUP_LOAD

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def model_name(config: SlowFastConfig) -> str:
    """E.g. "D=512, 8 layers, hybrid [0, 4]"."""
    text = config.text_config
    return f"D={text.hidden_size}, {text.num_hidden_layers} layers, hybrid {config.hybrid_layer_indices}"


def build_model(
    config: SlowFastConfig,
    dtype: torch.dtype,
    seed: int = 0,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
) -> SlowFastForConditionalGeneration:
    """A random model in `dtype` with its gates open (a closed gate computes the branch all the same),
    built directly on `device` (no CPU copy of a 7B model first)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = SlowFastForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    model = model.to(device)  # a no-op where the device context placed every weight and buffer
    with torch.no_grad():
        for layer in model.hybrid_attentions:
            layer.cross_attn_warm_up_gate.fill_(1.0)
    return model.eval()


def visual_tokens(config: SlowFastConfig, frames: int, dtype: torch.dtype, seed: int = 0):
    """Random projected visual tokens of a `frames`-frame video, as the vision encoder + projector would
    give them: slow tokens `(frames * h * w, D)` and the fast tokens built from them `(F, D)`."""
    grid = slow_grid(vision_grid(config.vision_config), frames, config.video_pooling_stride)
    generator = torch.Generator().manual_seed(seed)
    frame_tokens = torch.randn(frames, grid[0] * grid[1], config.text_config.hidden_size, generator=generator)
    return frame_tokens.flatten(0, 1).to(dtype), build_fast_tokens(frame_tokens, grid, config).to(dtype)


def interleaved(variants: Mapping[object, Callable[[], float]], repeats: int, warmup: int = 1) -> dict:
    """Run every variant once per round, in a new shuffled order each round (so that no variant always
    follows the same neighbour), `warmup + repeats` rounds, keeping the last `repeats` samples.

    Each callable returns its own sample (e.g. seconds), so it can time just the part that matters.
    Returns `{name: [sample per round]}`.
    """
    samples: dict[object, list] = {name: [] for name in variants}
    order, shuffle = list(variants), random.Random(0).shuffle
    for round_index in range(warmup + repeats):
        shuffle(order)
        for name in order:
            sample = variants[name]()
            if round_index >= warmup:
                samples[name].append(sample)
    return samples


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What a timer calls before reading the clock: waits for the device's queued work on CUDA (kernels
    run asynchronously there), nothing on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of `fn` takes, `sync` (`synchronizer`) called before each clock reading."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(samples: Mapping[object, Sequence[float]], numerator, denominator) -> float:
    """Median over rounds of `samples[numerator][i] / samples[denominator][i]`: two samples of one round
    were taken close in time, under the same load, so their ratio is steadier than a ratio of medians."""
    return median([a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; numeric-looking columns are right-aligned."""
    align = ["---:" if all(_numeric(row[i]) for row in rows) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(cell: object) -> bool:
    text = str(cell).replace(",", "").replace("x", "").replace("%", "").replace("+", "").strip()
    try:
        float(text)
    except ValueError:
        return False
    return True


def cpu_model() -> list[str]:
    """The CPU's model name and its bf16 matrix units, where Linux reports them: ratios move between CPUs
    (a bf16 GEMM on AMX tiles is several times one on AVX512-BF16, which the hybrid branch's share follows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    fields = dict(line.split(":", 1) for line in reversed(lines) if ":" in line)  # the first CPU's values
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    if not fields.get("model name"):
        return []
    flags = set(fields.get("flags", "").split())
    units = [unit for flag, unit in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return [fields["model name"]] + (["bf16 units: " + " + ".join(units)] if units else [])


def machine_note(threads: int | None = None, dtype: str | None = None) -> str:
    """One line saying where and how the numbers were taken."""
    parts = [
        platform.processor() or platform.machine(),
        *cpu_model(),
        f"{os.cpu_count()} cores",
        f"torch {torch.__version__}",
    ]
    parts += [f"{threads} torch thread(s)"] if threads is not None else []
    return ", ".join(parts + ([dtype] if dtype else []))


MAX_LOAD = 0.5  # 1-minute load average above which a run is refused (a quiet machine reads about 0)


class LoadRecord:
    """The 1-minute load average before a run (checked against `--max-load`) and after it.

    "Before" is the lower of the reading when the script started (`benchmarks.STARTUP_LOAD`, taken
    before torch is imported: the script's own start-up would otherwise count) and the reading now
    (a run called in-process long after the import). The run's own torch threads add about `--threads`
    to the load average while it runs, so a quiet machine reads about 0 before and about `--threads` after."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser):
        self.before = min(STARTUP_LOAD, os.getloadavg()[0])
        self.limit, self.after = args.max_load, None
        if self.before > self.limit and not args.allow_load:
            parser.error(
                f"the 1-minute load average is {self.before:.2f}, above --max-load {self.limit}: other jobs "
                "would distort the timings (wait for a quiet machine, or pass --allow-load to flag the run)"
            )

    def finish(self) -> None:
        self.after = os.getloadavg()[0]

    @property
    def loaded(self) -> bool:
        return self.before > self.limit

    def cell(self) -> str:
        """E.g. "0.02 / 1.01": the load average before / after the run, beside a ratio."""
        return f"{self.before:.2f} / {self.after:.2f}"

    def note(self) -> str:
        """One line for the table's caption; flags a run started under load."""
        line = f"load average (1 min) {self.before:.2f} before, {self.after:.2f} after the run"
        if self.loaded:
            line += f"; TAKEN UNDER LOAD (above {self.limit} before the run): preliminary figures"
        return line


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-load",
        type=float,
        default=MAX_LOAD,
        help=f"refuse to start above this 1-minute load average (default {MAX_LOAD})",
    )
    parser.add_argument(
        "--allow-load", action="store_true", help="run above --max-load, flagging the results as loaded"
    )


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=repeats, help="measured rounds per variant")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of the PNG plot")


def config_name(args: argparse.Namespace, default: str = "bench-scaled") -> str:
    """The named config of the benchmark model: "bench-quick" under `--quick`, else `default`."""
    return "bench-quick" if args.quick else default


def setup(args: argparse.Namespace) -> None:
    """Apply `--threads` and `--out`; `--quick` means one measured round."""
    if args.threads < 1 or args.repeats < 1:
        raise SystemExit(f"--threads and --repeats must be >= 1, got {args.threads} and {args.repeats}")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    args.out.mkdir(parents=True, exist_ok=True)


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure as a small PNG and close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(figure)
    print(f"\nplot: {path}")
    return path


def log_axes(axis, xticks: Sequence[int], xlabel: str, ylabel: str) -> None:
    """Log-log axes labelled at `xticks` and at 1, 2, 5 x 10^k on y, with a grid and the legend."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    axis.set_xticks(xticks, [str(tick) for tick in xticks], rotation=45 if len(xticks) > 5 else 0)
    axis.xaxis.set_minor_locator(NullLocator())
    axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.grid(True, alpha=0.3)
    axis.legend()


def new_figure(columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(5.5 * columns, 3.8))
