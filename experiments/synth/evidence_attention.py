"""Evidence attention: an auxiliary loss of the demo run (`train --evidence-attention WEIGHT`) that pulls the
hybrid layer's cross-attention, at the position that names an answer's digit, towards the frame showing it.

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


def evidence_targets(
    input_ids: torch.Tensor, clips: list[list[dict]], tokenizer
) -> list[tuple[int, int, int]]:
    """`(sample, position, frame)` per answer of a batch of conversations `(B, L)` about `clips` (each clip's
    records, whichever of them the conversation asks): the position before the answer's first digit (whose
    logits name it) and the frame that shows that digit. A clip's 6 answers are 6 different digits, so the
    digit names its record; an answer without a digit (the letter alone) has no target."""
    digits = {tokenizer.convert_tokens_to_ids(str(d)): str(d) for d in range(10)}
    targets = []
    for b, (row, clip) in enumerate(zip(input_ids.tolist(), clips)):
        frame_of = {record["answer_text"]: record["detail_frames"][0] for record in clip}
        for first, last in answer_spans(row, tokenizer):
            named = next((p for p in range(first, last) if row[p] in digits), None)
            if named is not None and digits[row[named]] in frame_of:
                targets.append((b, named - 1, frame_of[digits[row[named]]]))
    return targets


class EvidenceAttention:
    """Keeps the inputs of a hybrid attention block's last call (a forward hook) and turns them into the
    loss: minus the log of the cross-attention mass (averaged over heads) on each target's frame."""

    def __init__(self, attention: HybridAttention):
        self.attention = attention
        self.call: dict = {}
        attention.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.call = kwargs

    def frame_probabilities(self, targets: list[tuple[int, int, int]], tokens_per_frame: int) -> torch.Tensor:
        """`(T, frames)`: per target, the cross-attention of its position over the frames of its sample's
        slow tokens (one video per sample), averaged over heads, as the block computed it."""
        block, call = self.attention, self.call
        queries, _ = block.rotated_queries_keys(call["hidden_states"], call["position_embeddings"])
        keys, _ = block.slow_keys_values(call["slow_cache"])  # (B, kv_heads, N, hd)
        samples, positions, _ = (torch.tensor(column) for column in zip(*targets))
        picked = queries[samples, :, positions]  # (T, H, hd)
        grouped = picked.view(len(targets), block.num_kv_heads, -1, block.head_dim)  # kv-head-major heads
        scores = torch.einsum("tkgd,tknd->tkgn", grouped, keys[samples]) * block.scaling
        bias = call["slow_cache"].bias(scores.dtype)  # (B, 1, 1, N) or None
        if bias is not None:
            scores = scores + bias[samples, :, :1]
        probs = scores.float().softmax(-1).flatten(1, 2).mean(1)  # (T, N)
        return probs.view(len(targets), -1, tokens_per_frame).sum(-1)

    def loss(self, targets: list[tuple[int, int, int]], tokens_per_frame: int) -> torch.Tensor:
        """Mean over `targets` of -log(attention mass on the target's frame)."""
        frames = torch.tensor([frame for _, _, frame in targets])
        mass = self.frame_probabilities(targets, tokens_per_frame)[torch.arange(len(targets)), frames]
        return -mass.clamp_min(1e-9).log().mean()
