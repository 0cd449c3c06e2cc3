"""What the hybrid attention reads when it answers: its input at the answer position and the slow tokens at
the clip's digit patches (`match_features`), and the whitening of such features (`whitening`). Shared by
`colour_match.py` (how bindable they are) and `whitened_training.py` (training in their whitened coordinates).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from benchmark import FPS, FRAMES, SIZE, conversation
from evidence_attention import EvidenceAttention, digit_patch
from scoring import round_trip

from slowfast_vlm.synth import generate_clip, open_question


def open_question_batches(processor, seed: int, clips: int) -> Iterator[tuple[list[dict], dict]]:
    """Per clip of the first `clips` of a fresh `seed` (through the mp4 round trip): its records, and its 6 open
    questions as one batch of chat prompts with the clip (right-padded: the answer position is the last)."""
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
        yield records, inputs


@torch.no_grad()
def match_features(
    model, processor, seed: int, clips: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(h, s, a)` over the open questions of `clips` clips of a fresh seed: `h` `(Q, D)` the answer position's
    input to the hybrid attention, `s` `(Q, 6, D)` its clip's 6 digit-patch slow tokens after the layer's
    slow norm, in record order (question `q` of a clip asks about its digit `q`), and `a` `(Q, 6)` the block's
    cross-attention at the answer over those 6 tokens alone (`EvidenceAttention.slow_probabilities`)."""
    was_training = model.training
    model.eval()
    hybrid = EvidenceAttention(model.hybrid_attentions[0])  # (its hook keeps the block's inputs)
    (height, width), patch_side = model.model.visual_grid(FRAMES), model.config.vision_config.patch_size
    hidden, slow, attention = [], [], []
    for records, inputs in open_question_batches(processor, seed, clips):
        model(**inputs)
        answer = inputs["attention_mask"].sum(1) - 1
        hidden.append(hybrid.call["hidden_states"][torch.arange(len(records)), answer])
        tokens = [r["detail_frames"][0] * height * width + digit_patch(r, width, patch_side) for r in records]
        digits = hybrid.attention.slow_norm(hybrid.call["slow_cache"].tokens[0, tokens])  # (6, D)
        slow.append(digits.expand(len(records), -1, -1))
        candidates = torch.tensor(tokens).expand(len(records), -1)
        attention.append(hybrid.slow_probabilities(list(range(len(records))), answer.tolist(), candidates))
    hybrid.remove()
    model.train(was_training)
    return torch.cat(hidden), torch.cat(slow), torch.cat(attention)


def whitening(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean `(D,)` and matrix `(D, D)` that whiten rows like those of `x` `(..., D)`: `(x - mean) @ matrix`
    is `x` centred, in the basis of its covariance's eigenvectors, each direction divided by the square root of
    its variance plus 1e-3 of the largest (a variance v becomes v / (v + 1e-3 max v): the weakest directions,
    mostly noise, are not blown up)."""
    flat = x.reshape(-1, x.shape[-1])
    mean = flat.mean(0)
    variances, directions = torch.linalg.eigh(torch.cov((flat - mean).T))
    return mean, directions * (variances.clamp_min(0) + 1e-3 * variances.max()).rsqrt()
