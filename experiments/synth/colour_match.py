"""Is the asked digit's patch bindable from what the hybrid layer reads? A bilinear match `h^T W s` between the
answer position's hidden state entering the hybrid attention (`h`, after its input norm) and the normed slow
token at each of the clip's 6 digit patches (`s`), softmax over the 6, fit on two thirds of the questions and
scored on the rest (chance 1/6; the wall contact alone gives 1/3). Fit on the features as they are, and after
whitening either side: if only the whitened fit binds, the colour is there but in directions too weak for
gradient descent on the projections to find.

    python experiments/synth/colour_match.py CHECKPOINT [--seed 8] [--clips 300] [--training-state STATE]

Beside it, how often the model's own cross-attention at the answer, over those 6 tokens alone, peaks on the
asked digit's (`attention_choice`). `--training-state` scores a run still in training: its checkpoint's
weights (`<run>/checkpoint/state.pt`) on CHECKPOINT, the run's starting model.

BENCHMARKS.md, issue 20, item 15.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hybrid_inputs import match_features, whitening
from whitened_training import restore_training_state

from slowfast_vlm.inference import load_model


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


def whiten(x: torch.Tensor) -> torch.Tensor:
    """`x` `(..., D)` whitened by its own `whitening`."""
    mean, matrix = whitening(x)
    return (x - mean) @ matrix


def colour_match(checkpoint: Path, seed: int, clips: int, training_state: Path | None = None) -> dict:
    """The model's own attention choice among the 6 digit patches, the bilinear match's accuracy on the
    features as they are, standardised, and whitened on either or both sides, and each side's largest
    covariance eigenvalues."""
    model, processor = load_model(checkpoint, "cpu", "float32")
    report = {"checkpoint": str(checkpoint), "seed": seed}
    if training_state is not None:
        state = torch.load(training_state, weights_only=False)  # our own file: numpy's RNG state is a dict
        restore_training_state(model, state["model"])
        report |= {"training_state": str(training_state), "step": state["step"]}
    h, s, attention = match_features(model, processor, seed, clips)
    own = torch.arange(len(h)) % s.shape[1]
    report |= {"questions": len(h), "attention_choice": float((attention.argmax(-1) == own).float().mean())}
    standardised = (h - h.mean(0)) / (h.std(0) + 1e-6)
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
    parser.add_argument("--training-state", type=Path, help="a run's checkpoint/state.pt, on CHECKPOINT")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    report = colour_match(args.checkpoint, args.seed, args.clips, args.training_state)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
