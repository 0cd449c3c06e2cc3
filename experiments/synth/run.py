"""Train and test the four models of the CPU-scale comparison on the synthetic fine-detail QA benchmark.

    python experiments/synth/run.py prepare                   # write the data (docs/synth.md), decode it once
    python experiments/synth/run.py pretrain-vision           # stage 0: the frame encoder (shared, then frozen)
    python experiments/synth/run.py pretrain-llm --seed 0     # stage 1: image QA on single frames
    python experiments/synth/run.py train --model c --seed 0  # stage 2: video QA, from stage 1 (resumes)
    python experiments/synth/run.py plan --seeds 0 1 2 --models a b c  # whatever of the above is not done

Models (the same stage 0 and stage 1, then the same stage-2 steps / batch / clips / schedule):
    a  self-attention only, 16 uniformly sampled frames, every frame's tokens in the sequence
    b  self-attention only, the fast tokens of (c): 64 frames pooled x4 in time -> 16 fast frames
    c  slow-fast: the fast tokens of (b) + the slow tokens of all 64 frames through a hybrid layer
    d  self-attention only, all 64 frames at full tokens (upper bound, 4x the sequence)

Stage 2 packs the 6 questions of a clip into one multi-turn conversation (the video once, then the
question/answer turns in random order), so the video is encoded and prefilled once for 6 answers. Each
turn is asked, with probability 1/2, in the benchmark's open form (`open_question`: answered with the
digit) or in its multiple-choice form (`choice_question`: answered with the letter, or with
`--choice-answers reasoned` with the digit, the options again and the letter, "7; A. 3 B. 7 C. 1 D. 0; B"). The test scores both forms
(`scoring.py`): of the four option digits, resp. the letters A-D, the one with the largest logit at the
answer position is the prediction (chance 25%); the digit-first answer is scored by the best letter after
the model's own best digit.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchmark import (
    CHOICE_ANSWERS,
    DIGIT_FIRST_ANSWERS,
    FPS,
    FRAMES,
    OPENED_ANSWERS,
    SIZE,
    answer_spans,
    conversation,
    exercise,
    mixed_turn,
    one_per_square,
    text_chat,
    without_digits,
)
from checkpoints import resumable_steps
from evidence_attention import EvidenceAttention, digit_choice_targets, evidence_targets
from open_reading import open_reading_loss
from plan import Lookup, run_plan, stages
from scoring import chooses_answer, chooses_letter, demo_question, score, test_accuracy
from torch import nn
from tqdm import tqdm
from transformers import BatchFeature
from whitened_training import WhitenedLinear, fold_whitened, whiten_hybrid_projections

from slowfast_vlm.compute import estimate
from slowfast_vlm.config import SlowFastConfig
from slowfast_vlm.modeling.hybrid import add_hybrid_layers
from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration
from slowfast_vlm.modeling.vision import build_vision_tower, encoder_grids
from slowfast_vlm.processing.processor import SlowFastProcessor, image_processor_for
from slowfast_vlm.processing.video import load_video, uniform_sample_indices, write_video
from slowfast_vlm.synth import (
    COLOURS,
    CRF,
    LETTERS,
    QUESTIONS_PER_CLIP,
    choice_question,
    generate_clip,
    open_question,
)
from slowfast_vlm.training.scratch import build_scratch_model

HERE = Path(__file__).parent
DATA = Path("outputs/synth/data")
RUNS = Path("outputs/synth/runs")
VISION = Path("outputs/synth/vision")
STAGE1 = Path("outputs/synth/stage1")
LOOKUP_RUNS = Path("outputs/synth/lookup")  # plan --lookup: the text-only lookup runs, per seed
LOOKUP_RECIPE_RUNS = Path("outputs/synth/runs-lookup")  # plan --lookup: its stage-2 runs
# Stage 1 trains each architecture on images: (a), (b), (d) share the plain LLM; (c) has its hybrid layer
# from the start, so its cross-attention learns to read an image's slow tokens (16 of them, one with the
# digit) before it must find 6 digit tokens among 64 frames' 1024. No gate: the published gate (w = 0)
# keeps a closed branch closed when nothing has trained it yet.
STAGE1_KNOBS = {
    "plain": {"hybrid_layers": []},
    "slow": {"hybrid_layers": [2], "gate_type": "none"},
    "slow-early": {"hybrid_layers": [1], "gate_type": "none"},
}
SPLITS = {"train": 6000, "test": 300}  # questions (6 per clip)
POOL_CLIPS = 4000  # further train-split clips whose frames the pre-training stages see

# Per model: SlowFastConfig knobs and how frames are sampled (also saved as the processor's video_defaults).
MODELS = {
    "a": (
        {"hybrid_layers": [], "fast_temporal_pooling_stride": 1},
        {"num_frames": 16, "sampling": "uniform"},
    ),
    "b": ({"hybrid_layers": []}, {"num_frames": 64, "fps": FPS, "sampling": "fps"}),
    # the published gate: tanh(w) * tanh(gate_proj(x)), w = 0, so (c) starts as exactly the stage-1 LLM
    "c": ({"hybrid_layers": [2]}, {"num_frames": 64, "fps": FPS, "sampling": "fps"}),
    # (c) with its hybrid layer one earlier: two decoder layers, not one, follow the cross-attention,
    # room to map the digit it read onto the letter of the option that lists it (multiple-choice form)
    "c-early": ({"hybrid_layers": [1]}, {"num_frames": 64, "fps": FPS, "sampling": "fps"}),
    "c-nogate": (
        {"hybrid_layers": [2], "gate_type": "none"},
        {"num_frames": 64, "fps": FPS, "sampling": "fps"},
    ),
    "d": (
        {"hybrid_layers": [], "fast_temporal_pooling_stride": 1},
        {"num_frames": 64, "fps": FPS, "sampling": "fps"},
    ),
}
# Every model is the named config "scratch": 32 px frames, 8 px patches: a 4 x 4 grid, not pooled
# (video_pooling_stride 1), so one 5 x 7 px digit lies in one or two tokens of 8 x 8 px.
SCRATCH_VISION = SlowFastConfig.from_name("scratch").vision_config


def read_clips(split: str) -> list[list[dict]]:
    """Records of a split grouped by clip (6 consecutive records share a video)."""
    records = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
    return [records[i : i + 6] for i in range(0, len(records), 6)]


def write_split(split: str, out: Path = DATA) -> None:
    """Write one split of the experiment's data (`SPLITS`, seed 0) to `out` with `slowfast-vlm synth`."""
    subprocess.run(
        ["slowfast-vlm", "synth", "--out", str(out), "--num", str(SPLITS[split]), "--split", split,
         "--seed", "0", "--size", str(SIZE), "--frames", str(FRAMES), "--fps", str(FPS)],
        check=True,
    )  # fmt: skip


def prepare(pool_clips: int = POOL_CLIPS) -> None:
    """Write the train and test splits, decode every train clip once into `train_frames.npy`, and write
    the frame pool of the pre-training stages (`write_frame_pool`)."""
    for split in SPLITS:
        if not (DATA / f"{split}.jsonl").exists():
            write_split(split)
    if not (DATA / "train_frames.npy").exists():
        frames = [load_video(DATA / clip[0]["video"], FRAMES, fps=FPS)[0] for clip in read_clips("train")]
        np.save(DATA / "train_frames.npy", np.stack(frames))  # (clips, 64, 32, 32, 3) uint8
    if not (DATA / "frame_pool.npz").exists():
        write_frame_pool(pool_clips)


# ----- stage 0: the frame encoder, pre-trained once on single frames and frozen for every model -----
PATCH = SCRATCH_VISION.patch_size
NO_DIGIT, NO_COLOUR, NO_SQUARE = 10, len(COLOURS), 2
HEADS = {"digit": NO_DIGIT + 1, "colour": NO_COLOUR + 1, "touching": NO_SQUARE + 1}


def scene_labels(rendered: np.ndarray, records: list[dict]) -> dict[str, np.ndarray]:
    """Per-patch labels `(T, g, g)` of a rendered clip `(T, S, S, 3)`, from the generator's pixels and records.

    digit: the digit whose glyph centre lies in the patch (else 10); colour: the square colour with the
    most pixels in the patch (>= 8 of 64, else 5); touching: whether that square touches a wall in this
    frame (1), does not (0), or no square (2). A generic per-frame scene parse: no question, no pooling.
    """
    frames, size = rendered.shape[0], rendered.shape[1]
    grid = size // PATCH
    is_colour = (rendered[..., None, :] == np.array(list(COLOURS.values()))).all(-1)  # (T, S, S, 5)
    touches = (
        is_colour[:, 0].any(1)
        | is_colour[:, -1].any(1)
        | is_colour[:, :, 0].any(1)
        | is_colour[:, :, -1].any(1)
    )
    counts = is_colour.reshape(frames, grid, PATCH, grid, PATCH, -1).sum((2, 4))  # (T, g, g, 5)
    colour = np.where(counts.max(-1) >= 8, counts.argmax(-1), NO_COLOUR)
    touching = np.take_along_axis(np.pad(touches, ((0, 0), (0, 1))), colour.reshape(frames, -1), 1)
    touching = np.where(colour == NO_COLOUR, NO_SQUARE, touching.reshape(colour.shape).astype(np.int64))
    digit = np.full_like(colour, NO_DIGIT)
    for record in records:
        x0, y0, x1, y1 = record["detail_box"]
        digit[record["detail_frames"][0], (y0 + y1) // 2 // PATCH, (x0 + x1) // 2 // PATCH] = int(
            record["answer_text"]
        )
    return {"digit": digit, "colour": colour, "touching": touching}


def pool_clip(clip: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
    """Train-split clip `clip` (past those of `train.jsonl`) through the benchmark's own mp4 round trip:
    its 6 digit frames then 6 other frames `(12, S, S, 3)` as decoded, their `scene_labels`, its records."""
    rendered, records = generate_clip(clip, 0, "train", FRAMES, SIZE, FPS)
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "clip.mp4", rendered, FPS, crf=CRF)
        decoded, _ = load_video(Path(tmp) / "clip.mp4", FRAMES, fps=FPS)
    shown = [r["detail_frames"][0] for r in records]
    others = np.setdiff1d(np.arange(FRAMES), shown)
    picked = shown + np.random.default_rng(clip).choice(others, QUESTIONS_PER_CLIP, replace=False).tolist()
    labels = scene_labels(rendered, records)
    return decoded[picked], {k: v[picked] for k, v in labels.items()}, records


def write_frame_pool(num_clips: int) -> None:
    """`frame_pool.npz` + `frame_pool.jsonl`: `pool_clip` of clips 1000.. (decoded, as the test frames
    are: h264 4:2:0 blurs colour edges, so encoders must not learn on the rendered pixels)."""
    first = len(read_clips("train"))
    with multiprocessing.Pool(2) as workers:
        clips = list(
            tqdm(
                workers.imap(pool_clip, range(first, first + num_clips), chunksize=16),
                total=num_clips,
                desc="frame pool",
            )
        )
    arrays = {"frames": np.stack([frames for frames, _, _ in clips])}  # (clips, 12, S, S, 3)
    arrays |= {k: np.stack([labels[k] for _, labels, _ in clips]) for k in HEADS}  # (clips, 12, g, g)
    np.savez(DATA / "frame_pool.npz", **arrays)
    (DATA / "frame_pool.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for _, _, records in clips for r in records)
    )


def read_frame_pool() -> tuple[dict[str, np.ndarray], list[list[dict]]]:
    """The frame pool's arrays and its records grouped by clip (record i describes digit frame i)."""
    records = [json.loads(line) for line in (DATA / "frame_pool.jsonl").read_text().splitlines()]
    pool = dict(np.load(DATA / "frame_pool.npz"))
    return pool, [records[i : i + QUESTIONS_PER_CLIP] for i in range(0, len(records), QUESTIONS_PER_CLIP)]


def pretrain_vision(steps: int, batch: int, lr: float, out: Path = VISION, seed: int = 0) -> dict:
    """Train the frame encoder on per-patch digit / colour / wall-contact labels of single frames.

    Frames come from the frame pool (`prepare`); half of each batch show a digit. Saves the encoder
    (without its heads) for `pretrain-llm`; reports per-head accuracy on the test clips' decoded frames.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vision_config = SCRATCH_VISION
    encoder = build_vision_tower(vision_config)
    heads = torch.nn.Linear(vision_config.hidden_size, sum(HEADS.values()))
    image_processor = image_processor_for(vision_config)
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    pool, _ = read_frame_pool()
    clips, per_clip = pool["frames"].shape[:2]
    shows_digit = np.tile(np.arange(per_clip) < QUESTIONS_PER_CLIP, clips)  # each clip's first 6 frames
    with_digit, without = np.flatnonzero(shows_digit), np.flatnonzero(~shows_digit)
    pool = {k: v.reshape(-1, *v.shape[2:]) for k, v in pool.items()}  # (clips * 12, ...)

    def predict(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = heads(encoder_grids(encoder, pixels, -1))  # (N, g, g, sum of classes)
        return dict(zip(HEADS, logits.split(list(HEADS.values()), -1)))

    started = time.time()
    for step in range(steps):
        picked = np.concatenate([rng.choice(with_digit, batch // 2), rng.choice(without, batch - batch // 2)])
        logits = predict(image_processor(list(pool["frames"][picked]), return_tensors="pt")["pixel_values"])
        loss = sum(
            F.cross_entropy(logits[k].flatten(0, 2), torch.from_numpy(pool[k][picked]).flatten())
            for k in HEADS
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"vision step {step} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)

    encoder.eval()
    hits = {k: [] for k in HEADS}
    with torch.no_grad():
        for index, clip in enumerate(read_clips("test")):
            rendered, _ = generate_clip(index, 0, "test", FRAMES, SIZE, FPS)
            test_labels = scene_labels(rendered, clip)
            decoded, _ = load_video(DATA / clip[0]["video"], FRAMES, fps=FPS)
            logits = predict(image_processor(list(decoded), return_tensors="pt")["pixel_values"])
            for k in HEADS:
                target = torch.from_numpy(test_labels[k])
                scored = target != HEADS[k] - 1 if k == "digit" else torch.ones_like(target, dtype=torch.bool)
                hits[k] += (logits[k].argmax(-1) == target)[scored].tolist()
    result = {"steps": steps, "batch_frames": batch, "lr": lr, "seconds": round(time.time() - started)}
    result |= {f"test_{k}_accuracy": float(np.mean(v)) for k, v in hits.items()}
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


# ----- stage 1: image QA on single frames, the starting point of every model's video training -----
IMAGE_QUESTIONS = ("What colour is the square that shows it?", "Is that square touching a wall?")


def colour_of(record: dict) -> str:
    """The colour word of a record's question ("The red square ...")."""
    return next(c for c in COLOURS if f"The {c} square" in record["conversations"][0]["value"])


def image_conversation(record: dict, rng: np.random.Generator | None = None) -> list[dict]:
    """The 3-turn conversation about the frame that shows a record's digit: the record's own question
    (its digit; the video questions' wording, so that stage 2 starts from a model that already looks for
    the digit when asked it), the colour of the square showing it, whether it touches a wall. The first
    question is in the open form, or, given `rng`, in either form as stage 2 asks it (`mixed_turn`)."""
    touching = "yes" if record["category"] == "digit_touching_wall" else "no"
    question, digit_answer = (
        (open_question(record), record["answer_text"]) if rng is None else mixed_turn(record, rng)
    )
    return conversation([question, *IMAGE_QUESTIONS], [digit_answer, colour_of(record), touching], "image")


def scratch_texts() -> list[str]:
    """What the tokenizer is trained on: the train questions (open form), the image questions, every answer."""
    texts = [open_question(r) for clip in read_clips("train") for r in clip]
    return texts + list(IMAGE_QUESTIONS) + [*map(str, range(10)), *COLOURS, "yes", "no"]


def load_frozen_vision(model: SlowFastForConditionalGeneration, vision: Path) -> None:
    """Put the pre-trained frame encoder into `model` and freeze it (as the paper freezes SigLIP)."""
    encoder = model.model.vision_tower
    encoder.load_state_dict(type(encoder).from_pretrained(vision).state_dict())
    encoder.requires_grad_(False)


def start_from_text_only(model: SlowFastForConditionalGeneration, processor, init: Path) -> None:
    """Put the LLM of a text-only run (`lookup.py`, built by `build_scratch_model` on `scratch_texts()`)
    into `model`; a slow model's hybrid-layer weights, absent there, keep their initialisation."""
    if SlowFastProcessor.from_pretrained(init).tokenizer.get_vocab() != processor.tokenizer.get_vocab():
        raise ValueError(f"{init}: its tokenizer is not the experiment's (made from other texts)")
    text_only = SlowFastForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    language_model = {
        k: v for k, v in text_only.state_dict().items() if ".language_model." in k or k.startswith("lm_head")
    }
    unexpected = model.load_state_dict(language_model, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{init}: weights this model does not have: {unexpected[:3]}")


def stage1_kind(model: str) -> str:
    return {"c": "slow", "c-early": "slow-early"}.get(model, "plain")


def stage1_dir(kind: str, seed: int) -> Path:
    return Path(f"{STAGE1}-{kind}-s{seed}")


def lookup_stage1_dir(kind: str, seed: int) -> Path:
    """Stage 1 of the lookup recipe (`plan --lookup`): from the text-only lookup LLM, both forms."""
    return Path(f"{STAGE1}-{kind}-lookup-s{seed}")


def clipped_step(loss: torch.Tensor, parameters: list, optimizer, schedule) -> float:
    """One optimisation step of the LLM stages: backward, gradient norm clipped to 1.0, optimizer and
    schedule step, gradients zeroed. Returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    return loss.item()


def finished(out: Path, result: dict) -> dict:
    """Record a finished stage: its `result.json` (what `plan` looks for), its resume checkpoint removed."""
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out / "checkpoint")
    print(json.dumps(result), flush=True)
    return result


def pretrain_llm(
    steps: int,
    batch: int,
    lr: float,
    out: Path,
    kind: str = "plain",
    vision: Path = VISION,
    seed: int = 0,
    stop_after: int | None = None,
    both_forms: bool = False,
    init: Path | None = None,
) -> dict | None:
    """Train projector + LLM on image QA about the frame pool's digit frames, on the frozen encoder; every
    video model of this seed and kind starts from this checkpoint. With `both_forms` the digit question
    is asked in the open or the multiple-choice form (p = 1/2 each), so that the letter mapping is
    learnt where the digit is plain. With `init` (a `lookup.py` run: the same tokenizer and LLM) the LLM
    starts from its weights instead of random ones. Resumable as stage 2 is (`resumable_steps`; None
    when stopped)."""
    torch.set_num_threads(1)
    model, processor = build_scratch_model(scratch_texts(), seed=seed, **STAGE1_KNOBS[kind])
    if init is not None:
        start_from_text_only(model, processor, init)
    load_frozen_vision(model, vision)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    pool, pool_records = read_frame_pool()
    rng = np.random.default_rng(seed)
    settings = {
        "kind": kind,
        "steps": steps,
        "batch_images": batch,
        "lr": lr,
        "seed": seed,
        "vision": str(vision),
    }
    if both_forms:  # (absent when off: the checkpoints of earlier runs still resume)
        settings["both_forms"] = True
    if init is not None:
        settings["init"] = str(init)

    def one_step(step: int) -> float:
        picked = [
            divmod(int(i), QUESTIONS_PER_CLIP)
            for i in rng.choice(len(pool_records) * QUESTIONS_PER_CLIP, batch)
        ]
        chats = [image_conversation(pool_records[clip][i], rng if both_forms else None) for clip, i in picked]
        frames = [pool["frames"][clip, i] for clip, i in picked]
        texts = [processor.apply_chat_template(chat) for chat in chats]
        inputs = processor(text=texts, images=frames, padding=True, return_tensors="pt")
        loss = model(**inputs, labels=answer_labels(inputs["input_ids"], processor.tokenizer)).loss
        return clipped_step(loss, trainable, optimizer, schedule)

    outcome = resumable_steps(
        out, settings, model, optimizer, schedule, rng, steps, one_step, "stage 1", print_every=50,
        stop_after=stop_after,
    )  # fmt: skip
    if outcome is None:
        return None
    log, seconds = outcome
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    result = settings | {"final_loss": float(np.mean(log[-50:])), "seconds": round(seconds)}
    return finished(out, result)


def training_batch(
    processor,
    clips: list[list[dict]],
    videos: list[np.ndarray],
    rng: np.random.Generator,
    choice_answers: str = "letter",
    listed_open: int = 0,
    open_twin: bool = False,
) -> tuple[BatchFeature, torch.Tensor, BatchFeature | None]:
    """Inputs, labels and open twin (None unless `open_twin`) for one step: per clip one conversation of its questions (6, or the one of a
    single-event clip) in random order, each in the open or the multiple-choice form (`mixed_turn`, the
    latter answered as `choice_answers` says, the former with up to `listed_open` digits listed); the
    loss is on each answer and its `<|im_end|>`. With `open_twin`, also the inputs of the same
    conversations with every multiple-choice turn asked and answered in the open form (`open_reading`)."""
    chats, twins = [], []
    for clip in clips:
        records = [clip[i] for i in rng.permutation(len(clip))]
        turns = [mixed_turn(record, rng, choice_answers, listed_open) for record in records]
        chats.append(conversation(*map(list, zip(*turns))))
        if open_twin:
            opened = [
                (open_question(record), record["answer_text"]) if question == choice_question(record) else (question, answer)
                for record, (question, answer) in zip(records, turns)
            ]  # fmt: skip
            twins.append(conversation(*map(list, zip(*opened))))
    inputs = processor(
        text=[processor.apply_chat_template(chat) for chat in chats],
        videos=videos,
        padding=True,
        return_tensors="pt",
    )
    labels = answer_labels(inputs["input_ids"], processor.tokenizer)
    if not open_twin:
        return inputs, labels, None
    twin = [processor.apply_chat_template(chat) for chat in twins]
    return inputs, labels, processor(text=twin, videos=videos, padding=True, return_tensors="pt")


def lookup_batch(
    processor, exercises: list[tuple[str, str, list[str]]], videos: list[np.ndarray] | None = None
):
    """Inputs and labels for option-lookup exercises (`benchmark.exercise`), one chat each: text only,
    or with `videos` (one `(T, H, W, 3)` clip per exercise) asked after a clip the answer does not need."""
    chat = text_chat if videos is None else (lambda question, answer: conversation([question], [answer]))
    texts = [processor.apply_chat_template(chat(question, answer)) for question, answer, _ in exercises]
    inputs = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
    return inputs, answer_labels(inputs["input_ids"], processor.tokenizer)


def answer_labels(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels of a padded batch of conversations: every assistant answer and its `<|im_end|>`, -100 elsewhere."""
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(ids.tolist()):
        for first, last in answer_spans(row, tokenizer):
            labels[b, first : last + 1] = ids[b, first : last + 1]
    return labels


def select_frames(frames: np.ndarray, defaults: dict) -> np.ndarray:
    """The frames `load_video` would return for this model from a decoded 64-frame clip."""
    if defaults["sampling"] == "uniform":
        return frames[uniform_sample_indices(len(frames), defaults["num_frames"])]
    return frames  # 64 frames at 8 fps: every frame


@torch.no_grad()
def probe(checkpoint: Path, clips: int = 8) -> dict:
    """Where a checkpoint's digit reading breaks: multiple-choice accuracy on the open-form questions of
    the first `clips` test clips, given (1) the digit's frame as an image, (2) that frame repeated 64
    times as a video, (3) the real 64-frame clip; and (4) the multiple-choice form's accuracy (the best
    letter) given the frame as an image."""
    model = SlowFastForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = SlowFastProcessor.from_pretrained(checkpoint).tokenizer
    processor = SlowFastProcessor.from_model_config(model.config, tokenizer)
    digit_ids = [tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(10)]
    letter_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    hits = {"image": [], "frame_repeated": [], "clip": [], "image_choice": []}
    for clip in read_clips("test")[:clips]:
        decoded, _ = load_video(DATA / clip[0]["video"], FRAMES, fps=FPS)
        for record in clip:
            frame = decoded[record["detail_frames"][0]]
            for key, visual, given in (
                ("image", "image", {"images": [frame]}),
                ("frame_repeated", "video", {"videos": [np.stack([frame] * FRAMES)]}),
                ("clip", "video", {"videos": [decoded]}),
            ):
                chat = conversation([open_question(record)], visual=visual)
                text = processor.apply_chat_template(chat, add_generation_prompt=True)
                scores = model(**processor(text=[text], return_tensors="pt", **given)).logits[
                    0, -1, digit_ids
                ]
                hits[key].append(chooses_answer(scores, record))
            chat = conversation([choice_question(record)], visual="image")
            text = processor.apply_chat_template(chat, add_generation_prompt=True)
            scores = model(**processor(text=[text], return_tensors="pt", images=[frame])).logits[
                0, -1, letter_ids
            ]
            hits["image_choice"].append(chooses_letter(scores, record))
    result = {key: float(np.mean(value)) for key, value in hits.items()} | {"questions": len(hits["clip"])}
    print(json.dumps(result), flush=True)
    return result


def prefill_flops(model, processor, name: str) -> dict:
    """LLM prefill FLOPs (compute.estimate) of this model on one single-question test prompt."""
    record = read_clips("test")[0][0]
    prompt = processor.apply_chat_template(conversation([open_question(record)]), add_generation_prompt=True)
    prompt_tokens = len(processor.tokenizer(prompt.replace(processor.video_token, ""))["input_ids"])
    frames = MODELS[name][1]["num_frames"]
    design = "self-attention" if name in ("a", "d") else "slowfast"  # (b): the fast tokens, no slow branch
    result = estimate(model.config, frames, prompt_tokens, design)
    return {"llm_prefill_flops": result.llm_prefill_flops, "sequence_length": result.sequence_length}


def parameter_groups(
    model: nn.Module,
    trainable: list[nn.Parameter],
    lr: float,
    kv_lr_scale: float = 1.0,
    whitened_lr_scale: float = 1.0,
) -> list[dict]:
    """The optimizer's groups of `model`'s `trainable` parameters: one, or with `kv_lr_scale` != 1 the hybrid
    layers' key/value projections (`cross_attn_kv_proj`) apart at `lr * kv_lr_scale`, or with
    `whitened_lr_scale` != 1 the `WhitenedLinear` layers' parameters apart at `lr * whitened_lr_scale` (one
    group otherwise, so that the checkpoints of earlier runs still resume)."""
    if kv_lr_scale != 1.0 and whitened_lr_scale != 1.0:
        raise ValueError("kv_lr_scale and whitened_lr_scale both scale the key/value projection: give one")
    if kv_lr_scale != 1.0:
        apart = [p for n, p in model.named_parameters() if ".cross_attn_kv_proj." in n and p.requires_grad]
        scale = kv_lr_scale
    elif whitened_lr_scale != 1.0:
        apart = [p for m in model.modules() if isinstance(m, WhitenedLinear) for p in m.parameters()]
        scale = whitened_lr_scale
    else:
        return [{"params": trainable}]
    others = [p for p in trainable if all(p is not q for q in apart)]
    return [{"params": others}, {"params": apart, "lr": lr * scale}]


# the hybrid layers' query and slow key/value side; every decoder matrix
MUON_MATRICES = ("hybrid", "decoder")


def muon_matrices(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The 2-D weights `which` (`MUON_MATRICES`) names: the hybrid layers' `q_proj` and `cross_attn_kv_proj`,
    or every matrix of the LLM's decoder layers."""
    if which == "hybrid":
        return [
            p
            for block in model.hybrid_attentions
            for p in (block.q_proj.weight, block.cross_attn_kv_proj.weight)
        ]
    return [p for p in model.model.language_model.layers.parameters() if p.ndim == 2]


class AdamWAndMuon(torch.optim.Optimizer):
    """AdamW on some parameters and Muon on some matrices, stepped, scheduled and saved as one optimizer.

    Why Muon: its orthogonalised update moves a matrix as much along the weak directions of its input as along
    the strong ones, where AdamW follows the few directions that carry most of the variance (BENCHMARKS.md,
    issue 20 item 15: the asked colour lives in directions of the hybrid layer's inputs ~1000x weaker than the
    wall contact's)."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.parts = (adamw, muon)  # (Optimizer.__init__ is not called: the parts hold the state)
        self.defaults, self.state = {}, {}

    @property
    def param_groups(self) -> list[dict]:  # the parts' own dicts (a schedule sets their "lr")
        return [group for part in self.parts for group in part.param_groups]

    def step(self, closure=None) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(state)


def build_optimizer(
    model: nn.Module,
    trainable: list[nn.Parameter],
    lr: float,
    kv_lr_scale: float,
    muon: str,
    muon_lr: float,
    whitened_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW on `parameter_groups`, or with `muon` (a key of `MUON_MATRICES`) Muon at `muon_lr` on those 2-D
    weights of the LLM and AdamW on the rest."""
    adamw = dict(lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    if muon and (kv_lr_scale != 1.0 or whitened_lr_scale != 1.0):
        raise ValueError("muon sets its own rate for the matrices it trains: give no kv/whitened lr scale")
    if not muon:
        return torch.optim.AdamW(
            parameter_groups(model, trainable, lr, kv_lr_scale, whitened_lr_scale), **adamw
        )
    matrices = [p for p in muon_matrices(model, muon) if p.requires_grad]
    others = [p for p in trainable if all(p is not q for q in matrices)]
    return AdamWAndMuon(
        torch.optim.AdamW(others, **adamw),
        torch.optim.Muon(matrices, lr=muon_lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
    )


def train(
    name: str,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    out: Path,
    stage1: Path,
    data_seed: int | None = None,
    save_every: int = 50,
    stop_after: int | None = None,
    single_event_steps: int = 0,
    one_per_square_steps: int = 0,
    lookup_rehearsal: int = 0,
    choice_answers: str = "letter",
    rehearse_after_clip: bool = False,
    lookup_preamble: int = 0,
    listed_open: int = 0,
    open_reading_target: bool = False,
    evidence_attention: float = 0.0,
    digit_choice: float = 0.0,
    kv_lr_scale: float = 1.0,
    muon: str = "",
    muon_lr: float = 0.02,
    whiten_hybrid: int = 0,
    whitened_lr_scale: float = 1.0,
) -> dict | None:
    """Stage 2: turn the stage-1 checkpoint into model `name` and train it on the video questions
    (clip order and question forms from `data_seed`, default `seed`); test it, save it in `out`. Given a
    finished stage-2 run as `stage1`, this continues it.

    The first `single_event_steps` of the `steps` are a warm-up on single-event clips: one question per
    clip, every digit of the clip but the asked one erased (`without_digits`), so that the answer is the
    clip's only digit; the model learns to find and read a digit before telling six apart. The next
    `one_per_square_steps` keep one digit per square (`one_per_square`: three questions, told apart by
    the square's colour), then whole clips follow.

    With `lookup_rehearsal`, every step also trains on that many text-only option-lookup exercises
    (`benchmark.exercise`, forward or reverse with probability 1/2 each, drawn from the data RNG), their
    loss added to the video questions': the lookup the multiple-choice form needs, learnt before stage 2
    (`plan --lookup`), otherwise fades while the video loss sits on its plateau. The logged loss is the
    video questions' alone, comparable with runs without it.

    `choice_answers` "reasoned" trains the multiple-choice form answered digit first, "7; A. 3 B. 7 C. 1 D. 0; B"
    (`benchmark.reasoned_choice_answer`), instead of the letter alone; its rehearsed exercises are then
    all digit-first ones (the letter after a given digit); "cued" answers "green, touching: 7; A. 3 ...; B"
    (`benchmark.cued_choice_answer`), its exercises cued alike; "restated" restates the open question
    first (`benchmark.restated_choice_answer`), its exercises alike. With `rehearse_after_clip` each exercise is
    asked after one of the step's clips (in turn), not as text alone: a lookup learnt in text alone is
    not used after a clip (BENCHMARKS.md item 11), so it is rehearsed in the context that needs it.
    With `lookup_preamble` each exercise starts with a `benchmark.preamble` of up to that many filler
    words: a lookup learnt only at the start of a turn is lost once anything comes first (item 11).
    With `listed_open` each open question lists 0 to that many random digits before its instruction
    (`benchmark.listed_open_question`): the digit is read at chance among the options once the
    multiple-choice form's list comes between the question and the answer (item 11). With
    `open_reading_target` the digit a digit-first multiple-choice answer names is trained towards the
    model's own open-form reading of that question among the 4 options (`open_reading`), not the right
    digit, which it otherwise learns to copy from the list. With `evidence_attention` the loss adds that
    weight times `evidence_attention.EvidenceAttention.loss`: the hybrid layer's cross-attention at each
    answer's digit pulled towards the frame that shows it (labels from the generator). With `digit_choice`
    it adds that weight times `EvidenceAttention.digit_choice_loss`: the same attention, over the patches
    of the digits the clip shows alone, pulled to the asked digit's (telling them apart). `kv_lr_scale`
    multiplies the learning rate of the hybrid layer's key/value projection (`cross_attn_kv_proj`). With
    `muon` ("hybrid" or "decoder", `MUON_MATRICES`) those matrices are trained by Muon at `muon_lr`. With
    `whiten_hybrid` the hybrid layers' query and slow key/value projections are trained in whitened
    coordinates of their inputs, measured on that many clips (`whitened_training`), and folded back to save;
    `whitened_lr_scale` multiplies their learning rate.

    `out/checkpoint/` is saved every `save_every` steps, after the last one, after step `stop_after`,
    and at the end of the step in which SIGTERM or SIGINT arrived; the last two then return None. The
    same call again resumes from it exactly (weights, optimizer, schedule, both RNGs, loss log, time).
    A run whose `out/result.json` exists is finished: it is skipped.
    """
    if (out / "result.json").exists():
        print(f"{out} is finished ({out / 'result.json'} exists): skipped", flush=True)
        return json.loads((out / "result.json").read_text())
    torch.set_num_threads(1)
    knobs, defaults = MODELS[name]
    clips = read_clips("train")
    all_frames = np.load(DATA / "train_frames.npy", mmap_mode="r")
    model = SlowFastForConditionalGeneration.from_pretrained(stage1, dtype=torch.float32)
    # hybrid layers the checkpoint already has stay (`add_hybrid_layer.py` gives a run a second one)
    knobs = knobs | {"hybrid_layers": sorted({*knobs["hybrid_layers"], *model.config.hybrid_layer_indices})}
    for knob, value in knobs.items():
        setattr(model.config, knob, value)
    add_hybrid_layers(model.model.language_model, model.config)  # (c): cross K/V from the layer's k/v_proj
    tokenizer = SlowFastProcessor.from_pretrained(stage1).tokenizer
    processor = SlowFastProcessor.from_model_config(model.config, tokenizer, video_defaults=defaults)
    processor.prepare_model(model)
    model.model.vision_tower.requires_grad_(False)
    if whiten_hybrid < 0:
        raise ValueError(f"whiten_hybrid must be a number of clips >= 0, got {whiten_hybrid}")
    if whiten_hybrid:
        whiten_hybrid_projections(model, processor, whiten_hybrid)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if muon and muon not in MUON_MATRICES:
        raise ValueError(f"muon must be one of {', '.join(MUON_MATRICES)}, got {muon!r}")
    if whitened_lr_scale != 1.0 and not whiten_hybrid:
        raise ValueError("whitened_lr_scale scales the whitened projections: it needs whiten_hybrid")
    optimizer = build_optimizer(model, trainable, lr, kv_lr_scale, muon, muon_lr, whitened_lr_scale)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    data_seed = seed if data_seed is None else data_seed
    data_rng = np.random.default_rng(data_seed)  # the same clips, orders and forms for every model of a seed
    warm_up = single_event_steps + one_per_square_steps
    if min(single_event_steps, one_per_square_steps) < 0 or warm_up >= steps:
        raise ValueError(
            f"single_event_steps + one_per_square_steps must be in [0, steps = {steps}), got "
            f"{single_event_steps} + {one_per_square_steps}"
        )
    if (rehearse_after_clip or lookup_preamble) and lookup_rehearsal < 1:
        raise ValueError("rehearse_after_clip and lookup_preamble need lookup_rehearsal >= 1 exercises")
    if lookup_preamble < 0:
        raise ValueError(f"lookup_preamble must be >= 0 filler words, got {lookup_preamble}")
    if choice_answers in OPENED_ANSWERS and lookup_rehearsal and not lookup_preamble:
        raise ValueError(
            f"choice_answers {choice_answers!r} rehearses its opening: it needs lookup_preamble >= 1"
        )
    if not 0 <= listed_open <= len(LETTERS):
        raise ValueError(f"listed_open must be in [0, {len(LETTERS)}] listed digits, got {listed_open}")
    if open_reading_target and choice_answers not in DIGIT_FIRST_ANSWERS:
        raise ValueError(
            f"open_reading_target trains the digit of a digit-first answer ({', '.join(DIGIT_FIRST_ANSWERS)}), "
            f"not of choice_answers {choice_answers!r}"
        )
    settings = {"model": name, "seed": seed, "steps": steps, "batch_clips": batch, "lr": lr}
    settings |= {"stage1": str(stage1), "data_seed": data_seed, "single_event_steps": single_event_steps}
    # (absent when 0: the checkpoints of runs from before them still resume)
    if one_per_square_steps:
        settings["one_per_square_steps"] = one_per_square_steps
    if lookup_rehearsal:
        settings["lookup_rehearsal"] = lookup_rehearsal
    if choice_answers != "letter":
        settings["choice_answers"] = choice_answers
    if rehearse_after_clip:
        settings["rehearse_after_clip"] = True
    if lookup_preamble:
        settings["lookup_preamble"] = lookup_preamble
    if listed_open:
        settings["listed_open"] = listed_open
    if open_reading_target:
        settings["open_reading_target"] = True
    if kv_lr_scale <= 0:
        raise ValueError(f"kv_lr_scale must be > 0, got {kv_lr_scale}")
    if kv_lr_scale != 1.0:
        settings["kv_lr_scale"] = kv_lr_scale
    if evidence_attention < 0:
        raise ValueError(f"evidence_attention must be a weight >= 0, got {evidence_attention}")
    if digit_choice < 0:
        raise ValueError(f"digit_choice must be a weight >= 0, got {digit_choice}")
    evidence = None
    if evidence_attention or digit_choice:
        evidence = EvidenceAttention(model.hybrid_attentions[0])
        grid, patch_side = model.model.visual_grid(FRAMES), model.config.vision_config.patch_size
    if evidence_attention:
        settings["evidence_attention"] = evidence_attention
    if digit_choice:
        settings["digit_choice"] = digit_choice
    if muon:
        settings |= {"muon": muon, "muon_lr": muon_lr}
    if whiten_hybrid:
        settings["whiten_hybrid"] = whiten_hybrid
    if whitened_lr_scale != 1.0:
        settings["whitened_lr_scale"] = whitened_lr_scale

    def one_step(step: int) -> float:
        picked = data_rng.choice(len(clips), batch, replace=False)
        if step < warm_up:  # (1 question and its digit per clip, then 3: one per square)
            if step < single_event_steps:
                conversations = [[clips[i][data_rng.integers(len(clips[i]))]] for i in picked]
            else:
                conversations = [one_per_square(clips[i], data_rng) for i in picked]
            frames = [
                without_digits(np.asarray(all_frames[i]), clips[i], keep=kept)
                for i, kept in zip(picked, conversations)
            ]
        else:
            frames = [np.asarray(all_frames[i]) for i in picked]
            conversations = [clips[i] for i in picked]
        videos = [select_frames(clip_frames, defaults) for clip_frames in frames]
        inputs, labels, twin = training_batch(
            processor, conversations, videos, data_rng, choice_answers, listed_open, open_reading_target
        )
        if twin is not None:
            with torch.no_grad():
                twin_logits = model(**twin).logits  # (B, L', V): the open form's reading, as the target
            video_loss = open_reading_loss(
                model(**inputs).logits, labels, inputs["input_ids"], twin_logits, twin["input_ids"], tokenizer
            )
        else:
            video_loss = model(**inputs, labels=labels).loss
        loss = video_loss
        if evidence_attention:
            targets = evidence_targets(inputs["input_ids"], [clips[i] for i in picked], tokenizer)
            loss = loss + evidence_attention * evidence.loss(targets, math.prod(grid))
        if digit_choice:  # (the candidates: the digits the step's frames show)
            targets = digit_choice_targets(inputs["input_ids"], conversations, tokenizer, grid, patch_side)
            loss = loss + digit_choice * evidence.digit_choice_loss(targets)
        if lookup_rehearsal:
            directions = (
                ["digit-first"] * lookup_rehearsal  # the lookup digit-first answers need
                if choice_answers in DIGIT_FIRST_ANSWERS
                else ["forward" if data_rng.random() < 0.5 else "reverse" for _ in range(lookup_rehearsal)]
            )
            clips_in_front = (
                [videos[i % batch] for i in range(lookup_rehearsal)] if rehearse_after_clip else None
            )
            exercises = [
                exercise(d, data_rng, preamble_words=lookup_preamble, answers=choice_answers)
                for d in directions
            ]
            lookup_inputs, lookup_labels = lookup_batch(processor, exercises, clips_in_front)
            loss = loss + model(**lookup_inputs, labels=lookup_labels).loss
        clipped_step(loss, trainable, optimizer, schedule)
        return video_loss.item()

    outcome = resumable_steps(
        out, settings, model, optimizer, schedule, data_rng, steps, one_step, f"{name} s{seed}",
        save_every=save_every, stop_after=stop_after,
    )  # fmt: skip
    if outcome is None:
        return None
    log, seconds = outcome
    model.eval()
    fold_whitened(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "loss_log.json").write_text(json.dumps(log) + "\n")
    result = settings | {
        "train_seconds": round(seconds),
        "final_loss": float(np.mean(log[-10:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        **prefill_flops(model, processor, name),
        **test_accuracy(model, processor, DATA, read_clips("test"), choice_answers),
    }
    return finished(out, result)


# ----- the results table and the verdict against the bar -----
ACCURACIES = {"open form": "accuracy", "multiple choice": "choice_accuracy"}


def stage2_chain(result: dict) -> list[dict]:
    """The stage-2 results behind a run, first to last: the runs it continued (`--stage1 RUN_DIR`), then it."""
    started_from = Path(result["stage1"]) / "result.json"
    prior = json.loads(started_from.read_text()) if started_from.exists() else {}
    return (stage2_chain(prior) if "model" in prior else []) + [result]


def recipe(result: dict) -> str:
    """A run's stage-2 budget over its chain, "2000 steps" or "2000 steps (500 single-event)": what the
    table groups seeds by and the verdict compares models at."""
    chain = stage2_chain(result)
    steps = sum(run["steps"] for run in chain)
    details = [
        f"{total} {label}"
        for key, label in (("single_event_steps", "single-event"), ("one_per_square_steps", "one per square"))
        if (total := sum(run.get(key, 0) for run in chain))
    ]
    steps_that = (  # (label, whether a run's steps count for it)
        ("with lookup rehearsal", lambda run: run.get("lookup_rehearsal")),
        ("of them after a clip", lambda run: run.get("rehearse_after_clip")),
        ("of them after a preamble", lambda run: run.get("lookup_preamble")),
        ("digit-first", lambda run: run.get("choice_answers") in DIGIT_FIRST_ANSWERS),
        ("with digits listed in open questions", lambda run: run.get("listed_open")),
    )
    for label, counts in steps_that:
        if total := sum(run["steps"] for run in chain if counts(run)):
            details.append(f"{total} {label}")
    return f"{steps} steps" + (f" ({', '.join(details)})" if details else "")


def spread(values: list[float]) -> str:
    """Per-seed percentages as "mean% ± half range, sd S (v1, v2, ...)" (sd: sample standard deviation)."""
    if len(values) == 1:
        return f"{values[0]:.1f}%"
    half, sd = (max(values) - min(values)) / 2, np.std(values, ddof=1)
    return f"{np.mean(values):.1f}% ± {half:.1f}, sd {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def cell(runs: list[dict], key: str) -> str:
    values = [100 * r[key] for r in runs if key in r]
    return spread(values) if values else "-"


def verdict(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Per stage-2 budget with runs of (a), (b) and (c): is the bar met? (c) beats (a) and (b) by more than
    the spread across seeds (its worst seed above their best, in the multiple-choice and in the open form,
    at least 2 seeds each) at no more than 1.1x the LLM prefill FLOPs of (a)."""
    lines = []
    for budget in sorted({budget for _, budget in groups}):
        runs = {model: groups.get((model, budget), []) for model in "abc"}
        if not all(runs.values()):
            continue
        findings, met = [], min(len(r) for r in runs.values()) >= 2
        for form, key in ACCURACIES.items():
            ours = [100 * r.get(key, np.nan) for r in runs["c"]]
            theirs = [100 * r.get(key, np.nan) for model in "ab" for r in runs[model]]
            beats = min(ours) > max(theirs)  # False when a run did not measure this form (nan)
            met &= beats
            findings.append(
                f"{form}: worst (c) {min(ours):.1f}% {'>' if beats else 'not >'} best (a)/(b) {max(theirs):.1f}%"
            )
        ratio = runs["c"][0]["llm_prefill_flops"] / runs["a"][0]["llm_prefill_flops"]
        met &= ratio <= 1.1
        findings.append(f"prefill FLOPs {ratio:.3f}x (a) ({'<=' if ratio <= 1.1 else '>'} 1.1x)")
        seeds = ", ".join(f"({m}) {len(r)}" for m, r in runs.items())
        lines.append(f"{budget}, seeds {seeds}: bar {'MET' if met else 'NOT MET'}: " + "; ".join(findings))
    return lines


def summarize(runs_dir: Path = RUNS) -> str:
    """A Markdown table of every finished run under `runs_dir` (per model and stage-2 budget: accuracy in
    both forms and attention peaks, mean ± half range and sd over seeds; FLOPs), then the `verdict` lines."""
    groups: dict[tuple[str, str], list[dict]] = {}  # (model, `recipe`) -> its runs, one per seed
    for path in sorted(runs_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        groups.setdefault((result["model"], recipe(result)), []).append(result)
    rows = [
        "| model | seeds | open form | multiple choice | open: touching / not touching "
        "| attention peak on the digit's frame: every token / question tokens | LLM prefill FLOPs | vs (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next((runs[0]["llm_prefill_flops"] for (model, _), runs in groups.items() if model == "a"), None)
    for (model, budget), runs in sorted(groups.items()):
        touch = np.mean([100 * r["digit_touching_wall"] for r in runs])
        away = np.mean([100 * r["digit_away_from_wall"] for r in runs])
        peaks = f"{cell(runs, 'attention_peak_on_detail_frame')} / {cell(runs, 'question_attention_peak_on_detail_frame')}"
        flops = runs[0]["llm_prefill_flops"]
        rows.append(
            f"| ({model}) {budget} | {', '.join(str(r['seed']) for r in runs)} | {cell(runs, 'accuracy')} "
            f"| {cell(runs, 'choice_accuracy')} | {touch:.1f}% / {away:.1f}% | {peaks} "
            f"| {flops / 1e6:.0f} M | {f'{flops / base:.3f}x' if base else ''} |"
        )
    return "\n".join(rows + [""] + [f"Verdict at {line}" for line in verdict(groups)])


def answers_of(run_dir: Path) -> str:
    """How a stage-2 run answered the multiple-choice form (`CHOICE_ANSWERS`; "letter" when it has no
    `result.json`, as the shipped demo model has not)."""
    result = run_dir / "result.json"
    return json.loads(result.read_text()).get("choice_answers", "letter") if result.exists() else "letter"


def ship(run_dir: Path, seed: int = 7, clips: int = 20) -> None:
    """Save a trained model in bfloat16 as the package's demo model, with the first test question it
    answers correctly in both forms through `slowfast-vlm ask`'s code path while the map `ask
    --attention-map` draws peaks on the asked-about digit's frame (`scoring.demo_question`), and its `score` on
    `clips` clips of seed `seed` (both forms, and its answers about clips without a digit) next to the clip."""
    from slowfast_vlm.default_model import DEMO_CLIP, DEMO_MODEL_DIR
    from slowfast_vlm.inference import load_model

    with tempfile.TemporaryDirectory() as tmp:
        SlowFastForConditionalGeneration.from_pretrained(run_dir, dtype=torch.bfloat16).save_pretrained(tmp)
        SlowFastProcessor.from_pretrained(run_dir).save_pretrained(tmp)
        model, processor = load_model(tmp, "cpu", "float32")  # as `ask` loads it
        choice_answers = answers_of(run_dir)
        record = demo_question(model, processor, DATA, read_clips("test"), choice_answers)
        if record is None:
            raise RuntimeError(f"{run_dir} answers no test question in both forms while looking at its digit")
        shutil.copytree(tmp, DEMO_MODEL_DIR, dirs_exist_ok=True)
    shutil.copyfile(DATA / record["video"], DEMO_CLIP)
    DEMO_CLIP.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    findings = score(DEMO_MODEL_DIR, seed, clips, choice_answers)
    DEMO_CLIP.with_suffix(".findings.json").write_text(json.dumps(findings, indent=2) + "\n")
    print(f"shipped {run_dir} with {record['id']}: {open_question(record)!r} -> {record['answer_text']}")
    print(json.dumps(findings), flush=True)


def add_curriculum_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage-2 warm-up options of `train` (and of `plan`, which passes them on to every run)."""
    parser.add_argument(
        "--single-event-steps", type=int, default=0, help="of --steps, the first ones on single-event clips"
    )
    parser.add_argument(
        "--one-per-square-steps", type=int, default=0, help="then these on clips with one digit per square"
    )


def curriculum_options(args: argparse.Namespace) -> list[str]:
    """`add_curriculum_arguments`' options as given, for a `train` command line (none when all are 0)."""
    given = {
        "--single-event-steps": args.single_event_steps,
        "--one-per-square-steps": args.one_per_square_steps,
    }
    return [text for option, steps in given.items() if steps for text in (option, str(steps))]


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per stage of the experiment, and `plan` for all of them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="write and decode the data")
    vision = commands.add_parser("pretrain-vision", help="pre-train the frame encoder shared by every model")
    vision.add_argument("--steps", type=int, default=3000)
    vision.add_argument("--batch", type=int, default=128, help="frames per step")
    vision.add_argument("--lr", type=float, default=2e-3)
    vision.add_argument("--out", type=Path, default=VISION)
    stage1 = commands.add_parser(
        "pretrain-llm", help="stage 1: image QA on single frames, shared by every model"
    )
    stage1.add_argument(
        "--kind",
        choices=sorted(STAGE1_KNOBS),
        default="plain",
        help="plain: for a, b, d; slow: for c; slow-early: for c-early",
    )
    stage1.add_argument("--steps", type=int, default=1200)
    stage1.add_argument("--batch", type=int, default=30, help="images per step (6 per rendered clip)")
    stage1.add_argument("--lr", type=float, default=2e-3)
    stage1.add_argument("--vision", type=Path, default=VISION)
    stage1.add_argument("--seed", type=int, default=0)
    stage1.add_argument("--out", type=Path, help=f"default: {STAGE1}-<kind>-s<seed>")
    stage1.add_argument("--stop-after-steps", type=int, help="save the checkpoint after this step and exit")
    stage1.add_argument(
        "--both-forms", action="store_true", help="ask the digit question in the open or multiple-choice form"
    )
    stage1.add_argument("--init", type=Path, help="start the LLM from a text-only run of lookup.py")
    summarize_parser = commands.add_parser("summarize", help="print the results table of the finished runs")
    summarize_parser.add_argument("runs_dir", type=Path, nargs="?", default=RUNS)
    probe_parser = commands.add_parser(
        "probe", help="digit reading of a checkpoint: image, repeated frame, clip"
    )
    probe_parser.add_argument("checkpoint", type=Path)
    score_parser = commands.add_parser(
        "score", help="both forms' accuracy on clips of a fresh seed, and answers about clips without a digit"
    )
    score_parser.add_argument("checkpoint", type=Path)
    score_parser.add_argument("--seed", type=int, default=7, help="the clips' seed (not 0: the experiment's)")
    score_parser.add_argument("--clips", type=int, default=20)
    ship_parser = commands.add_parser("ship", help="make a trained run the package's demo model")
    ship_parser.add_argument("run_dir", type=Path, nargs="?", default=RUNS / "c-s0")
    ship_parser.add_argument("--seed", type=int, default=7, help="seed of the fresh clips it is scored on")
    ship_parser.add_argument("--clips", type=int, default=20)
    run = commands.add_parser("train", help="train one model and test it (resumes its checkpoint)")
    run.add_argument("--model", choices=sorted(MODELS), required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=1500)
    run.add_argument("--batch", type=int, default=8, help="clips per step (6 questions each)")
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--stage1", type=Path, help=f"the stage-1 checkpoint (default: {STAGE1}-<kind>-s<seed>)")
    run.add_argument(
        "--data-seed", type=int, help="seed of the clip order and question forms (default: --seed)"
    )
    run.add_argument("--out", type=Path, help=f"default: {RUNS}/<model>-s<seed>")
    run.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    run.add_argument("--stop-after-steps", type=int, help="save the checkpoint after this step and exit")
    run.add_argument(
        "--lookup-rehearsal",
        type=int,
        default=0,
        help="text-only option-lookup exercises added to every step",
    )
    run.add_argument(
        "--choice-answers",
        choices=sorted(CHOICE_ANSWERS),
        default="letter",
        help='train the multiple-choice form answered with the letter, digit first ("7; A. 3 B. 7 C. 1 D. 0; B"), '
        'digit first after the question\'s cue ("green, touching: 7; ...; B"), or digit first after the open '
        'question restated ("The green square ...?\\nAnswer with the digit.\\n7; ...; B")',
    )
    run.add_argument(
        "--rehearse-after-clip",
        action="store_true",
        help="ask each rehearsed exercise after one of the step's clips, not as text alone",
    )
    run.add_argument(
        "--lookup-preamble",
        type=int,
        default=0,
        metavar="WORDS",
        help="start each rehearsed exercise with up to this many filler words and a benchmark question",
    )
    run.add_argument(
        "--listed-open",
        type=int,
        default=0,
        metavar="DIGITS",
        help="list 0 to this many (at most 4) random digits between each open question and its instruction",
    )
    run.add_argument(
        "--open-reading-target",
        action="store_true",
        help="train the digit a digit-first multiple-choice answer names towards the model's own open-form "
        "reading of the question among the 4 options, not the right digit",
    )
    run.add_argument(
        "--evidence-attention",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="add this weight times the loss pulling the cross-attention at each answer's digit towards the "
        "frame that shows it (labels from the generator)",
    )
    run.add_argument(
        "--muon",
        choices=sorted(MUON_MATRICES),
        default="",
        help="train these matrices of the LLM with Muon: the hybrid layers' query and slow key/value "
        "projections, or every decoder-layer matrix (AdamW for the rest)",
    )
    run.add_argument("--muon-lr", type=float, default=0.02, help="Muon's learning rate (AdamW-matched RMS)")
    run.add_argument(
        "--whiten-hybrid",
        type=int,
        default=0,
        metavar="CLIPS",
        help="train the hybrid layers' query and slow key/value projections in whitened coordinates of their "
        "inputs, measured on this many clips of a seed of their own",
    )
    run.add_argument(
        "--whitened-lr-scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply the learning rate of the whitened projections by this",
    )
    run.add_argument(
        "--digit-choice",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="add this weight times the loss making the cross-attention at each answer's digit, over the "
        "patches of the digits the clip shows alone, pick the asked one's (labels from the generator)",
    )
    run.add_argument(
        "--kv-lr-scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply the learning rate of the hybrid layer's key/value projection by this",
    )
    add_curriculum_arguments(run)
    plan = commands.add_parser("plan", help="run every unfinished stage for these seeds and models, resuming")
    plan.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    plan.add_argument("--models", choices=sorted(MODELS), nargs="+", default=["a", "b", "c"])
    plan.add_argument("--steps", type=int, default=1500, help="stage-2 steps of each run")
    add_curriculum_arguments(plan)
    plan.add_argument(
        "--continue-steps", type=int, default=0, help="then continue each run this many steps into <run>-more"
    )
    plan.add_argument(
        "--lookup",
        type=int,
        nargs=2,
        metavar=("FORWARD", "REVERSE"),
        help="start every LLM from the text-only option lookup (lookup.py: these steps forward, then "
        "reverse), stage 1 in both forms; into stage1-<kind>-lookup-s<seed> and runs-lookup/",
    )
    plan.add_argument("--parallel", type=int, default=1, help="most processes at a time (one thread each)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "save_every", "stop_after_steps", "clips", "parallel"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.command in ("score", "ship") and args.seed == 0:
        parser.error("--seed must not be 0: seed 0 made the experiment's own train and test clips")
    if args.command == "prepare":
        prepare()
    elif args.command == "pretrain-vision":
        pretrain_vision(args.steps, args.batch, args.lr, args.out)
    elif args.command == "pretrain-llm":
        pretrain_llm(
            args.steps,
            args.batch,
            args.lr,
            args.out or stage1_dir(args.kind, args.seed),
            args.kind,
            args.vision,
            args.seed,
            args.stop_after_steps,
            args.both_forms,
            args.init,
        )
    elif args.command == "summarize":
        print(summarize(args.runs_dir))
    elif args.command == "probe":
        probe(args.checkpoint)
    elif args.command == "score":
        report = score(args.checkpoint, args.seed, args.clips, answers_of(args.checkpoint))
        (args.checkpoint / f"score-seed{args.seed}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report), flush=True)
    elif args.command == "ship":
        ship(args.run_dir, args.seed, args.clips)
    elif args.command == "plan":
        lookup, first_stage, runs = None, stage1_dir, RUNS
        if args.lookup:
            lookup = Lookup(*args.lookup, LOOKUP_RUNS)
            first_stage, runs = lookup_stage1_dir, LOOKUP_RECIPE_RUNS
        return run_plan(
            stages(
                args.seeds,
                args.models,
                args.steps,
                DATA,
                VISION,
                runs,
                stage1_kind,
                first_stage,
                curriculum_options(args),
                args.continue_steps,
                lookup,
            ),  # fmt: skip
            args.parallel,
        )
    else:
        out = args.out or RUNS / f"{args.model}-s{args.seed}"
        stage1 = args.stage1 or stage1_dir(stage1_kind(args.model), args.seed)
        try:
            train(
                args.model, args.seed, args.steps, args.batch, args.lr, out, stage1,
                data_seed=args.data_seed,
                save_every=args.save_every,
                stop_after=args.stop_after_steps,
                single_event_steps=args.single_event_steps,
                one_per_square_steps=args.one_per_square_steps,
                lookup_rehearsal=args.lookup_rehearsal,
                choice_answers=args.choice_answers,
                rehearse_after_clip=args.rehearse_after_clip,
                lookup_preamble=args.lookup_preamble,
                listed_open=args.listed_open,
                open_reading_target=args.open_reading_target,
                evidence_attention=args.evidence_attention,
                digit_choice=args.digit_choice,
                muon=args.muon,
                muon_lr=args.muon_lr,
                whiten_hybrid=args.whiten_hybrid,
                whitened_lr_scale=args.whitened_lr_scale,
                kv_lr_scale=args.kv_lr_scale,
            )  # fmt: skip
        except ValueError as error:
            print(f"run.py train: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
