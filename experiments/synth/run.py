"""Train and test one model of the CPU-scale comparison on the synthetic fine-detail QA benchmark.

    python experiments/synth/run.py prepare                 # write the data (docs/synth.md) and decode it once
    python experiments/synth/run.py train --model c --seed 0

Models (all from scratch, everything trainable, the same steps / batch / data / schedule):
    a  self-attention only, 16 uniformly sampled frames, every frame's tokens in the sequence
    b  self-attention only, the fast tokens of (c): 64 frames pooled x4 in time -> 16 fast frames
    c  slow-fast: the fast tokens of (b) + the slow tokens of all 64 frames through a hybrid layer
    d  self-attention only, all 64 frames at full tokens (upper bound, 4x the sequence)

Training packs the 6 questions of a clip into one multi-turn conversation (the video once, then the
question/answer turns in random order), so the video is encoded and prefilled once for 6 answers.
The test is the benchmark's single-question prompt, scored by the log-likelihood of the four option
letters at the answer position (the letter with the largest logit is the prediction).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slowfast_vlm.compute import estimate
from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration
from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.processing.video import load_video, uniform_sample_indices
from slowfast_vlm.training.scratch import ScratchGeometry, build_scratch_model

HERE = Path(__file__).parent
DATA = Path("outputs/synth/data")
RUNS = Path("outputs/synth/runs")
SIZE, FRAMES, FPS = 32, 64, 8
SPLITS = {"train": 6000, "test": 300}  # questions (6 per clip)
LETTERS = "ABCD"

# Per model: SlowFastConfig knobs and how frames are sampled (also saved as the processor's video_defaults).
MODELS = {
    "a": (
        {"hybrid_layers": [], "fast_temporal_pooling_stride": 1},
        {"num_frames": 16, "sampling": "uniform"},
    ),
    "b": ({"hybrid_layers": []}, {"num_frames": 64, "fps": FPS, "sampling": "fps"}),
    # From scratch, the published gate (tanh(w), w = 0 at the start) never opens: nothing useful comes
    # through the closed branch, so nothing teaches it to open (tanh(w) = 0.004 after 300 steps).
    "c": ({"hybrid_layers": [2], "gate_type": "none"}, {"num_frames": 64, "fps": FPS, "sampling": "fps"}),
    "d": (
        {"hybrid_layers": [], "fast_temporal_pooling_stride": 1},
        {"num_frames": 64, "fps": FPS, "sampling": "fps"},
    ),
}
# 32 px frames, 8 px patches: a 4 x 4 grid, not pooled (video_pooling_stride 1), so one 5 x 7 px digit
# lies in one or two tokens of 8 x 8 px.
GEOMETRY = {"video_pooling_stride": 1}


def question_of(record: dict) -> str:
    """The human turn without its `<video>` placeholder (what `slowfast-vlm ask` is given)."""
    return record["conversations"][0]["value"].removeprefix("<video>\n")


def read_clips(split: str) -> list[list[dict]]:
    """Records of a split grouped by clip (6 consecutive records share a video)."""
    records = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
    return [records[i : i + 6] for i in range(0, len(records), 6)]


def prepare() -> None:
    """Write the train and test splits and decode every train clip once into `train_frames.npy`."""
    for split, num in SPLITS.items():
        if not (DATA / f"{split}.jsonl").exists():
            subprocess.run(
                ["slowfast-vlm", "synth", "--out", str(DATA), "--num", str(num), "--split", split,
                 "--seed", "0", "--size", str(SIZE), "--frames", str(FRAMES), "--fps", str(FPS)],
                check=True,
            )  # fmt: skip
    frames = [load_video(DATA / clip[0]["video"], FRAMES, fps=FPS)[0] for clip in read_clips("train")]
    np.save(DATA / "train_frames.npy", np.stack(frames))  # (clips, 64, 32, 32, 3) uint8


def conversation(questions: list[str], answers: list[str] | None = None) -> list[dict]:
    """Chat messages: the video with the first question, then one turn per further question."""
    messages = []
    for i, question in enumerate(questions):
        content = [{"type": "video"}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answers is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
    return messages


def digit_question(record: dict) -> str:
    """The question without its options, asking for the digit itself (an auxiliary training turn)."""
    return question_of(record).split("\nOptions:")[0] + "\nAnswer with the digit."


def training_batch(
    processor, clips: list[list[dict]], videos: list[np.ndarray], rng: np.random.Generator, digit_turns: float
):
    """Inputs and labels for one step: per clip one conversation of its 6 questions in random order,
    each asked with its options (answer: the letter) or, with probability `digit_turns`, without them
    (answer: the digit); the loss is on the answers and their `<|im_end|>` (labels -100 elsewhere)."""
    texts = []
    for clip in clips:
        questions, answers = [], []
        for i in rng.permutation(len(clip)):
            as_digit = rng.random() < digit_turns
            questions.append(digit_question(clip[i]) if as_digit else question_of(clip[i]))
            answers.append(clip[i]["answer_text"] if as_digit else clip[i]["answer"])
        texts.append(processor.apply_chat_template(conversation(questions, answers)))
    inputs = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    answer_start = processor.tokenizer.encode("<|im_start|>assistant\n")
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(ids.tolist()):
        for start in range(len(row) - len(answer_start)):
            if row[start : start + len(answer_start)] == answer_start:
                first = start + len(answer_start)
                labels[b, first : first + 2] = ids[b, first : first + 2]  # the letter and <|im_end|>
    return inputs, labels


def select_frames(frames: np.ndarray, defaults: dict) -> np.ndarray:
    """The frames `load_video` would return for this model from a decoded 64-frame clip."""
    if defaults["sampling"] == "uniform":
        return frames[uniform_sample_indices(len(frames), defaults["num_frames"])]
    return frames  # 64 frames at 8 fps: every frame


@torch.no_grad()
def test_accuracy(model, processor, defaults: dict) -> dict:
    """Accuracy on the test split, decoding each clip with the model's sampling (as `ask` does)."""
    model.eval()
    letter_ids = [processor.tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    correct = {"digit_touching_wall": [], "digit_away_from_wall": []}
    for clip in read_clips("test"):
        frames, _ = load_video(DATA / clip[0]["video"], defaults["num_frames"], **_sampling(defaults))
        prompts = [
            processor.apply_chat_template(conversation([question_of(r)]), add_generation_prompt=True)
            for r in clip
        ]
        inputs = processor(text=prompts, videos=[frames] * len(clip), padding=True, return_tensors="pt")
        logits = model(**inputs).logits
        last = inputs["attention_mask"].sum(1) - 1  # right padding: the last prompt position
        letter_logits = logits[torch.arange(len(clip)), last][:, letter_ids]
        for record, guess in zip(clip, letter_logits.argmax(-1).tolist()):
            correct[record["category"]].append(LETTERS[guess] == record["answer"])
    every = correct["digit_touching_wall"] + correct["digit_away_from_wall"]
    model.train()
    return {"accuracy": float(np.mean(every)), "questions": len(every)} | {
        category: float(np.mean(hits)) for category, hits in correct.items()
    }


def _sampling(defaults: dict) -> dict:
    return {"fps": defaults.get("fps"), "sampling": defaults["sampling"]}


def prefill_flops(model, processor, name: str) -> dict:
    """LLM prefill FLOPs (compute.estimate) of this model on one single-question test prompt."""
    record = read_clips("test")[0][0]
    prompt = processor.apply_chat_template(conversation([question_of(record)]), add_generation_prompt=True)
    prompt_tokens = len(processor.tokenizer(prompt.replace(processor.video_token, ""))["input_ids"])
    frames = MODELS[name][1]["num_frames"]
    design = "self-attention" if name in "ad" else "slowfast"
    result = estimate(model.config, frames, prompt_tokens, design)
    return {"llm_prefill_flops": result.llm_prefill_flops, "sequence_length": result.sequence_length}


def train(
    name: str,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    digit_turns: float,
    out: Path,
    init_from: Path | None = None,
    data_seed: int = 0,
) -> dict:
    """Train model `name` (from scratch, or on from the run saved in `init_from`), test it, save it in `out`."""
    torch.set_num_threads(1)
    knobs, defaults = MODELS[name]
    clips = read_clips("train")
    all_frames = np.load(DATA / "train_frames.npy", mmap_mode="r")
    texts = [question_of(r) for clip in clips for r in clip] + [digit_question(clips[0][0]), *LETTERS]
    geometry = ScratchGeometry(image_size=SIZE, slowfast={**GEOMETRY, **knobs})
    if init_from is None:
        model, processor = build_scratch_model(texts, geometry, video_defaults=defaults, seed=seed)
    else:
        model = SlowFastForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        processor = SlowFastProcessor.from_pretrained(init_from)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    data_rng = np.random.default_rng(data_seed)  # the same clips and orders for every model and seed
    log = []
    started = time.time()
    for step in range(steps):
        picked = data_rng.choice(len(clips), batch, replace=False)
        videos = [select_frames(np.asarray(all_frames[i]), defaults) for i in picked]
        inputs, labels = training_batch(processor, [clips[i] for i in picked], videos, data_rng, digit_turns)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(
                f"{name} s{seed} step {step} loss {np.mean(log[-10:]):.3f} {time.time() - started:.0f}s",
                flush=True,
            )
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    result = {
        "model": name,
        "seed": seed,
        "steps": steps,
        "batch_clips": batch,
        "lr": lr,
        "init_from": str(init_from) if init_from else None,
        "data_seed": data_seed,
        "digit_turns": digit_turns,
        "train_seconds": round(time.time() - started),
        "final_loss": float(np.mean(log[-10:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        **prefill_flops(model, processor, name),
        **test_accuracy(model, processor, defaults),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def summarize(runs_dir: Path = RUNS) -> str:
    """A Markdown table of every finished run under `runs_dir`: accuracy mean and spread over seeds, FLOPs."""
    results: dict[str, list[dict]] = {}
    for path in sorted(runs_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["model"], []).append(result)
    rows = [
        "| model | seeds | test accuracy | touching / not touching | LLM prefill FLOPs | vs (a) |",
        "|---|---|---|---|---|---|",
    ]
    base = results["a"][0]["llm_prefill_flops"] if "a" in results else None
    for name, runs in sorted(results.items()):
        acc = [100 * r["accuracy"] for r in runs]
        touch = np.mean([100 * r["digit_touching_wall"] for r in runs])
        away = np.mean([100 * r["digit_away_from_wall"] for r in runs])
        spread = f" ± {(max(acc) - min(acc)) / 2:.1f}" if len(acc) > 1 else ""
        flops = runs[0]["llm_prefill_flops"]
        ratio = f"{flops / base:.3f}x" if base else ""
        rows.append(
            f"| ({name}) | {', '.join(str(r['seed']) for r in runs)} | {np.mean(acc):.1f}%{spread} "
            f"({', '.join(f'{a:.1f}' for a in acc)}) | {touch:.1f}% / {away:.1f}% | {flops / 1e6:.0f} M | {ratio} |"
        )
    return "\n".join(rows)


def ship(run_dir: Path) -> None:
    """Save a trained model in bfloat16 as the package's demo model, with the first test question it
    answers correctly through `slowfast-vlm ask`'s own code path (`answer`, greedy)."""
    from slowfast_vlm.ask import answer
    from slowfast_vlm.default_model import DEMO_CLIP, DEMO_MODEL_DIR

    model = SlowFastForConditionalGeneration.from_pretrained(run_dir, dtype=torch.bfloat16)
    model.save_pretrained(DEMO_MODEL_DIR)
    SlowFastProcessor.from_pretrained(run_dir).save_pretrained(DEMO_MODEL_DIR)
    model = SlowFastForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    processor = SlowFastProcessor.from_pretrained(DEMO_MODEL_DIR)
    defaults = processor.video_defaults
    for clip in read_clips("test"):
        frames, _ = load_video(DATA / clip[0]["video"], defaults["num_frames"], **_sampling(defaults))
        for record in clip:
            with torch.inference_mode():
                text, _, _ = answer(model, processor, frames, question_of(record), max_new_tokens=4)
            if text == record["answer"]:
                shutil.copyfile(DATA / record["video"], DEMO_CLIP)
                DEMO_CLIP.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
                print(f"shipped {run_dir} with {record['id']}: {question_of(record)!r} -> {text}")
                return
    raise RuntimeError(f"{run_dir} answers no test question correctly")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="write and decode the data")
    summarize_parser = commands.add_parser("summarize", help="print the results table of the finished runs")
    summarize_parser.add_argument("runs_dir", type=Path, nargs="?", default=RUNS)
    ship_parser = commands.add_parser("ship", help="make a trained run the package's demo model")
    ship_parser.add_argument("run_dir", type=Path, nargs="?", default=RUNS / "c-s0")
    run = commands.add_parser("train", help="train one model and test it")
    run.add_argument("--model", choices=sorted(MODELS), required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=500)
    run.add_argument("--batch", type=int, default=8, help="clips per step (6 questions each)")
    run.add_argument("--lr", type=float, default=2e-3)
    run.add_argument("--init-from", type=Path, help="continue from a finished run's directory")
    run.add_argument("--data-seed", type=int, default=0, help="seed of the clip and question order")
    run.add_argument(
        "--digit-turns", type=float, default=0.5, help="fraction of training turns that ask for the digit"
    )
    run.add_argument("--out", type=Path, help=f"default: {RUNS}/<model>-s<seed>")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare()
    elif args.command == "summarize":
        print(summarize(args.runs_dir))
    elif args.command == "ship":
        ship(args.run_dir)
    else:
        out = args.out or RUNS / f"{args.model}-s{args.seed}"
        train(
            args.model, args.seed, args.steps, args.batch, args.lr, args.digit_turns, out,
            args.init_from, args.data_seed,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
