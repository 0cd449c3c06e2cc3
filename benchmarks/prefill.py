"""LLM prefill latency and peak memory against frames: slow-fast vs the self-attention-only LLM.

The paper's efficiency claim is about LLM prefill, so only the LLM is timed: the visual tokens are
precomputed (random, shaped as the encoder + projector would give them) and the prefill is one
`forward(inputs_embeds=..., use_cache=True, logits_to_keep=1)`, as `generate` runs it.

- slow-fast: the named config "bench-scaled" (s2t4, the released 128-frame model's knobs); the
  sequence is the fast tokens followed by the text prompt, and the text queries every slow token in
  the hybrid layers (a fresh `SlowCache` per call, so the slow keys/values are
  projected every time, as in a real prefill).
- self-attention: the same LLM with `hybrid_layers=[]`, every slow token in the sequence.

Latency: every point once per round, in a shuffled order (`common.interleaved`), medians of
`--repeats` rounds; speed-ups are medians of per-round ratios (`common.paired_ratio`). The run is
refused above `--max-load` (1-minute load average; `--allow-load` flags it instead); the tables give
the load before / after the timed rounds beside the ratios, and self-attention's own latency.
Peak memory: a separate subprocess runs every point once with glibc's mmap threshold fixed at 64 KiB
(`MALLOC_MMAP_THRESHOLD_`, so freed tensors go back to the OS) and reports, per point, the kernel's
peak resident set size during the prefill minus the resident size just before it (the peak is reset
through `/proc/self/clear_refs` right before the prefill). Linux only. It counts everything the
prefill allocates: activations, the KV cache it returns, the slow keys/values, the logits.

Commands (results in BENCHMARKS.md):

    python -m benchmarks.prefill                                # frames 16 .. 1536, 3 rounds (~10 min)
    python -m benchmarks.prefill --frames 16 128 --repeats 15 --out /tmp/prefill-pair   # the equal-budget pair, steadier
    python -m benchmarks.prefill --quick --out /tmp/bench       # quick model, frames 16 and 128, 1 round
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from slowfast_vlm import SlowFastConfig
from slowfast_vlm.compute import estimate
from slowfast_vlm.modeling.slow_tokens import SlowCache

from .common import (
    DTYPES,
    LoadRecord,
    add_common_arguments,
    add_load_arguments,
    build_model,
    config_name,
    interleaved,
    log_axes,
    machine_note,
    markdown_table,
    median,
    model_name,
    new_figure,
    paired_ratio,
    save_figure,
    setup,
    timed,
    visual_tokens,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("self-attention", "slowfast")
FRAMES = (16, 32, 64, 128, 256, 512, 1024, 1536)
QUICK_FRAMES = (16, 128)
BUDGET_PAIR = (16, 128)  # self-attention at 16 frames vs slow-fast at 128: the paper's headline


class Prefill:
    """One prefill of `design` on a video's visual tokens and a `prompt_tokens`-token text prompt, on the
    model's device.

    `video`: the video's `(slow (N, D), fast (F, D))` tokens (`common.visual_tokens`), made once per frame
    count for both designs."""

    def __init__(self, model, design: str, video: tuple[torch.Tensor, torch.Tensor], prompt_tokens: int):
        device = model.device
        slow, fast = (tokens.to(device) for tokens in video)
        text_ids = torch.randint(0, model.config.video_token_id, (1, prompt_tokens), device=device)
        with torch.no_grad():
            text = model.get_input_embeddings()(text_ids)
        visual = fast if design == "slowfast" else slow
        self.model = model
        self.inputs_embeds = torch.cat([visual[None], text], dim=1)  # (1, L, D): video, then the prompt
        self.slow = slow[None] if design == "slowfast" else None  # (1, N, D)
        self.query_mask = torch.zeros(self.inputs_embeds.shape[:2], dtype=torch.bool, device=device)
        self.query_mask[:, visual.shape[0] :] = True  # the text queries the slow tokens

    @torch.inference_mode()
    def __call__(self):
        slow_cache = None
        if self.slow is not None:
            mask = torch.ones(self.slow.shape[:2], dtype=torch.bool, device=self.slow.device)
            slow_cache = SlowCache(tokens=self.slow, mask=mask)
        return self.model(
            inputs_embeds=self.inputs_embeds,
            slow_cache=slow_cache,
            slow_query_mask=self.query_mask if slow_cache is not None else None,
            use_cache=True,
            logits_to_keep=1,
        )


def build_models(dtype: torch.dtype, name: str) -> dict:
    """The slow-fast model of the named config `name` and its LLM without hybrid layers."""
    return {
        "slowfast": build_model(SlowFastConfig.from_name(name), dtype),
        "self-attention": build_model(SlowFastConfig.from_name(name, hybrid_layers=[]), dtype),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: print `{design, frames, peak_bytes}` JSON lines, smallest points first."""
    dtype = DTYPES[args.dtype]
    models = build_models(dtype, config_name(args))
    config = models["slowfast"].config
    for design, model in models.items():  # load kernels and thread pools before measuring
        Prefill(model, design, visual_tokens(config, min(args.frames), dtype), args.prompt_tokens)()
    for frames in sorted(args.frames):
        video = visual_tokens(config, frames, dtype)
        for design, model in models.items():
            prefill = Prefill(model, design, video, args.prompt_tokens)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
            before = _status_kib("VmRSS")
            output = prefill()
            peak = _status_kib("VmHWM")
            del output, prefill
            print(json.dumps({"design": design, "frames": frames, "peak_bytes": (peak - before) * 1024}))


def measure_peak_memory(args: argparse.Namespace) -> dict[tuple[str, int], int]:
    """Run `peak_memory_worker` in a fresh interpreter with a fixed mmap threshold."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.prefill",
        "--memory-worker",
        "--frames",
        *map(str, args.frames),
    ]
    command += [
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    command += ["--quick"] if args.quick else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed:\n{result.stderr}")
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {(r["design"], r["frames"]): r["peak_bytes"] for r in records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeats=3)
    add_load_arguments(parser)
    parser.add_argument("--frames", type=int, nargs="+", help=f"frame counts (default {FRAMES})")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the prompt")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.frames = sorted(args.frames or (QUICK_FRAMES if args.quick else FRAMES))
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        peak_memory_worker(args)
        return
    load = LoadRecord(args, parser)
    setup(args)
    dtype = DTYPES[args.dtype]

    models = build_models(dtype, config_name(args))
    videos = {frames: visual_tokens(models["slowfast"].config, frames, dtype) for frames in args.frames}
    points = {
        (design, frames): Prefill(models[design], design, videos[frames], args.prompt_tokens)
        for frames in args.frames
        for design in DESIGNS
    }
    for design in DESIGNS:  # warm-up on the smallest point of each design
        points[design, args.frames[0]]()
    samples = interleaved(
        {key: (lambda p=prefill: timed(p)) for key, prefill in points.items()}, args.repeats, 0
    )
    load.finish()
    latency = {key: median(values) for key, values in samples.items()}
    peak = measure_peak_memory(args)
    records = {
        key: estimate(models[key[0]].config, key[1], args.prompt_tokens, key[0], args.dtype) for key in points
    }

    rows = []
    for frames in args.frames:
        base = ("self-attention", frames)
        for key in (base, ("slowfast", frames)):
            record = records[key]
            rows.append(
                [
                    frames,
                    key[0],
                    f"{record.sequence_length:,}",
                    f"{record.slow_tokens if key[0] == 'slowfast' else 0:,}",
                    f"{record.llm_prefill_flops / 1e9:,.1f}",
                    f"{latency[key] * 1e3:,.1f}",
                    f"{peak[key] / 2**20:,.1f}",
                    f"{(record.kv_cache_bytes + record.slow_kv_cache_bytes) / 2**20:,.1f}",
                    f"{paired_ratio(samples, base, key):.2f}x",
                    load.cell(),
                ]
            )
    model = model_name(models["slowfast"].config)
    print(
        f"LLM prefill, {model}, {args.prompt_tokens}-token prompt, batch 1; "
        f"{machine_note(args.threads, args.dtype)}; median of {args.repeats} round(s); {load.note()}\n"
    )
    headers = [
        "frames",
        "design",
        "sequence",
        "cross-attended slow",
        "GFLOPs",
        "latency (ms)",
        "peak memory (MiB)",
        "KV caches (MiB)",
        "speed-up vs self-attention",
        "load before / after",
    ]
    print(markdown_table(headers, rows))

    low, high = BUDGET_PAIR
    if low in args.frames and high in args.frames:
        base, ours = ("self-attention", low), ("slowfast", high)

        def compare(name: str, values: dict, scale: float, digits: int, change: float | None = None) -> list:
            change = values[ours] / values[base] if change is None else change
            return [
                name,
                f"{values[base] / scale:,.{digits}f}",
                f"{values[ours] / scale:,.{digits}f}",
                f"{change - 1:+.1%}",
            ]

        flops = {key: records[key].llm_prefill_flops for key in (base, ours)}
        print(
            f"\nEqual prefill budget: slow-fast at {high} frames vs self-attention at {low} frames; "
            f"load average (1 min) before / after: {load.cell()}\n"
        )
        print(
            markdown_table(
                [
                    "",
                    f"self-attention, {low} frames",
                    f"slow-fast, {high} frames",
                    "slow-fast vs self-attention",
                ],
                [
                    compare("GFLOPs (compute.py)", flops, 1e9, 2),
                    compare("latency (ms)", latency, 1e-3, 1, paired_ratio(samples, ours, base)),
                    compare("peak memory (MiB)", peak, 2**20, 1),
                ],
            )
        )

    figure, (left, right) = new_figure(2)
    for design, marker in zip(DESIGNS, "os"):
        left.plot(args.frames, [latency[design, f] * 1e3 for f in args.frames], marker=marker, label=design)
        right.plot(args.frames, [peak[design, f] / 2**20 for f in args.frames], marker=marker, label=design)
    for axis, label in ((left, "prefill latency (ms)"), (right, "prefill peak memory (MiB)")):
        log_axes(axis, args.frames, "frames", label)
    figure.suptitle(f"LLM prefill ({model}), {args.threads} CPU thread(s), {args.dtype}")
    save_figure(figure, args.out / "prefill.png")


if __name__ == "__main__":
    main()
