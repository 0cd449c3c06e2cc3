"""Give a checkpoint's LLM more key/value heads without changing what it computes: each kv head's k_proj /
v_proj rows (and the hybrid layers' `cross_attn_kv_proj` rows) copied to the query heads it serves.

    python experiments/synth/widen_kv_heads.py CHECKPOINT --kv-heads 4 --out OUT

Why: the demo LLM has one 32-wide kv head for its 4 query heads, and the hybrid layer's key of the slow token
at a digit keeps the square's colour for 58% of the questions where the token itself keeps it for 87%
(`binding.py`; BENCHMARKS.md, issue 20, item 12). With a key per query head, training can give each head its
own key; at the start the copies are equal, so the widened model's logits are the checkpoint's.

Grouped-query attention gives query head h the kv head h // (H / kv_heads): going from k to K kv heads,
new kv head j serves the heads of old kv head j // (K / k), so the old heads are repeated in place.
"""

from __future__ import annotations

import argparse
import copy

import torch
from surgery import rewrite_checkpoint, surgery_parser

from slowfast_vlm.modeling.model import SlowFastForConditionalGeneration

# state-dict name endings whose leading rows are laid out kv head by kv head
PER_KV_HEAD = (
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.cross_attn_kv_proj.weight",  # (kv_heads * 2 * hd, D): per kv head, its key then its value rows
    "self_attn.cross_attn_kv_proj.bias",
)


def widened_state(state: dict[str, torch.Tensor], old_heads: int, new_heads: int) -> dict[str, torch.Tensor]:
    """`state` with the rows `(old_heads * r, ...)` of every per-kv-head tensor of the LLM (not of the vision
    tower) repeated head by head to `(new_heads * r, ...)`; the rest unchanged."""
    repeat = new_heads // old_heads
    widened = {}
    for name, tensor in state.items():
        if ".language_model." in name and name.endswith(PER_KV_HEAD):
            per_head = tensor.view(old_heads, -1, *tensor.shape[1:])  # (k, r, ...)
            tensor = per_head.repeat_interleave(repeat, dim=0).flatten(0, 1)  # (K * r, ...)
        widened[name] = tensor
    return widened


def widen_kv_heads(
    model: SlowFastForConditionalGeneration, kv_heads: int
) -> SlowFastForConditionalGeneration:
    """A new model like `model` whose LLM has `kv_heads` key/value heads, computing the same function."""
    text = model.config.text_config
    old_heads, heads = text.num_key_value_heads, text.num_attention_heads
    if kv_heads % old_heads or heads % kv_heads or kv_heads <= old_heads:
        raise ValueError(
            f"--kv-heads {kv_heads}: must be a multiple of the model's {old_heads} kv heads above it and "
            f"divide its {heads} query heads"
        )
    config = copy.deepcopy(model.config)
    config.text_config.num_key_value_heads = kv_heads
    widened = SlowFastForConditionalGeneration(config).to(model.dtype)
    widened.load_state_dict(widened_state(model.state_dict(), old_heads, kv_heads))
    # (its eos / pad ids, not the defaults a new model derives from its config)
    widened.generation_config = copy.deepcopy(model.generation_config)
    return widened.eval()


def build_parser() -> argparse.ArgumentParser:
    parser = surgery_parser(__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, required=True, help="key/value heads of the widened LLM")
    return parser


def main() -> None:
    args, _ = rewrite_checkpoint(build_parser(), lambda model, args: widen_kv_heads(model, args.kv_heads))
    print(f"{args.checkpoint} with {args.kv_heads} kv heads -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
