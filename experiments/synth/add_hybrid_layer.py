"""Make one more decoder layer of a checkpoint's LLM a hybrid layer without changing what it computes: its
slow keys start from the layer's k_proj (as a new hybrid layer's do) and its slow values at zero.

    python experiments/synth/add_hybrid_layer.py CHECKPOINT --layer 3 --out OUT

Why: the demo model matches the asked wall contact at its one hybrid layer (2) and then names a digit of a
random square of that contact; the colour is not matched in that one dot product per head (BENCHMARKS.md,
issue 20, items 12-13). A second cross-attention gives the model a second look at the slow tokens with
what the first one found already in its hidden state.

The experiment's hybrid layers have no gate (`gate_type` "none"): the branch's output is added to the
self-attention's before `o_proj`. With zero values that output is zero whatever the attention weights,
so the extended model's logits are the checkpoint's; the values get gradients from the first step (the
keys from the moment the values are no longer zero).
"""

from __future__ import annotations

import argparse
import copy

import torch
from surgery import rewrite_checkpoint, surgery_parser

from slowfast_vlm.modeling.hybrid import add_hybrid_layers
from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration


def add_hybrid_layer(model: SlowFastForConditionalGeneration, layer: int) -> SlowFastForConditionalGeneration:
    """A copy of `model` whose decoder layer `layer` is hybrid too, computing the same function."""
    present = model.config.hybrid_layer_indices
    layers = model.config.text_config.num_hidden_layers
    if layer in present or not 0 <= layer < layers:
        raise ValueError(
            f"--layer {layer}: must be one of the LLM's {layers} layers that is not hybrid yet "
            f"(hybrid: {present})"
        )
    extended = copy.deepcopy(model)
    extended.config.hybrid_layers = sorted([*present, layer])
    add_hybrid_layers(extended.model.language_model, extended.config)  # keys/values from k_proj/v_proj
    block = extended.model.language_model.layers[layer].self_attn
    with torch.no_grad():
        # rows laid out (kv head, [key | value], head_dim): zero every value row
        block.cross_attn_kv_proj.weight.view(block.num_kv_heads, 2, block.head_dim, -1)[:, 1].zero_()
        block.cross_attn_kv_proj.bias.view(block.num_kv_heads, 2, block.head_dim)[:, 1].zero_()
    return extended.eval()


def build_parser() -> argparse.ArgumentParser:
    parser = surgery_parser(__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, required=True, help="the decoder layer to make hybrid")
    return parser


def main() -> None:
    args, extended = rewrite_checkpoint(
        build_parser(), lambda model, args: add_hybrid_layer(model, args.layer)
    )
    print(f"{args.checkpoint} with hybrid layers {extended.config.hybrid_layers} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
