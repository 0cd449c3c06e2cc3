"""Training throughput (forward + backward + AdamW step): slow-fast vs the self-attention-only LLM, equal frames.

A tiny model (the named config "bench-train": the scaled Qwen2 at D = 256, 4 layers, s2t4 knobs;
hybrid layers 0 and 2) and the same LLM with `hybrid_layers=[]`. Every parameter of the LLM (and, in
slow-fast, the cross-attention branch) is trained, as in stage 2; the visual tokens are precomputed
(random), so the vision encoder and projector, which cost the same in both designs at equal frames,
are left out.
A sample is the video's tokens (fast tokens, or every slow token for self-attention), a 32-token
prompt and a 32-token response whose tokens carry the loss. Weights, activations and AdamW state are
all in `--dtype` (bf16 by default; no fp32 master copy). bf16 autocast over fp32 weights, the usual
mixed precision, is not used: a video forward under autocast fails in `HybridAttention` (its fp32
warm-up gate turns the bf16 cross-attention output to fp32 before `scatter_add`).

Throughput is reported as samples (videos) per second, the fair comparison at equal frames, and as
LLM sequence tokens per second. Every (design, frames) step runs once per round in a shuffled
order; medians of `--repeats` rounds, speed-ups as medians of per-round ratios.

Commands (results in BENCHMARKS.md):

    python -m benchmarks.training                 # frames 16 .. 256, batch 2, 15 rounds
    python -m benchmarks.training --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse

import torch

from slowfast_vlm import SlowFastConfig
from slowfast_vlm.modeling.slow_tokens import SlowCache

from .common import (
    DTYPES,
    add_common_arguments,
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

DESIGNS = ("self-attention", "slowfast")
FRAMES = (16, 32, 64, 128, 256)
QUICK_FRAMES = (16, 32)
PROMPT_TOKENS = RESPONSE_TOKENS = 32


class TrainStep:
    """One optimizer step of `design` on a batch of `batch` samples of `frames`-frame videos."""

    def __init__(self, model, optimizer, design: str, frames: int, batch: int):
        config = model.config
        slow, fast = visual_tokens(config, frames, model.dtype)
        visual = fast if design == "slowfast" else slow
        self.model, self.optimizer = model, optimizer
        self.visual = visual.expand(batch, -1, -1)  # (B, V, D), no gradient: encoder and projector left out
        self.text_ids = torch.randint(0, config.video_token_id, (batch, PROMPT_TOKENS + RESPONSE_TOKENS))
        ignored = torch.full((batch, visual.shape[0] + PROMPT_TOKENS), -100)
        self.labels = torch.cat([ignored, self.text_ids[:, PROMPT_TOKENS:]], dim=1)  # (B, L)
        self.slow = slow.expand(batch, -1, -1) if design == "slowfast" else None  # (B, N, D)
        self.query_mask = torch.zeros(self.labels.shape, dtype=torch.bool)
        self.query_mask[:, visual.shape[0] :] = True  # prompt and response text query the slow tokens
        self.sequence_length = self.labels.shape[1]

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        text = self.model.get_input_embeddings()(self.text_ids)
        slow_cache = None
        if self.slow is not None:
            slow_cache = SlowCache(
                self.slow, torch.ones(self.slow.shape[:2], dtype=torch.bool), cache_kv=False
            )
        loss = self.model(
            inputs_embeds=torch.cat([self.visual, text], dim=1),
            labels=self.labels,
            slow_cache=slow_cache,
            slow_query_mask=self.query_mask if slow_cache is not None else None,
            use_cache=False,
        ).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeats=15)
    parser.add_argument("--frames", type=int, nargs="+", help=f"frame counts (default {FRAMES})")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights, activations, optimizer")
    args = parser.parse_args(argv)
    setup(args)
    frames_list = sorted(args.frames or (QUICK_FRAMES if args.quick else FRAMES))
    batch = 1 if args.quick else args.batch

    steps = {}
    for design in DESIGNS:  # one model and optimizer per design, shared by its frame counts
        knobs = dict(hybrid_every_n_layers=2) if design == "slowfast" else dict(hybrid_layers=[])
        config = SlowFastConfig.from_name(config_name(args, "bench-train"), **knobs)
        model = build_model(config, DTYPES[args.dtype]).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for frames in frames_list:
            steps[design, frames] = TrainStep(model, optimizer, design, frames, batch)
    samples = interleaved({key: (lambda s=step: timed(s)) for key, step in steps.items()}, args.repeats)
    seconds = {key: median(values) for key, values in samples.items()}

    rows = []
    for frames in frames_list:
        for design in DESIGNS:
            step, time = steps[design, frames], seconds[design, frames]
            rows.append(
                [
                    frames,
                    design,
                    f"{step.sequence_length:,}",
                    f"{step.slow.shape[1] if step.slow is not None else 0:,}",
                    f"{time * 1e3:,.0f}",
                    f"{batch / time:.2f}",
                    f"{batch * step.sequence_length / time:,.0f}",
                    f"{paired_ratio(samples, ('self-attention', frames), (design, frames)):.2f}x",
                ]
            )
    name = model_name(steps["slowfast", frames_list[0]].model.config)
    print(
        f"Training step (forward + backward + AdamW), {name}, batch {batch}, {PROMPT_TOKENS}+{RESPONSE_TOKENS} "
        f"text tokens; {machine_note(args.threads, args.dtype)}; "
        f"median of {args.repeats} round(s)\n"
    )
    headers = [
        "frames",
        "design",
        "sequence",
        "cross-attended slow",
        "step (ms)",
        "samples/s",
        "sequence tokens/s",
        "speed-up vs self-attention",
    ]
    print(markdown_table(headers, rows))

    figure, axis = new_figure()
    for design, marker in zip(DESIGNS, "os"):
        axis.plot(frames_list, [batch / seconds[design, f] for f in frames_list], marker=marker, label=design)
    log_axes(axis, frames_list, "frames", "training samples / s")
    axis.set_title(
        f"Training ({name}, batch {batch}), {args.threads} CPU thread(s), {args.dtype}", fontsize=9
    )
    save_figure(figure, args.out / "training.png")


if __name__ == "__main__":
    main()
