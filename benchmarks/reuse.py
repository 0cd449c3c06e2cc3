"""Encode once, ask many: what the `VisualCache` saves a chat's follow-up turn and an evaluation.

Three measurements, on the shipped demo model ("tiny") and on the named config "bench-scaled" (random
weights, the demo model's tokenizer; "bench-quick" under `--quick`), in one run:

1. Turn latency at each frame count, one round per repeat, the variants of a round in a shuffled order:
   - first turn: a video and a question, through a fresh cache (decode nothing: frames are given; encode,
     prefill, generate);
   - follow-up, reused: the next question, continuing the first turn's KV cache and slow keys/values;
   - follow-up, full: the same conversation without a cache (encode and prefill all of it again);
   - text-only follow-up: the same follow-up in a chat without a video whose first turn is as long (its
     text as many tokens as the video's fast tokens), continued from its caches the same way: what the
     follow-up's text costs. Target: the reused follow-up within 1.2x of it.
   Every turn generates exactly `--new-tokens` tokens (`min_new_tokens`); the table gives the tokens reused.
2. `predict` wall time on the synthetic test set (`slowfast-vlm synth`, `--eval-questions` questions,
   6 a clip, 64 frames each): questions grouped by video with the cache, against one question at a time
   with no cache (each question decodes and encodes its video: the evaluator before grouping), with the
   seconds spent in the vision encoder, which grouping saves (with the decoding).
3. The cache's bytes against its budget while distinct videos are asked about, two turns each.

The run is refused above `--max-load` (1-minute load average; `--allow-load` flags it instead); the
load before / after is printed beside each ratio.

Commands (results in BENCHMARKS.md, "Reuse"):

    python -m benchmarks.reuse                       # 16 / 64 / 128 frames, 3 rounds, both models
    python -m benchmarks.reuse --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from slowfast_vlm import SlowFastConfig, SlowFastProcessor
from slowfast_vlm.default_model import default_model_path
from slowfast_vlm.evaluation.dataset import load_samples
from slowfast_vlm.evaluation.evaluator import predict
from slowfast_vlm.evaluation.predictions import PredictionWriter
from slowfast_vlm.inference import build_conversation, load_model, reply
from slowfast_vlm.synth import write_split
from slowfast_vlm.visual_cache import VisualCache

from .common import (
    LoadRecord,
    add_common_arguments,
    add_load_arguments,
    build_model,
    config_name,
    machine_note,
    markdown_table,
    median,
    model_name,
    new_figure,
    paired_ratio,
    save_figure,
    setup,
)

FRAMES = (16, 64, 128)
QUICK_FRAMES = (16,)
TURNS = ("first turn", "follow-up, reused", "follow-up, full", "text-only follow-up")
FIRST, SECOND = "What happens in this video?", "Is there a dog? Describe it in detail."


def models(args: argparse.Namespace) -> dict[str, tuple]:
    """`{name: (model, processor)}`: the demo model, and the scaled one with the demo model's tokenizer."""
    demo, demo_processor = load_model(default_model_path(), "cpu", "float32")
    config = SlowFastConfig.from_name(config_name(args))
    scaled = build_model(config, torch.float32)
    processor = SlowFastProcessor.from_model_config(scaled.config, demo_processor.tokenizer)
    return {
        "tiny (demo model)": (demo, demo_processor),
        model_name(config): (processor.prepare_model(scaled), processor),
    }


class Chat:
    """Two turns of one conversation (with a video, or text-only with a first question as long)."""

    def __init__(self, model, processor, frames: np.ndarray | None, filler: str, new_tokens: int):
        self.model, self.processor, self.frames = model, processor, frames
        self.first_question = FIRST if frames is not None else f"{filler} {FIRST}"
        self.generation = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        self.cache = VisualCache(2**40)
        self.first = None

    def turn(self, second: bool, cache: bool) -> float:
        """Seconds of one turn: the first, or the follow-up (after a first turn, untimed if need be)."""
        if second and self.first is None:
            self.turn(second=False, cache=True)
        history = [(self.first_question, self.first.text)] if second else []
        conversation = build_conversation(
            SECOND if second else self.first_question, history, int(self.frames is not None)
        )
        visual_cache = self.cache if cache else None
        start = time.perf_counter()
        result = reply(
            self.model,
            self.processor,
            conversation,
            self.frames,
            visual_cache=visual_cache,
            **self.generation,
        )
        seconds = time.perf_counter() - start
        if not second:
            self.first = result
        self.last = result
        return seconds


def filler_text(processor, tokens: int) -> str:
    """Plain text of exactly `tokens` tokens (a word the tokenizer keeps whole, repeated)."""
    for word in (" the", " a", " and", " is"):
        if len(processor.tokenizer(word * 8)["input_ids"]) == 8:
            return (word * tokens).strip()
    raise RuntimeError("no one-token word in this tokenizer")


def fresh_turn(model, processor, video, filler: str, new_tokens: int, second: bool) -> float:
    """A first turn through a fresh cache, or a follow-up without a cache (a full run of it all)."""
    return Chat(model, processor, video, filler, new_tokens).turn(second=second, cache=not second)


def follow_up(chat: Chat) -> float:
    """A follow-up continuing a new conversation of `chat` (its first turn untimed)."""
    chat.first, chat.cache = None, VisualCache(2**40)
    return chat.turn(second=True, cache=True)


def turn_latency(model, processor, frames_list, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """`{(frames, turn): [seconds per round]}` and `{frames: (prompt tokens, reused tokens)}` of the follow-up."""
    rng = np.random.default_rng(0)
    size = processor.decode_short_side()
    samples, lengths = {}, {}
    for frames in frames_list:
        video = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        filler = filler_text(processor, processor.num_fast_tokens(frames))
        reused, text_only = (Chat(model, processor, clip, filler, new_tokens) for clip in (video, None))
        variants = {
            TURNS[0]: partial(fresh_turn, model, processor, video, filler, new_tokens, second=False),
            TURNS[1]: partial(follow_up, reused),
            TURNS[2]: partial(fresh_turn, model, processor, video, filler, new_tokens, second=True),
            TURNS[3]: partial(follow_up, text_only),
        }
        order = list(variants)
        for round_index in range(repeats + 1):  # one warm-up round
            random.Random(round_index).shuffle(order)
            for name in order:
                seconds = variants[name]()
                if round_index:
                    samples.setdefault((frames, name), []).append(seconds)
        lengths[frames] = (reused.last.prompt_tokens, reused.last.reused_tokens, text_only.last.prompt_tokens)
    return samples, lengths


@contextmanager
def encoder_seconds(model):
    """Yields a list that collects the wall seconds of every vision-encoder call."""
    seconds, started = [], []
    tower = model.model.vision_tower
    handles = [
        tower.register_forward_pre_hook(lambda *args: started.append(time.perf_counter())),
        tower.register_forward_hook(lambda *args: seconds.append(time.perf_counter() - started.pop())),
    ]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def eval_seconds(model, processor, questions: int, frames: int) -> dict[str, tuple[float, float]]:
    """`{variant: (wall seconds, encoder seconds)}` of `predict` on `questions` synthetic test questions,
    grouped + cached vs neither."""
    with tempfile.TemporaryDirectory() as directory:
        data = write_split(directory, questions, split="test", frames=64, size=64, progress=False)
        samples = load_samples(data)
        seconds = {}
        for name, grouped in (("one at a time, no cache", False), ("grouped by video, cached", True)):
            with (
                PredictionWriter(Path(directory) / f"{grouped}.jsonl") as writer,
                encoder_seconds(model) as encoder,
            ):
                start = time.perf_counter()
                predict(
                    model,
                    processor,
                    samples,
                    writer,
                    num_frames=frames,
                    fps=8.0,
                    max_new_tokens=8,
                    progress=False,
                    group_by_video=grouped,
                    visual_cache_mb=1024 if grouped else 0,
                )
                seconds[name] = (time.perf_counter() - start, sum(encoder))
    return seconds


def memory_rows(model, processor, frames: int, budgets_mb, videos: int, new_tokens: int) -> list[list]:
    """Per budget: the most bytes the cache held while `videos` distinct videos got two turns each."""
    rng = np.random.default_rng(1)
    size = processor.decode_short_side()
    clips = [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(videos)]
    rows = []
    for budget in budgets_mb:
        cache, peak = VisualCache.from_megabytes(budget), 0
        for clip in clips:
            first = reply(model, processor, build_conversation(FIRST), clip, new_tokens, visual_cache=cache)
            peak = max(peak, cache.nbytes)
            history = [(FIRST, first.text)]
            reply(model, processor, build_conversation(SECOND, history), clip, new_tokens, visual_cache=cache)
            peak = max(peak, cache.nbytes)
        stats = cache.stats
        rows.append(
            [
                f"{budget:g}",
                f"{peak / 2**20:.2f}",
                f"{peak / cache.budget_bytes:.0%}",
                len(cache),
                stats["evictions"],
                stats["conversation_reuses"],
                stats["conversation_fallbacks"],
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeats=3)
    add_load_arguments(parser)
    parser.add_argument("--frames", type=int, nargs="+", help=f"frame counts (default {FRAMES})")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens every turn generates (default 16)")
    parser.add_argument(
        "--eval-questions", type=int, default=24, help="synthetic test questions (default 24)"
    )
    args = parser.parse_args(argv)
    load = LoadRecord(args, parser)
    setup(args)
    frames_list = args.frames or (QUICK_FRAMES if args.quick else FRAMES)
    new_tokens = 4 if args.quick else args.new_tokens
    eval_questions = 12 if args.quick else args.eval_questions
    eval_frames = 16 if args.quick else 64

    results = {}
    for name, (model, processor) in models(args).items():
        samples, lengths = turn_latency(model, processor, frames_list, new_tokens, args.repeats)
        evaluation = eval_seconds(model, processor, eval_questions, eval_frames)
        memory = memory_rows(
            model, processor, frames_list[-1], (0.5, 2, 8) if args.quick else (2, 8, 32), 4, new_tokens
        )
        results[name] = (samples, lengths, evaluation, memory)
    load.finish()

    note = f"{machine_note(args.threads, 'float32')}; {load.note()}"
    print(
        f"Reuse: turn latency (ms, median of {args.repeats} rounds), {new_tokens} new tokens a turn; {note}\n"
    )
    rows = []
    for name, (samples, lengths, _, _) in results.items():
        for frames in frames_list:
            prompt, reused, text_prompt = lengths[frames]
            rows.append(
                [
                    name,
                    frames,
                    *(f"{median(samples[frames, turn]) * 1e3:.1f}" for turn in TURNS),
                    f"{reused:,} / {prompt:,} ({text_prompt:,})",
                    f"{paired_ratio(samples, (frames, TURNS[1]), (frames, TURNS[3])):.2f}x",
                    f"{paired_ratio(samples, (frames, TURNS[2]), (frames, TURNS[1])):.1f}x",
                    load.cell(),
                ]
            )
    headers = [
        "model",
        "frames",
        *TURNS,
        "reused / prompt (text-only)",
        "reused / text-only",
        "full / reused",
        "load",
    ]
    print(markdown_table(headers, rows))

    print(
        f"\nReuse: evaluation wall time (s) on the synthetic test set, {eval_questions} questions; {note}\n"
    )
    rows = []
    for name, (_, _, evaluation, _) in results.items():
        (plain, plain_encoder), (grouped, grouped_encoder) = evaluation.values()
        cells = [f"{plain:.2f}", f"{plain_encoder:.2f}", f"{grouped:.2f}", f"{grouped_encoder:.2f}"]
        rows.append([name, *cells, f"{plain / grouped:.2f}x", load.cell()])
    variants = list(next(iter(results.values()))[2])
    headers = ["model", f"{variants[0]}: wall", "encoder", f"{variants[1]}: wall", "encoder"]
    print(markdown_table([*headers, "speed-up", "load"], rows))

    print(f"\nReuse: cache memory against its budget, 4 videos x 2 turns at {frames_list[-1]} frames\n")
    rows = [[name, *row] for name, (_, _, _, memory) in results.items() for row in memory]
    headers = [
        "model",
        "budget MiB",
        "peak MiB",
        "peak / budget",
        "entries",
        "evictions",
        "reuses",
        "fallbacks",
    ]
    print(markdown_table(headers, rows))

    figure, axes = new_figure(len(results))
    for axis, (name, (samples, _, _, _)) in zip(np.atleast_1d(axes), results.items()):
        for turn in TURNS:
            axis.plot(
                frames_list, [median(samples[f, turn]) * 1e3 for f in frames_list], marker="o", label=turn
            )
        axis.set(xlabel="frames", ylabel="turn latency (ms)", title=name, yscale="log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, args.out / "reuse.png")


if __name__ == "__main__":
    main()
