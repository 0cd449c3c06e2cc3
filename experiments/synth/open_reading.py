"""The digit of a digit-first multiple-choice answer taught the open form's own reading, among the options.

Trained on the right digit where the options are listed, the LLM first learns to copy one of them and
reads the clip there only slowly (BENCHMARKS.md item 11: 57 -> 62 of 192 in 771 steps, against 87 of
192 for the open prompt's reading among the same options). Here that digit's target is instead the
model's reading of the same question in the open form (a twin of the batch, every multiple-choice turn
asked open), restricted to the 4 listed digits and renormalised: copying then costs its distance from
that reading, and the best the digit can do is the open form's reading among the options, which is what
a letter looked up from it can reach at best.
"""

from __future__ import annotations

import re

import torch
from benchmark import answer_spans
from transformers.loss.loss_utils import ForCausalLMLoss

from slowfast_vlm.synth import LETTERS


def open_reading_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    twin_logits: torch.Tensor,
    twin_ids: torch.Tensor,
    tokenizer,
) -> torch.Tensor:
    """Mean next-token loss of a batch `(B, L)` with logits `(B, L, V)`, as the model's own loss on `labels`,
    except at the digit each digit-first multiple-choice answer names ("7; A. 3 B. 7 C. 1 D. 0; B": the
    first of its 5 digits): there the target is the twin's distribution over the 4 listed digits at the
    same turn's open answer (`twin_logits` `(B, L', V)` of `twin_ids`, the same conversations with every
    multiple-choice turn asked in the open form), renormalised over those 4."""
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    listing = re.compile(r"; " + " ".join(rf"{letter}\. (\d)" for letter in LETTERS) + "; ")
    labels = labels.clone()
    soft = []
    for b in range(ids.shape[0]):
        spans = answer_spans(ids[b].tolist(), tokenizer)
        twin_spans = answer_spans(twin_ids[b].tolist(), tokenizer)
        if len(spans) != len(twin_spans):
            raise ValueError(f"conversation {b}: {len(spans)} answers, its open twin {len(twin_spans)}")
        for (first, last), (twin_first, _) in zip(spans, twin_spans):
            named = next((p for p in range(first, last + 1) if int(ids[b, p]) in digits), None)
            if named is None:  # a letter alone
                continue
            # the 4 digits listed after it, as the named digit's own (bare) tokens
            listed = listing.match(tokenizer.decode(ids[b, named + 1 : last + 1]))
            if listed is None:  # an open answer: its digit keeps its label
                continue
            options = [digits[int(d)] for d in listed.groups()]
            # (4,) the twin's reading where it predicts the open digit; the log-probabilities of the named one
            reading = twin_logits[b, twin_first - 1, options].float().softmax(-1)
            log_probs = logits[b, named - 1].float().log_softmax(-1)[options]
            soft.append(-(reading * log_probs).sum())
            labels[b, named] = -100
    count = int((labels[:, 1:] != -100).sum()) + len(soft)
    # the model's own loss (transformers' causal-LM loss) over the labels left, divided by every target's count
    hard = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=count)
    return hard + sum(soft, torch.zeros(())) / count
