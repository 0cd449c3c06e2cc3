"""Hybrid layers against a naive einsum/softmax transcription of architecture section 1.5. (docs/architecture.md)"""

import pytest
import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from slowfast_vlm.modeling.hybrid import HybridAttention
from slowfast_vlm.modeling.slow_tokens import SlowCache


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def naive_hybrid_attention(attn, hidden, cos, sin, valid, slow, slow_mask, query_mask):
    """Self-attention + gated cross-attention, one sample, head and query at a time.

    hidden (B, L, D) already normalised; cos/sin (B, L, hd); valid (B, L) non-padding;
    slow (B, N, D) un-normalised slow tokens; slow_mask (B, N); query_mask (B, L).
    """
    batch, length, _ = hidden.shape
    hd, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
    group = heads // kv_heads
    q = attn.q_proj(hidden).view(batch, length, heads, hd)
    k = attn.k_proj(hidden).view(batch, length, kv_heads, hd)
    v = attn.v_proj(hidden).view(batch, length, kv_heads, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
    k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]

    # cross keys/values from the fused projection, sliced per kv-head as (head, [key|value], hd)
    normed = attn.slow_norm(slow)
    weight, bias = attn.cross_attn_kv_proj.weight, attn.cross_attn_kv_proj.bias
    cross_k = torch.stack(
        [
            normed @ weight[g * 2 * hd : g * 2 * hd + hd].T + bias[g * 2 * hd : g * 2 * hd + hd]
            for g in range(kv_heads)
        ],
        2,
    )
    cross_v = torch.stack(
        [
            normed @ weight[g * 2 * hd + hd : (g + 1) * 2 * hd].T + bias[g * 2 * hd + hd : (g + 1) * 2 * hd]
            for g in range(kv_heads)
        ],
        2,
    )

    out = torch.zeros(batch, length, heads * hd, dtype=hidden.dtype)
    for b in range(batch):
        for i in range(length):
            for h in range(heads):
                keys = [j for j in range(i + 1) if valid[b, j]]
                scores = torch.stack([q[b, i, h] @ k[b, j, h // group] for j in keys]) / hd**0.5
                probs = scores.softmax(0)
                out[b, i, h * hd : (h + 1) * hd] = sum(p * v[b, j, h // group] for p, j in zip(probs, keys))
    final = out.clone()
    for b in range(batch):
        slots = [n for n in range(slow.shape[1]) if slow_mask[b, n]]
        if not slots:
            continue
        for i in range(length):
            if not query_mask[b, i]:
                continue
            cross = torch.zeros(heads * hd, dtype=hidden.dtype)
            for h in range(heads):
                scores = torch.stack([q[b, i, h] @ cross_k[b, n, h // group] for n in slots]) / hd**0.5
                probs = scores.softmax(0)
                cross[h * hd : (h + 1) * hd] = sum(
                    p * cross_v[b, n, h // group] for p, n in zip(probs, slots)
                )
            if attn.gate_type == "tanh-warmup":
                gate_linear = attn.cross_attn_gate_proj[0]
                gate = torch.tanh(out[b, i] @ gate_linear.weight[0] + gate_linear.bias[0])
                cross = gate * torch.tanh(attn.cross_attn_warm_up_gate[0]) * cross
            final[b, i] += cross
    return attn.o_proj(final)


@pytest.mark.parametrize("llm", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("gate_type", ["tanh-warmup", "none"])
@pytest.mark.parametrize("length", [7, 1])  # a prefill (querying positions gathered) and a decoding step
def test_hybrid_attention_matches_naive(llm, attn_impl, gate_type, length):
    model = tiny_model(llm=llm, attn=attn_impl, gate_type=gate_type, seed=1).double()
    open_gates(model, 0.7)
    layer = model.model.language_model.layers[2]
    attn = layer.self_attn
    assert isinstance(attn, HybridAttention)
    with torch.no_grad():  # make the gate input matter: random, non-zero gate weights
        if gate_type == "tanh-warmup":
            attn.cross_attn_gate_proj[0].weight.normal_(0, 0.5)
            attn.cross_attn_gate_proj[0].bias.fill_(0.3)

    torch.manual_seed(0)
    batch, dim, num_slow = 3, 64, 6
    hidden = layer.input_layernorm(torch.randn(batch, length, dim, dtype=torch.float64))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 5:] = False  # right padding
    slow = torch.randn(batch, num_slow, dim, dtype=torch.float64)
    slow_mask = torch.tensor(
        [[1] * 6, [1] * 3 + [0] * 3, [0] * 6], dtype=torch.bool
    )  # sample 2: no visual input
    query_mask = torch.rand(batch, length) > 0.4
    query_mask[1, 5:] = False
    if length == 1:  # a full sample that does not query, a padded one that does, one without slow tokens
        query_mask = torch.tensor([[False], [True], [True]])

    position_ids = torch.arange(length)[None].expand(batch, -1)
    cos, sin = model.model.language_model.rotary_emb(hidden, position_ids)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed = causal[None] & valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e30)[:, None]

    with torch.no_grad():
        got, _ = attn(
            hidden,
            position_embeddings=(cos, sin),
            attention_mask=mask,
            slow_cache=SlowCache(tokens=slow, mask=slow_mask, cache_kv=False),
            slow_query_mask=query_mask,
        )
        expected = naive_hybrid_attention(attn, hidden, cos, sin, valid, slow, slow_mask, query_mask)
    # float64 throughout, except the float32 softmax inside transformers' eager attention
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-6, atol=1e-7)
    # the branch is live: without slow tokens the output differs wherever a query reads them
    with torch.no_grad():
        plain, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=mask)
    reads = query_mask & slow_mask.any(1)[:, None] & valid
    assert not torch.allclose(plain[reads], got[reads])
    torch.testing.assert_close(plain[~reads & valid], got[~reads & valid], rtol=0, atol=0)


@pytest.mark.parametrize("llm", ["qwen2", "llama", "mistral", "qwen3"])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_initial_gates_give_the_plain_llm(llm, attn_impl):
    """Freshly converted: logits equal the unmodified LLM's on the same input embeddings."""
    model = tiny_model(llm=llm, attn=attn_impl, seed=2)
    plain = AutoModelForCausalLM.from_config(model.config.text_config, attn_implementation=attn_impl).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(
        {
            k: v
            for k, v in state.items()
            if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))
        },
        strict=False,
    )
    assert not missing
    assert all("cross_attn" in k for k in unexpected)

    captured = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    n = 8  # fast tokens of a 4-frame video: 2 frames x 2x2
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * n + [5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=torch.randn(1, 4, 3, 32, 32)).logits
        expected = plain(inputs_embeds=captured["embeds"]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("llm", ["qwen2", "llama", "mistral", "qwen3"])
def test_shared_slow_normalisation_gives_each_layers_own_norm(llm):
    """The slow tokens' RMS normalisation, computed once for all hybrid layers, then scaled by each
    layer's weight: bit for bit the layer's own `input_layernorm` in bf16, and the same keys/values."""
    model = tiny_model(llm=llm, seed=5).to(torch.bfloat16)
    torch.manual_seed(0)
    slow = torch.randn(2, 9, 64, dtype=torch.bfloat16) * 3
    cache = SlowCache(tokens=slow, mask=torch.ones(2, 9, dtype=torch.bool))
    with torch.no_grad():
        for attn in model.hybrid_attentions:
            attn.slow_norm.weight.normal_(1.0, 0.3)  # a different weight per layer
            normalized = cache.rms_normalized(attn.slow_norm.variance_epsilon)
            assert torch.equal(attn.slow_norm.weight * normalized, attn.slow_norm(slow))
            shared, own = attn.slow_keys_values(cache), attn.project_slow(slow)
            assert all(torch.equal(a, b) for a, b in zip(shared, own))
    assert len(cache.normalized) == 1  # one normalisation for every layer
    cache.get(model.hybrid_attentions[0].layer_idx, None)  # a decoding step: read from the cache...
    assert not cache.normalized  # ...which frees the normalised tokens
    # with autograd on, each layer normalises on its own (activation checkpointing recomputes per layer)
    with_grad = SlowCache(tokens=slow, mask=cache.mask, cache_kv=False)
    model.hybrid_attentions[0].slow_keys_values(with_grad)
    assert not with_grad.normalized


def test_kv_projection_initialised_from_lm():
    """init_cross_kv_from_lm: the cross keys/values equal k_proj/v_proj of the normalised slow tokens."""
    model = tiny_model(seed=3)
    attn = model.hybrid_attentions[0]
    slow = torch.randn(2, 5, 64)
    with torch.no_grad():
        key, value = attn.project_slow(slow)
        normed = attn.slow_norm(slow)
        expected_k = attn.k_proj(normed).view(2, 5, 2, 16).transpose(1, 2)
        expected_v = attn.v_proj(normed).view(2, 5, 2, 16).transpose(1, 2)
    torch.testing.assert_close(key, expected_k)
    torch.testing.assert_close(value, expected_v)
    assert attn.cross_attn_warm_up_gate.item() == 0.0


def test_gate_init_opens_the_branch_from_the_start():
    closed, opened = tiny_model(seed=3), tiny_model(seed=3, cross_attn_gate_init=0.5)
    assert all(layer.cross_attn_warm_up_gate.item() == 0.5 for layer in opened.hybrid_attentions)
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * 8 + [5, 6]])
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(
            closed(input_ids=ids, pixel_values_videos=video).logits,
            opened(input_ids=ids, pixel_values_videos=video).logits,
        )


def test_random_kv_init_and_weight_names():
    model = tiny_model(init_cross_kv_from_lm=False, seed=4)
    attn = model.hybrid_attentions[0]
    assert not torch.allclose(attn.cross_attn_kv_proj.weight[:16], attn.k_proj.weight[:16])
    names = {n for n, _ in model.named_parameters()}
    # pretrained weights keep their names; the new ones sit under self_attn as in the reference
    for suffix in (
        "q_proj.weight",
        "k_proj.weight",
        "o_proj.weight",
        "cross_attn_kv_proj.weight",
        "cross_attn_kv_proj.bias",
        "cross_attn_gate_proj.0.weight",
        "cross_attn_warm_up_gate",
    ):
        assert f"model.language_model.layers.2.self_attn.{suffix}" in names
    assert not any("layers.1.self_attn.cross" in n for n in names)
    assert not any("slow_norm" in n for n in names)


def test_unsupported_layer_is_rejected():
    from torch import nn

    from slowfast_vlm import add_hybrid_layers

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Module() for _ in range(4)])
            for layer in self.layers:
                layer.self_attn = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="not a Llama-family decoder layer"):
        add_hybrid_layers(Odd(), tiny_config())


def test_key_bias_is_converted_once_per_request():
    """The padding bias is built in the tokens' dtype, and, for a cache built under autocast, in autocast's
    dtype too: the same tensor at every later layer and step, 0 at real slow tokens, -inf at padding. Any
    other dtype is converted per call without changing the cache (a captured decoding step mutates nothing)."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = torch.zeros(2, 3, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = SlowCache(tokens=torch.randn(2, 3, 8), mask=mask)
    assert cache.bias(torch.float32) is cache.attn_bias
    converted = cache.bias(torch.bfloat16)
    assert converted.dtype == torch.bfloat16 and converted.shape == (2, 1, 1, 3)
    assert torch.equal(converted[:, 0, 0], expected)
    assert cache.bias(torch.bfloat16) is converted  # not converted again
    plain = SlowCache(tokens=torch.randn(2, 3, 8), mask=mask)  # built outside autocast
    state = dict(vars(plain))
    assert torch.equal(plain.bias(torch.bfloat16)[:, 0, 0], expected)
    assert plain.bias(torch.float16).dtype == torch.float16
    assert vars(plain).keys() == state.keys() and all(vars(plain)[k] is v for k, v in state.items())
    unpadded = SlowCache(tokens=torch.randn(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.bool))
    assert unpadded.bias(torch.bfloat16) is None  # nothing padded: no mask, SDPA's unmasked path
