"""Decoding latency per generated token: slow keys/values cached vs re-projected at every step vs no video.

Three variants of greedy decoding (`--new-tokens` tokens, KV cache on) on the named config
"bench-scaled" with its tiny vision encoder, for a video of each frame count:

- cached: as `generate(..., pixel_values_videos=video)`: every hybrid layer projects the slow
  tokens' keys/values once per request and reads them from the `SlowCache` at every step, and
  generated tokens attend to them (`generated_tokens_see_slow=True`, this project's default).
- re-projected: as `generate(..., cache_slow_kv=False)`: every step projects all slow tokens again
  in every hybrid layer (the reference implementation's decoding cost).
- text-only: a prompt of the same length (text + as many text tokens as the video's fast tokens)
  and no video, so no slow tokens: the hybrid layers skip their cross-attention branch. Its
  self-attention context is the same as the video variants'; the difference is the slow tokens.

The decoding loop is `generate`'s greedy loop written out (`GreedyDecoder`; the smoke test checks
it yields `generate`'s tokens), so that single steps can be interleaved: one step of every variant
and shape in turn, which keeps load from other jobs from favouring one variant. The latency per
step is the median over all steps but the first (the prefill) of `--repeats` requests. The run
is refused above `--max-load` (1-minute load average; `--allow-load` flags it instead), and the table
gives the load before / after the run and the text-only step's own time beside each ratio.
Analytical FLOPs per token come from `slowfast_vlm.compute.decoder_flops`, for the scaled model
and for the released 7B geometry (Qwen2-7B, 81 slow tokens per frame, s2t4).

Commands (results in BENCHMARKS.md):

    python -m benchmarks.decoding     # frames 16 .. 512 at batch 1, batch 1 .. 16 at 128 frames; 3 requests
    python -m benchmarks.decoding --frames 128 512 --batch-sizes 1 4 16 --repeats 5   # the targets
    python -m benchmarks.decoding --frames 128 --batch-sizes 16 --interleave request   # steps back to back
    python -m benchmarks.decoding --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from slowfast_vlm import SlowFastConfig
from slowfast_vlm.compute import decoder_flops
from slowfast_vlm.modeling.fast_tokens import fast_token_count
from slowfast_vlm.modeling.slow_tokens import slow_grid
from slowfast_vlm.modeling.vision import vision_grid
from slowfast_vlm.transformers_compat import cache_field, cache_of

from .common import (
    DTYPES,
    LoadRecord,
    add_common_arguments,
    add_load_arguments,
    build_model,
    config_name,
    log_axes,
    machine_note,
    markdown_table,
    median,
    model_name,
    new_figure,
    paired_ratio,
    save_figure,
    setup,
)

VARIANTS = ("cached", "re-projected", "text-only")
FRAMES = (16, 64, 128, 256, 512)
QUICK_FRAMES = (16,)
BATCH_SIZES = (1, 4, 16)
QUICK_BATCH_SIZES = (1, 2)
TARGET_FRAMES = 128  # the frame count of the batch sweep (the targets' shape)


class GreedyDecoder:
    """`generate`'s greedy loop for one request, written out so that single steps of all variants can be
    interleaved: `start` runs the prefill, each `step` call one decoding step (timed; `sync`, e.g.
    `common.synchronizer(device)`, is called before each clock reading)."""

    def __init__(self, model, inputs: dict, sync: Callable[[], None] = lambda: None):
        self.model, self.inputs, self.sync = model, inputs, sync

    @torch.inference_mode()
    def start(self) -> None:
        output = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        self.kv_cache, self.slow_cache = cache_of(output), output.slow_cache
        self.tokens = [output.logits[:, -1].argmax(-1, keepdim=True)]  # (B, 1) each

    @torch.inference_mode()
    def step(self) -> float:
        """Seconds of one step: forward of the last token with the caches, then its greedy successor."""
        self.sync()
        start = time.perf_counter()
        output = self.model(
            input_ids=self.tokens[-1],
            **cache_field(self.kv_cache),
            slow_cache=self.slow_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.tokens.append(output.logits[:, -1].argmax(-1, keepdim=True))
        self.sync()
        seconds = time.perf_counter() - start
        self.kv_cache = cache_of(output)
        return seconds


def token_counts(config, frames: int) -> tuple[int, int]:
    """(fast tokens in the sequence, slow tokens cross-attended) of a `frames`-frame video."""
    grid = slow_grid(vision_grid(config.vision_config), frames, config.video_pooling_stride)
    return fast_token_count(frames, grid, config), frames * grid[0] * grid[1]


def generation_inputs(
    model, variant: str, frames: int, batch: int, prompt_tokens: int, seed: int = 0
) -> dict:
    """`generate` kwargs for `batch` copies of one prompt: half the text, the video's placeholder run,
    the other half (text-only: as many text tokens instead)."""
    config = model.config
    fast, _ = token_counts(config, frames)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.video_token_id, (prompt_tokens + fast,), generator=generator)
    if variant == "text-only":
        return {"input_ids": text.expand(batch, -1)}
    half = prompt_tokens // 2
    ids = torch.cat([text[:half], torch.full((fast,), config.video_token_id), text[half:prompt_tokens]])
    size = config.vision_config.image_size
    video = torch.randn(batch, frames, 3, size, size, generator=generator).to(model.dtype)
    return {
        "input_ids": ids.expand(batch, -1),
        "pixel_values_videos": video,
        "cache_slow_kv": variant != "re-projected",
    }


def step_seconds(
    decoders: dict, new_tokens: int, repeats: int, interleave: str = "step"
) -> dict[object, list[float]]:
    """Per decoder, the seconds of every step after the first generated token, over `repeats` requests
    (after one discarded warm-up request). `interleave="step"`: one step of each decoder in turn, in a
    new shuffled order at every step (load from other jobs falls on every variant alike); `"request"`:
    each decoder's request runs its steps back to back, as a server decodes one batch (its weights and
    caches stay warm from step to step), the decoders in a new shuffled order at every request."""
    seconds: dict[object, list[float]] = {key: [] for key in decoders}
    order, shuffle = list(decoders), random.Random(0).shuffle
    for request in range(1 + repeats):
        rounds = []  # (decoder, seconds) of this request's steps
        if interleave == "step":
            for decoder in decoders.values():
                decoder.start()
            for _ in range(new_tokens - 1):
                shuffle(order)
                rounds += [(key, decoders[key].step()) for key in order]
        else:
            shuffle(order)
            for key in order:
                decoders[key].start()
                rounds += [(key, decoders[key].step()) for _ in range(new_tokens - 1)]
        if request > 0:
            for key, elapsed in rounds:
                seconds[key].append(elapsed)
    return seconds


def analytical_flops(config, frames: int, prompt_tokens: int) -> dict[str, int]:
    """LLM FLOPs of one decoding step (context = prompt + 1) per variant."""
    fast, slow = token_counts(config, frames)
    context, hybrid = prompt_tokens + fast + 1, len(config.hybrid_layer_indices)
    text = config.text_config
    return {
        "cached": sum(decoder_flops(text, 1, context, hybrid, 1, slow, project_slow=False).values()),
        "re-projected": sum(decoder_flops(text, 1, context, hybrid, 1, slow, project_slow=True).values()),
        "text-only": sum(decoder_flops(text, 1, context).values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeats=3)
    add_load_arguments(parser)
    parser.add_argument("--frames", type=int, nargs="+", help=f"frame counts at batch 1 (default {FRAMES})")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help=f"batch sizes at {TARGET_FRAMES} frames")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the prompt")
    parser.add_argument("--new-tokens", type=int, default=24, help="generated tokens per request")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument(
        "--interleave",
        choices=("step", "request"),
        default="step",
        help="alternate the variants at every step (default) or at every request (steps back to back)",
    )
    args = parser.parse_args(argv)
    load = LoadRecord(args, parser)
    setup(args)
    frames_list = sorted(args.frames or (QUICK_FRAMES if args.quick else FRAMES))
    batches = sorted(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES))
    target_frames = frames_list[0] if args.quick else TARGET_FRAMES
    new_tokens = 4 if args.quick else args.new_tokens
    if new_tokens < 3:
        raise SystemExit(f"--new-tokens must be >= 3 (the first step is the prefill), got {new_tokens}")

    model = build_model(SlowFastConfig.from_name(config_name(args)), DTYPES[args.dtype])
    shapes = sorted({(frames, 1) for frames in frames_list} | {(target_frames, batch) for batch in batches})
    decoders = {
        (variant, frames, batch): GreedyDecoder(
            model, generation_inputs(model, variant, frames, batch, args.prompt_tokens)
        )
        for frames, batch in shapes
        for variant in VARIANTS
    }
    steps = step_seconds(decoders, new_tokens, args.repeats, args.interleave)
    load.finish()
    latency = {key: median(values) for key, values in steps.items()}

    rows = []
    for frames, batch in shapes:
        fast, slow = token_counts(model.config, frames)
        flops = analytical_flops(model.config, frames, args.prompt_tokens)
        cached, reprojected, text_only = ((v, frames, batch) for v in VARIANTS)
        rows.append(
            [
                frames,
                batch,
                f"{args.prompt_tokens + fast:,}",
                f"{slow:,}",
                *(f"{latency[v, frames, batch] * 1e3:.2f}" for v in VARIANTS),
                f"{paired_ratio(steps, cached, text_only):.2f}x",
                load.cell(),
                f"{paired_ratio(steps, reprojected, cached):.2f}x",
                f"{flops['cached'] / flops['text-only']:.3f}x",
                f"{flops['re-projected'] / flops['cached']:.1f}x",
            ]
        )
    print(
        f"Decoding, {model_name(model.config)}, {args.prompt_tokens}-token text prompt, {new_tokens} new tokens; "
        f"{machine_note(args.threads, args.dtype)}; median over all steps of {args.repeats} request(s), "
        f"variants alternated at every {args.interleave}; "
        f"{load.note()}\n"
    )
    headers = [
        "frames",
        "batch",
        "prompt length",
        "slow tokens",
        "cached (ms/step)",
        "re-projected (ms/step)",
        "text-only (ms/step)",
        "cached / text-only",
        "load before / after",
        "re-projected / cached",
        "FLOPs cached / text-only",
        "FLOPs re-projected / cached",
    ]
    print(markdown_table(headers, rows))

    reference = SlowFastConfig.from_name("reference-7b-s2t4")
    rows = []
    for frames in (16, 64, 128, 256, 512, 1536):
        fast, slow = token_counts(reference, frames)
        flops = analytical_flops(reference, frames, args.prompt_tokens)
        rows.append(
            [
                frames,
                f"{args.prompt_tokens + fast:,}",
                f"{slow:,}",
                *(f"{flops[v] / 1e9:,.2f}" for v in VARIANTS),
                f"{flops['cached'] / flops['text-only']:.3f}x",
                f"{flops['re-projected'] / flops['cached']:.1f}x",
            ]
        )
    print(
        "\nAnalytical LLM GFLOPs per token at the released 7B geometry (Qwen2-7B, s2t4, 81 slow tokens/frame)\n"
    )
    headers = [
        "frames",
        "prompt length",
        "slow tokens",
        "cached",
        "re-projected",
        "text-only",
        "cached / text-only",
        "re-projected / cached",
    ]
    print(markdown_table(headers, rows))

    figure, (left, right) = new_figure(2)
    for variant, marker in zip(VARIANTS, "os^"):
        left.plot(
            frames_list, [latency[variant, f, 1] * 1e3 for f in frames_list], marker=marker, label=variant
        )
        right.plot(
            batches, [latency[variant, target_frames, b] * 1e3 for b in batches], marker=marker, label=variant
        )
    for axis, ticks, label in (
        (left, frames_list, "frames (batch 1)"),
        (right, batches, f"batch ({target_frames} frames)"),
    ):
        log_axes(axis, ticks, label, "ms per decoding step")
    figure.suptitle(f"Decoding ({model_name(model.config)}), {args.threads} CPU thread(s), {args.dtype}")
    save_figure(figure, args.out / "decoding.png")


if __name__ == "__main__":
    main()
