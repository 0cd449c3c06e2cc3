"""Checks every host family's tests share: the state dict is the host's plus the new keys, stage 1
trains exactly the new parameters, a saved model reloads identically."""

import torch
from transformers import AutoModelForImageTextToText

from slowfast_vlm.modeling.hybrid import freeze_all_but_slow_branch

NEW_KEYS = (
    "cross_attn_kv_proj.weight",
    "cross_attn_kv_proj.bias",
    "cross_attn_gate_proj.0.weight",
    "cross_attn_gate_proj.0.bias",
    "cross_attn_warm_up_gate",
)


def open_gates(model, value: float = 0.8) -> None:
    with torch.no_grad():
        for layer in model.hybrid_attentions:
            layer.cross_attn_warm_up_gate.fill_(value)


def assert_hosts_weights_plus_cross_attention(host, model, hybrid_layers=(0, 2)) -> None:
    """Every host weight under its own name and value; the only new keys are the hybrid layers'."""
    host_state, state = host.state_dict(), model.state_dict()
    assert set(host_state) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in host_state.items())
    assert set(state) - set(host_state) == {
        f"model.language_model.layers.{i}.self_attn.{name}" for i in hybrid_layers for name in NEW_KEYS
    }


def assert_stage1_trains_only_new_parameters(model, inputs: dict, video_token_id: int) -> None:
    """After `freeze_all_but_slow_branch`, one optimizer step on `inputs` (answer loss on the text) changes
    exactly the hybrid layers' new parameters."""
    open_gates(model, 0.5)  # so that every new parameter gets a gradient
    model.train()
    trainable = freeze_all_but_slow_branch(model)
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    assert names == {name for name in model.state_dict() if ".self_attn.cross_attn_" in name}
    assert len(trainable) == len(names) == 10

    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = torch.where(inputs["input_ids"] == video_token_id, -100, inputs["input_ids"])
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == (name in names), name


def assert_reloads_identically(model, path, inputs: dict, frames: int, fast_frames: int) -> None:
    """With open gates, save and reload through `AutoModelForImageTextToText`: same class, knobs, weights (bit
    for bit) and logits. The logits up to fp32 rounding only: transformers 5.16 leaves the reloaded weights
    as unaligned views of the mapped file, and a CPU's GEMM may then sum in another order."""
    open_gates(model, 0.6)
    model.save_pretrained(path)
    reloaded = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    assert type(reloaded) is type(model)
    assert (reloaded.config.frames, reloaded.config.fast_frames) == (frames, fast_frames)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=1e-6
        )
