"""Can the scratch LLM look an answer up in an option list? A text-only exercise, no pixels.

The multiple-choice form asks for the letter of the option that holds the digit ("Options:\\nA. 3\\nB. 7
..."): on top of reading the digit, the model must find it in the list and name the letter 3 tokens
before it. No video model of the experiment learnt that (each names one letter). This trains a fresh
scratch LLM (the experiment's tokenizer and config, `run.STAGE1_KNOBS["plain"]`) on that step alone,
with the digit given in the text, in one of three directions:

    reverse      "Which option is the digit 7?\\nOptions: ...\\nAnswer with the option's letter." -> "B"
    forward      "Options: ...\\nWhich digit is option B?" -> "7"  (the induction pattern: letter -> next item)
    digit-first  "Options: ...\\nAnswer with an option's digit, then its letter." -> "7; A. 3 B. 7 ...; B" (a random
                 option: the letter after the digit is what the digit-first multiple-choice answer needs)

and reports its accuracy on held-out lists lettered A-D as in the benchmark (of the 4 letters, resp.
the 4 option digits, the best logit at the answer position, for digit-first the best letter after the
given "7; A. 3 B. 7 ...; "; chance 25%). With `--any-letters` the
training lists are lettered by 4 random capitals instead (see `exercise`). Resumable like every stage (`checkpoints.resumable_steps`).

    python experiments/synth/lookup.py --direction reverse --steps 2000 --lr 5e-4
    python experiments/synth/lookup.py --score outputs/synth/runs/c-s0   # does a later model still know it?
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from benchmark import DIGIT_FIRST_ANSWERS, OPENED_ANSWERS, exercise, text_chat
from checkpoints import resumable_steps
from run import STAGE1_KNOBS, clipped_step, finished, lookup_batch, scratch_texts
from scoring import token_ids

from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration
from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.synth import LETTERS
from slowfast_vlm.training.scratch import build_scratch_model

# a run directory defaults to <this>-<direction>-lr<lr>-s<seed>...; `run.py plan --lookup` names its own
RUN_PREFIX = "outputs/synth/lookup"
HELD_OUT_SEED = 1_000_003  # the test lists: a seed no training run draws from


@torch.no_grad()
def accuracy(
    model,
    processor,
    direction: str,
    count: int = 400,
    any_letters: bool = False,
    preamble_words: int = 0,
    answers: str = "reasoned",
) -> float:
    """Share of `count` held-out exercises whose answer has the best logit among its 4 candidates: at the
    answer position, or after the candidates' shared start (digit-first: "7; A. 3 ...; ", then the letters)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    model.eval()
    hits = []
    for start in range(0, count, 50):
        items = [
            exercise(direction, rng, any_letters, preamble_words, answers)
            for _ in range(min(50, count - start))
        ]
        shared = [os.path.commonprefix(candidates) for _, _, candidates in items]
        texts = [
            processor.apply_chat_template(text_chat(question), add_generation_prompt=True) + given
            for (question, _, _), given in zip(items, shared)
        ]
        inputs = processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        logits = model(**inputs).logits[torch.arange(len(items)), inputs["attention_mask"].sum(1) - 1]
        for row, (_, answer, candidates), given in zip(logits, items, shared):
            differing = [candidate[len(given)] for candidate in candidates]
            best = candidates[int(row[token_ids(processor.tokenizer, differing)].argmax())]
            hits.append(best == answer)
    model.train()
    return float(np.mean(hits))


def train_lookup(
    direction: str,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    out: Path,
    init: Path | None = None,
    any_letters: bool = False,
    eval_every: int = 500,
    stop_after: int | None = None,
    preamble_words: int = 0,
    answers: str = "reasoned",
) -> dict | None:
    """Train a fresh scratch LLM (or, given `init`, the model of an earlier run) on the exercise; its
    held-out accuracy every `eval_every` steps and at the end. None when stopped (`stop_after`, a signal)
    with its checkpoint saved; the same call resumes it. With `preamble_words` every exercise, held-out
    ones included, starts with a `benchmark.preamble` of up to that many filler words; a digit-first one
    is then answered in the digit-first form `answers` (its `benchmark.answer_opening` first)."""
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    torch.set_num_threads(1)
    if init is None:
        model, processor = build_scratch_model(scratch_texts(), seed=seed, **STAGE1_KNOBS["plain"])
    else:
        model = SlowFastForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        processor = SlowFastProcessor.from_pretrained(init)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    settings = {"direction": direction, "steps": steps, "batch": batch, "lr": lr, "seed": seed}
    if init is not None:
        settings["init"] = str(init)
    if any_letters:
        settings["any_letters"] = True
    if preamble_words:
        settings["preamble_words"] = preamble_words
    if answers != "reasoned":
        settings["answers"] = answers
    # kept beside the checkpoint, so that a resumed run keeps the points taken before it stopped
    curve_file = out / "accuracy_curve.json"
    curve = {int(k): v for k, v in json.loads(curve_file.read_text()).items()} if curve_file.exists() else {}

    def one_step(step: int) -> float:
        inputs, labels = lookup_batch(
            processor, [exercise(direction, rng, any_letters, preamble_words, answers) for _ in range(batch)]
        )
        loss_value = clipped_step(model(**inputs, labels=labels).loss, trainable, optimizer, schedule)
        if (step + 1) % eval_every == 0:  # on the benchmark's letters A-D
            curve[step + 1] = accuracy(
                model, processor, direction, preamble_words=preamble_words, answers=answers
            )
            print(f"lookup {direction} step {step + 1}: held-out accuracy {curve[step + 1]:.3f}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            curve_file.write_text(json.dumps(curve))
        return loss_value

    outcome = resumable_steps(
        out,
        settings,
        model,
        optimizer,
        schedule,
        rng,
        steps,
        one_step,
        f"lookup {direction}",
        print_every=50,
        stop_after=stop_after,
    )
    if outcome is None:
        return None
    log, seconds = outcome
    model.save_pretrained(out)  # a starting point for stage 1 (`run.py pretrain-llm --init`)
    processor.save_pretrained(out)
    result = settings | {
        "final_loss": float(np.mean(log[-50:])),
        "chance_loss": chance_loss(processor, direction, preamble_words, answers),
        "held_out_accuracy": accuracy(  # A-D
            model, processor, direction, preamble_words=preamble_words, answers=answers
        ),
        **(
            {"held_out_accuracy_no_preamble": accuracy(model, processor, direction)} if preamble_words else {}
        ),
        "accuracy_curve": curve,  # {step: held-out accuracy}, every `eval_every` steps
        **(
            {"held_out_accuracy_any_letters": accuracy(model, processor, direction, any_letters=True)}
            if any_letters
            else {}
        ),
        "seconds": round(seconds),
    }
    return finished(out, result)


def chance_loss(processor, direction: str, preamble_words: int = 0, answers: str = "reasoned") -> float:
    """Loss per labelled token of a model that knows the format but guesses among 4 wherever the answer
    is open (the letter or digit; for digit-first the digit and the letter), the rest of the answer (a
    restated question is copied from the preamble) and its `<|im_end|>` free: over 200 exercises, as a
    batch's loss averages over its tokens (an answer's opening varies in length with its question)."""
    rng = np.random.default_rng(0)
    answers_drawn = [exercise(direction, rng, False, preamble_words, answers)[1] for _ in range(200)]
    # each answer's tokens and its <|im_end|>
    labelled = sum(len(processor.tokenizer(answer)["input_ids"]) + 1 for answer in answers_drawn)
    guesses = 2 if direction == "digit-first" else 1
    return float(guesses * np.log(len(LETTERS)) * len(answers_drawn) / labelled)


def score(checkpoints: list[Path]) -> dict[str, dict[str, float]]:
    """Held-out accuracy of each saved model (a lookup run, a stage-1 or a stage-2 run) on the text-only
    lookup in each direction: whether an LLM still knows the lookup after later stages."""
    torch.set_num_threads(1)
    scores = {}
    for checkpoint in checkpoints:
        model = SlowFastForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        processor = SlowFastProcessor.from_pretrained(checkpoint)
        scores[str(checkpoint)] = {
            d: accuracy(model, processor, d) for d in ("reverse", "forward", "digit-first")
        }
        print(json.dumps({str(checkpoint): scores[str(checkpoint)]}), flush=True)
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", choices=("reverse", "forward", "digit-first"), default="reverse")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="exercises per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init", type=Path, help="continue the model of an earlier run (e.g. the other direction)"
    )
    parser.add_argument(
        "--any-letters", action="store_true", help="letter each list with 4 random capitals, not A-D"
    )
    parser.add_argument("--eval-every", type=int, default=500, help="steps between held-out accuracies")
    parser.add_argument(
        "--preamble-words",
        type=int,
        default=0,
        help="start every exercise with up to this many filler words and a benchmark question",
    )
    parser.add_argument(
        "--answers",
        choices=DIGIT_FIRST_ANSWERS,
        default="reasoned",
        help="digit-first with --preamble-words: answer after the question's cue, or after the open question "
        "restated (see run.py train --choice-answers)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"default: {RUN_PREFIX}-<direction>-lr<lr>-s<seed>[-any-letters][-from-<init>]",
    )
    parser.add_argument(
        "--score", type=Path, nargs="+", metavar="CHECKPOINT", help="train nothing: score saved models"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.eval_every) < 1 or args.lr <= 0 or args.preamble_words < 0:
        parser.error("--steps, --batch and --eval-every must be >= 1, --lr > 0 and --preamble-words >= 0")
    if args.answers in OPENED_ANSWERS and (args.direction != "digit-first" or not args.preamble_words):
        parser.error(f"--answers {args.answers} needs --direction digit-first and --preamble-words >= 1")
    if args.score:
        training = [
            f"--{k.replace('_', '-')}"
            for k, v in vars(args).items()
            if k != "score" and v != parser.get_default(k)
        ]
        if training:
            parser.error(f"--score trains nothing: {', '.join(training)} would be ignored")
        missing = [str(c) for c in args.score if not (c / "config.json").exists()]
        if missing:
            parser.error(f"--score: no saved model (config.json) in {', '.join(missing)}")
        score(args.score)
        return 0
    out = args.out or Path(
        f"{RUN_PREFIX}-{args.direction}-lr{args.lr:g}-s{args.seed}"
        + ("-any-letters" if args.any_letters else "")
        + (f"-from-{args.init.name}" if args.init else "")
    )
    train_lookup(
        args.direction, args.steps, args.batch, args.lr, args.seed, out,
        init=args.init,
        any_letters=args.any_letters,
        eval_every=args.eval_every,
        preamble_words=args.preamble_words,
        answers=args.answers,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
