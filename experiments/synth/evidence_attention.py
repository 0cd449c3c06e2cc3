"""Evidence attention: auxiliary losses of the demo run on the hybrid layer's cross-attention at the position
that names an answer's digit. `train --evidence-attention WEIGHT` pulls it towards the frame showing that
digit, over all slow tokens; `train --digit-choice WEIGHT` makes it pick, among the patches of the digits the
clip shows, the asked one's, so its whole gradient goes to telling those digits apart (by colour and contact).

Why: the shipped model reads the asked wall contact but not the asked colour (`scoring.open_answer_kind`:
most wrong answers name another square's digit with the asked contact), although the colour is in the
slow tokens at the digit and in the hidden state entering the hybrid layer (BENCHMARKS.md, item 12). The
labels come from the generator (`detail_frames`), so a model trained with it has been shown where the
evidence is: its attention figures measure that training, not a map it found alone.
"""

from __future__ import annotations

import torch
from benchmark import answer_spans
from torch import nn

from slowfast_vlm.modeling.hybrid import HybridAttention


def answered_records(
    input_ids: torch.Tensor, clips: list[list[dict]], tokenizer
) -> list[tuple[int, int, dict]]:
    """`(sample, position, record)` per answer of a batch of conversations `(B, L)` about `clips` (each clip's
    records, whichever of them the conversation asks): the position before the answer's first digit (whose
    logits name it) and the record whose digit that is. A clip's 6 answers are 6 different digits, so the
    digit names its record; an answer without a digit (the letter alone) has none."""
    digits = {tokenizer.convert_tokens_to_ids(str(d)): str(d) for d in range(10)}
    answered = []
    for b, (row, clip) in enumerate(zip(input_ids.tolist(), clips)):
        record_of = {record["answer_text"]: record for record in clip}
        for first, last in answer_spans(row, tokenizer):
            named = next((p for p in range(first, last) if row[p] in digits), None)
            if named is not None and digits[row[named]] in record_of:
                answered.append((b, named - 1, record_of[digits[row[named]]]))
    return answered


def evidence_targets(
    input_ids: torch.Tensor, clips: list[list[dict]], tokenizer
) -> list[tuple[int, int, int]]:
    """`(sample, position, frame)` per answer (`answered_records`): the frame that shows its digit."""
    return [
        (b, p, record["detail_frames"][0]) for b, p, record in answered_records(input_ids, clips, tokenizer)
    ]


def digit_patch(record: dict, grid_width: int, patch_side: int) -> int:
    """The patch (row-major in a frame's `grid_width`-wide grid of `patch_side` pixels) holding the centre of
    the record's digit."""
    x0, y0, x1, y1 = record["detail_box"]
    return (y0 + y1) // 2 // patch_side * grid_width + (x0 + x1) // 2 // patch_side


def digit_choice_targets(
    input_ids: torch.Tensor, shown: list[list[dict]], tokenizer, grid: tuple[int, int], patch_side: int
) -> list[tuple[int, int, list[int], int]]:
    """`(sample, position, candidates, right)` per answer of a batch (`answered_records`) about clips showing
    the digits of `shown`: the slow-token index of each shown digit's patch (frame-major over frames of a
    `grid` `(h, w)` of patches: `T * h * w` tokens) and which of them the answer names."""
    (height, width), targets = grid, []
    for b, position, record in answered_records(input_ids, shown, tokenizer):
        candidates = [
            r["detail_frames"][0] * height * width + digit_patch(r, width, patch_side) for r in shown[b]
        ]
        targets.append((b, position, candidates, shown[b].index(record)))
    return targets


class EvidenceAttention:
    """Keeps the inputs of a hybrid attention block's last call (a forward hook) and turns them into the
    losses: minus the log of the cross-attention (averaged over heads) on each target's frame (`loss`), or
    on its digit's patch among the shown digits' patches (`digit_choice_loss`)."""

    def __init__(self, attention: HybridAttention):
        self.attention = attention
        self.call: dict = {}
        self.hook = attention.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.call = kwargs

    def remove(self) -> None:
        """Stop keeping the block's calls."""
        self.hook.remove()
        self.call = {}

    def slow_probabilities(
        self, samples: list[int], positions: list[int], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(T, n)`: per query (`samples[t]`, `positions[t]`), the block's cross-attention over its sample's
        slow tokens, averaged over heads, as the block computed it (`n = N`); or, given `tokens` `(T, n)`, the
        softmax of the same scores over those slow tokens alone."""
        block, call = self.attention, self.call
        queries, _ = block.rotated_queries_keys(call["hidden_states"], call["position_embeddings"])
        keys, _ = block.slow_keys_values(call["slow_cache"])  # (B, kv_heads, N, hd)
        samples, positions = torch.tensor(samples), torch.tensor(positions)
        picked = queries[samples, :, positions]  # (T, H, hd)
        grouped = picked.view(len(samples), block.num_kv_heads, -1, block.head_dim)  # kv-head-major heads
        scores = torch.einsum("tkgd,tknd->tkgn", grouped, keys[samples]) * block.scaling  # (T, kv, g, N)
        bias = call["slow_cache"].bias(scores.dtype)  # (B, 1, 1, N) or None
        if bias is not None:
            scores = scores + bias[samples, :, :1]
        if tokens is not None:
            scores = scores.gather(
                -1, tokens[:, None, None, :].expand(*scores.shape[:3], -1)
            )  # (T, kv, g, n)
        return scores.float().softmax(-1).flatten(1, 2).mean(1)

    def frame_probabilities(self, targets: list[tuple[int, int, int]], tokens_per_frame: int) -> torch.Tensor:
        """`(T, frames)`: per target, the cross-attention of its position over the frames of its sample's
        slow tokens (one video per sample), averaged over heads, as the block computed it."""
        samples, positions, _ = zip(*targets)
        probs = self.slow_probabilities(list(samples), list(positions))  # (T, N)
        return probs.view(len(targets), -1, tokens_per_frame).sum(-1)

    def loss(self, targets: list[tuple[int, int, int]], tokens_per_frame: int) -> torch.Tensor:
        """Mean over `targets` of -log(attention mass on the target's frame)."""
        frames = torch.tensor([frame for _, _, frame in targets])
        mass = self.frame_probabilities(targets, tokens_per_frame)[torch.arange(len(targets)), frames]
        return -mass.clamp_min(1e-9).log().mean()

    def digit_choice_loss(self, targets: list[tuple[int, int, list[int], int]]) -> torch.Tensor:
        """Mean over `targets` (`digit_choice_targets`) of -log(attention on the right candidate), the softmax
        taken over the candidates' slow tokens alone."""
        samples, positions, candidates, right = zip(*targets)
        probs = self.slow_probabilities(list(samples), list(positions), torch.tensor(candidates))  # (T, n)
        return -probs[torch.arange(len(targets)), torch.tensor(right)].clamp_min(1e-9).log().mean()
