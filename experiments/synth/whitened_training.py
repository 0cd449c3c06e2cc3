"""Training the hybrid layer's query and slow key/value projections in whitened coordinates of their inputs
(`train --whiten-hybrid CLIPS`), folded back into plain linear layers before the model is saved.

Why: the asked colour is in the hybrid attention's inputs, but along directions whose variance is about
1/3000 of the strongest (`colour_match.py`, BENCHMARKS.md issue 20 item 15). A bilinear match fit on the
features as read stays at the wall contact alone (1/3 of the clip's digits), and one fit on whitened features
binds 84% held out. A linear layer `y = W x + b` is the same function as `y = W' z + b'` of its whitened input
`z = P^T (x - m)`, with `W' = W P^-T` and `b' = b + W m`; trained as `W'`, its gradient sees every direction of
the input at unit variance. The reparametrisation changes how the layer learns, not what it computes.
"""

from __future__ import annotations

import torch
from hybrid_inputs import match_features, whitening
from torch import nn

WHITENING_SEED = 11  # the clips the statistics come from (a seed no score or test uses)


class WhitenedLinear(nn.Module):
    """A linear layer kept as `weight` `W'` `(out, D)` and `bias` `b'` on its whitened input: `y = W' z + b'`,
    `z = (x - mean) @ matrix` (`hybrid_inputs.whitening`); `fold()` gives the equivalent `nn.Linear`."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, matrix: torch.Tensor):
        super().__init__()
        if linear.bias is None:
            raise ValueError(
                "a whitened linear layer folds its input's mean into the bias: the layer has none"
            )
        self.register_buffer("mean", mean.to(linear.weight))  # (D,)
        self.register_buffer("matrix", matrix.to(linear.weight))  # (D, D)
        weight = linear.weight.detach()  # (out, D)
        self.weight = nn.Parameter(torch.linalg.solve(matrix, weight.T).T.contiguous())  # W P^-T
        self.bias = nn.Parameter(linear.bias.detach() + weight @ self.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., out)
        return nn.functional.linear((x - self.mean) @ self.matrix, self.weight, self.bias)

    def fold(self) -> nn.Linear:
        """The plain `nn.Linear` computing the same: `W = W' P^T`, `b = b' - W m`."""
        weight = self.weight.detach() @ self.matrix.T
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(self.bias.detach() - weight @ self.mean)
        return linear


def whiten_hybrid_projections(model: nn.Module, processor, clips: int) -> None:
    """Replace each hybrid block's `q_proj` and `cross_attn_kv_proj` by a `WhitenedLinear` on the statistics of
    their inputs over the open questions of `clips` clips of `WHITENING_SEED`: the answer position's hidden
    state entering the block (queries) and the slow tokens at the digits' patches (keys and values)."""
    hidden, slow, _ = match_features(model, processor, WHITENING_SEED, clips)  # (Q, D), (Q, 6, D)
    digits = slow[:: slow.shape[1]].flatten(0, 1)  # each clip's 6 digit tokens once
    for block in model.hybrid_attentions:
        block.q_proj = WhitenedLinear(block.q_proj, *whitening(hidden))
        block.cross_attn_kv_proj = WhitenedLinear(block.cross_attn_kv_proj, *whitening(digits))


def fold_whitened(model: nn.Module) -> None:
    """Turn every `WhitenedLinear` of `model` back into the `nn.Linear` it computes (for saving)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, WhitenedLinear):
            parent, attribute = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, attribute, module.fold())


def restore_training_state(model: nn.Module, state_dict: dict) -> None:
    """Load a training checkpoint's weights (`checkpoints.save_checkpoint`'s "model") onto `model`, the run's
    starting model, and fold any whitened projections back into plain layers."""
    if any(key.endswith(".q_proj.matrix") for key in state_dict):
        for block in model.hybrid_attentions:  # (their statistics come with the state)
            for name in ("q_proj", "cross_attn_kv_proj"):
                size = getattr(block, name).in_features
                setattr(block, name, WhitenedLinear(getattr(block, name), torch.zeros(size), torch.eye(size)))
    model.load_state_dict(state_dict)
    fold_whitened(model)
