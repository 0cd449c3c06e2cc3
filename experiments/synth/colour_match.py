"""Is the asked digit's patch bindable from what the hybrid layer reads? A bilinear match `h^T W s` between the
answer position's hidden state entering the hybrid attention (`h`, after its input norm) and the normed slow
token at each of the clip's 6 digit patches (`s`), softmax over the 6, fit on two thirds of the questions and
scored on the rest (chance 1/6; the wall contact alone gives 1/3). Fit on the features as they are, and after
whitening either side: if only the whitened fit binds, the colour is there but in directions too weak for
gradient descent on the projections to find.

    python experiments/synth/colour_match.py CHECKPOINT [--seed 8] [--clips 300]

BENCHMARKS.md, issue 20, item 15.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchmark import FPS, FRAMES, SIZE, conversation
from evidence_attention import EvidenceAttention, digit_patch
from scoring import round_trip

from slowfast_vlm.inference import load_model
from slowfast_vlm.synth import generate_clip, open_question


@torch.no_grad()
def match_features(model, processor, seed: int, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(h, s)` over the open questions of `clips` clips of a fresh seed: `h` `(Q, D)` the answer position's
    input to the hybrid attention, `s` `(Q, 6, D)` its clip's 6 digit-patch slow tokens after the layer's
    slow norm, in record order (question `q` of a clip asks about its digit `q`)."""
    was_training = model.training
    model.eval()
    hybrid = EvidenceAttention(model.hybrid_attentions[0])  # (its hook keeps the block's inputs)
    (height, width), patch_side = model.model.visual_grid(FRAMES), model.config.vision_config.patch_size
    hidden, slow = [], []
    for index in range(clips):
        rendered, records = generate_clip(index, seed, "test", FRAMES, SIZE, FPS)
        frames = round_trip(rendered, processor)
        prompts = [
            processor.apply_chat_template(conversation([open_question(r)]), add_generation_prompt=True)
            for r in records
        ]
        inputs = processor(
            text=prompts,
            videos=[frames] * len(prompts),
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        model(**inputs)
        answer = inputs["attention_mask"].sum(1) - 1
        hidden.append(hybrid.call["hidden_states"][torch.arange(len(records)), answer])
        tokens = [r["detail_frames"][0] * height * width + digit_patch(r, width, patch_side) for r in records]
        digits = hybrid.attention.slow_norm(hybrid.call["slow_cache"].tokens[0, tokens])  # (6, D)
        slow.append(digits.expand(len(records), -1, -1))
    hybrid.remove()
    model.train(was_training)
    return torch.cat(hidden), torch.cat(slow)


def bilinear_match_accuracy(h: torch.Tensor, s: torch.Tensor, iterations: int = 1500) -> dict:
    """Fit `W` `(D, D')` so that question `i` of a clip scores its own candidate `s[i, i % 6]` highest by
    `h[i]^T W s[i, c]` (cross-entropy over the candidates, Adam from zero) on the first two thirds; the
    accuracy on those and on the rest."""
    right = torch.arange(len(h)) % s.shape[1]
    fitted = len(h) * 2 // 3
    weight = torch.zeros(h.shape[1], s.shape[2], requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=1e-2)

    def scores(rows: slice) -> torch.Tensor:
        return torch.einsum("nd,de,nce->nc", h[rows], weight, s[rows])  # (n, candidates)

    for _ in range(iterations):
        loss = torch.nn.functional.cross_entropy(scores(slice(0, fitted)), right[:fitted])
        optimizer.zero_grad()
        (loss + 1e-4 * weight.square().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return {
            part: float((scores(rows).argmax(-1) == right[rows]).float().mean())
            for part, rows in (("fit", slice(0, fitted)), ("held_out", slice(fitted, None)))
        }


def whitening(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean `(D,)` and matrix `(D, D)` that whiten rows like those of `x` `(..., D)`: `(x - mean) @ matrix`
    is `x` centred, in the basis of its covariance's eigenvectors, each direction divided by the square root of
    its variance plus 1e-3 of the largest (a variance v becomes v / (v + 1e-3 max v): the weakest directions,
    mostly noise, are not blown up)."""
    flat = x.reshape(-1, x.shape[-1])
    mean = flat.mean(0)
    variances, directions = torch.linalg.eigh(torch.cov((flat - mean).T))
    return mean, directions * (variances.clamp_min(0) + 1e-3 * variances.max()).rsqrt()


def whiten(x: torch.Tensor) -> torch.Tensor:
    """`x` `(..., D)` whitened by its own `whitening`."""
    mean, matrix = whitening(x)
    return (x - mean) @ matrix


def colour_match(checkpoint: Path, seed: int, clips: int) -> dict:
    """The bilinear match's accuracy on the features as they are, standardised, and whitened on either or both
    sides, and each side's largest covariance eigenvalues."""
    h, s = match_features(*load_model(checkpoint, "cpu", "float32"), seed, clips)
    standardised = (h - h.mean(0)) / (h.std(0) + 1e-6)
    report = {"checkpoint": str(checkpoint), "seed": seed, "questions": len(h)}
    for name, (left, right) in {
        "as_read": (h, s),
        "hidden_standardised": (standardised, s),
        "hidden_whitened": (whiten(h), s),
        "slow_whitened": (h, whiten(s)),
        "both_whitened": (whiten(h), whiten(s)),
    }.items():
        report[name] = bilinear_match_accuracy(left, right)
    for name, features in (("hidden", h), ("slow", s.flatten(0, 1))):
        report[f"{name}_top_variances"] = torch.linalg.eigvalsh(torch.cov(features.T)).flip(0)[:5].tolist()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seed", type=int, default=8, help="the clips' seed (not 0: the experiment's)")
    parser.add_argument("--clips", type=int, default=300)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    print(json.dumps(colour_match(args.checkpoint, args.seed, args.clips)), flush=True)


if __name__ == "__main__":
    main()
