"""Where a checkpoint keeps what a question asks for: linear probes of the asked square's colour (5) and wall
contact (2), on the slow token at the digit's own patch of its frame and the hybrid layer's key of it (the
cross-attention's key side), and on the hidden state of the answer position entering each decoder layer and
the hybrid layer's query there, after RoPE (the query side).

    python experiments/synth/binding.py CHECKPOINT [--seed 8] [--clips 100]

Each probe is a logistic regression fit on the first half of the questions and scored on the other half
(chance: 20% colour, 50% contact). BENCHMARKS.md, issue 20, item 12.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchmark import FRAMES, question_cue, question_words
from evidence_attention import EvidenceAttention, digit_patch
from hybrid_inputs import open_question_batches

from slowfast_vlm.inference import load_model
from slowfast_vlm.synth import COLOURS


def held_out_accuracy(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3) -> float:
    """A logistic regression on `features` `(n, d)` (standardised by the first half) fit to `labels` `(n,)`
    of the first half; its accuracy on the second half."""
    half = len(features) // 2
    x = (features - features[:half].mean(0)) / (features[:half].std(0) + 1e-6)
    probe = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(probe(x[:half]), labels[:half])
            + l2 * probe.weight.square().sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe(x[half:]).argmax(-1) == labels[half:]).float().mean())


@torch.no_grad()
def binding_probes(checkpoint: Path, seed: int, clips: int) -> dict:
    """Held-out probe accuracies of colour and contact, on the digit's slow token and the hybrid layer's key
    of it, and at the answer position of the open question on the hybrid layer's query and on each layer's
    input, over `clips` clips of a fresh seed."""
    model, processor = load_model(checkpoint, "cpu", "float32")
    width, patch_side = model.model.visual_grid(FRAMES)[1], model.config.vision_config.patch_size
    hybrid = EvidenceAttention(model.hybrid_attentions[0])  # (its hook keeps the block's inputs)
    block = hybrid.attention
    slow, keys, hidden, queries, colours, contacts = [], [], [], [], [], []
    for records, inputs in open_question_batches(processor, seed, clips):
        outputs = model(**inputs, output_hidden_states=True)
        answer = inputs["attention_mask"].sum(1) - 1
        hidden.append(torch.stack([h[torch.arange(len(records)), answer] for h in outputs.hidden_states], 1))
        rotated, _ = block.rotated_queries_keys(
            hybrid.call["hidden_states"], hybrid.call["position_embeddings"]
        )
        queries.extend(rotated[torch.arange(len(records)), :, answer].flatten(1))  # each (H*hd,)
        tokens = model.model.encode_visual_items([inputs["pixel_values_videos"][0]])[0]  # (T, h*w, D)
        key, _ = block.project_slow(tokens.flatten(0, 1)[None])  # (1, kv_heads, T*h*w, hd)
        key = key[0].transpose(0, 1).reshape(*tokens.shape[:2], -1)  # (T, h*w, kv_heads*hd)
        for record in records:
            patch = digit_patch(record, width, patch_side)
            slow.append(tokens[record["detail_frames"][0], patch])
            keys.append(key[record["detail_frames"][0], patch])
            colour, contact = question_cue(question_words(record)).split(", ")
            colours.append(list(COLOURS).index(colour))
            contacts.append(int(contact.startswith("touching")))
    hidden_states = torch.cat(hidden)  # (questions, layers + 1, D)
    labels = {"colour": torch.tensor(colours), "contact": torch.tensor(contacts)}
    report = {"checkpoint": str(checkpoint), "seed": seed, "questions": len(slow)}
    for side, features in (("digit_slow_token", slow), ("hybrid_key_of_it", keys), ("hybrid_query", queries)):
        report[side] = {name: held_out_accuracy(torch.stack(features), y) for name, y in labels.items()}
    report["answer_position_entering_layer"] = [
        {name: held_out_accuracy(hidden_states[:, layer], y) for name, y in labels.items()}
        for layer in range(hidden_states.shape[1] - 1)
    ]
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seed", type=int, default=8, help="the clips' seed (not 0: the experiment's)")
    parser.add_argument("--clips", type=int, default=100)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    print(json.dumps(binding_probes(args.checkpoint, args.seed, args.clips)), flush=True)


if __name__ == "__main__":
    main()
