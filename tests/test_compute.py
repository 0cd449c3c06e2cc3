"""The analytical FLOP and memory counts of `slowfast_vlm.compute` against independent references:
torch's `FlopCounterMode` on the real modules, closed forms, and Qwen2-7B's published parameter count."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration, add_hybrid_layers
from slowfast_vlm.cli import main as cli_main
from slowfast_vlm.compute import count_parameters, estimate, vision_encoder_flops
from slowfast_vlm.named_configs import NAMED_CONFIGS
from slowfast_vlm.transformers_compat import cache_field, cache_of

VIDEO_TOKEN = 255
FRAMES, PROMPT_BEFORE, PROMPT_AFTER = 8, 5, 7


def tiny_config(**overrides) -> SlowFastConfig:
    """The named config "tiny-qwen2-convnext" (GQA 4/2, hybrid layers 0 and 2, a 4 x 4 grid) with a 3-block
    ConvNeXt, temporal pooling 2, Qwen2's own context length, and a vocabulary of 256 (ids 0..199 are text)."""
    config = SlowFastConfig.from_name(
        "tiny-qwen2-convnext",
        text_config={"vocab_size": 256, "max_position_embeddings": 32768},
        vision_config={"depths": [1, 2]},
        fast_temporal_pooling_stride=2,
        video_token_id=VIDEO_TOKEN,
        image_token_id=None,
        **overrides,
    )
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    return config


def counted(fn) -> FlopCounterMode:
    # On CPU, SDPA's fused kernel is invisible to FlopCounterMode; the math backend decomposes into matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter


def module_flops(counter: FlopCounterMode, *names: str) -> int:
    counts = counter.get_flop_counts()
    return sum(sum(counts[name].values()) for name in names)


@pytest.mark.parametrize("queries", ["text", "all"])
def test_slowfast_prefill_and_decode_match_flop_counter_on_real_model(queries):
    config = tiny_config(cross_attn_queries=queries)
    torch.manual_seed(0)
    model = SlowFastForConditionalGeneration(config).eval()
    record = estimate(config, FRAMES, PROMPT_BEFORE + PROMPT_AFTER, "slowfast")
    # 8 frames of a 4x4 grid pooled 2x2 -> 8 * 4 slow tokens; temporal pooling 2 -> 4 fast frames.
    assert (record.slow_tokens, record.fast_tokens) == (32, 16)
    input_ids = torch.cat(
        [
            torch.randint(0, 200, (1, PROMPT_BEFORE)),
            torch.full((1, record.fast_tokens), VIDEO_TOKEN),
            torch.randint(0, 200, (1, PROMPT_AFTER)),
        ],
        dim=1,
    )
    video = torch.randn(1, FRAMES, 3, 32, 32)
    outputs = {}

    def prefill():
        with torch.no_grad():  # `generate` computes the prefill logits of the last position only
            outputs["prefill"] = model(
                input_ids=input_ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1
            )

    counter = counted(prefill)
    root = "SlowFastForConditionalGeneration"
    llm = module_flops(counter, f"{root}.model.language_model", f"{root}.lm_head")
    vision = module_flops(counter, f"{root}.model.vision_tower", f"{root}.model.multi_modal_projector")
    assert llm == pytest.approx(record.llm_prefill_flops, rel=0.02)
    assert vision == pytest.approx(record.vision_flops, rel=0.02)
    assert counter.get_total_flops() == llm + vision  # nothing else in the model does matmuls

    # The parts, layer by layer. Matmul FLOPs are exact integers, so these agree to the FLOP; the
    # small terms (the gate) would hide inside a 2% tolerance. Layers 0 and 2 are hybrid, 1 and 3 plain.
    layer = f"{root}.model.language_model.layers"
    assert 4 * module_flops(counter, f"{layer}.1.self_attn") == record.prefill_self_attention_flops
    assert (
        2 * (module_flops(counter, f"{layer}.0.self_attn") - module_flops(counter, f"{layer}.1.self_attn"))
        == record.prefill_hybrid_flops
    )
    assert module_flops(counter, *(f"{layer}.{i}.mlp" for i in range(4))) == record.prefill_mlp_flops
    assert module_flops(counter, f"{root}.lm_head") == record.prefill_lm_head_flops

    # One decoding step: the generated token reads the cached slow keys/values (no re-projection).
    prefill_out = outputs["prefill"]

    def decode():
        with torch.no_grad():
            model(
                input_ids=torch.tensor([[3]]),
                **cache_field(cache_of(prefill_out)),
                slow_cache=prefill_out.slow_cache,
                use_cache=True,
                logits_to_keep=1,
            )

    assert counted(decode).get_total_flops() == pytest.approx(record.decode_flops_per_token, rel=0.02)


def test_self_attention_prefill_matches_flop_counter_on_plain_llm():
    # The self-attention design: the same LLM with no hybrid layers (SlowFastConfig cannot express
    # "none"), every slow token in the sequence.
    config = tiny_config()
    record = estimate(config, FRAMES, PROMPT_BEFORE + PROMPT_AFTER, "self-attention")
    assert record.sequence_length == PROMPT_BEFORE + PROMPT_AFTER + 32
    llm = AutoModelForCausalLM.from_config(config.text_config).eval()
    embeds = torch.randn(1, record.sequence_length, 64)
    with torch.no_grad():
        counter = counted(lambda: llm(inputs_embeds=embeds, logits_to_keep=1))
    assert counter.get_total_flops() == pytest.approx(record.llm_prefill_flops, rel=0.02)


@pytest.mark.parametrize(
    "vision_config",
    [
        dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=32, patch_size=8),
        dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=32, patch_size=8),
        dict(model_type="convnextv2", hidden_sizes=[8, 16, 24], depths=[1, 1, 2], num_stages=3, patch_size=2,
             image_size=32),
    ],
    ids=["siglip-with-head", "clip", "convnextv2"],
)  # fmt: skip
def test_vision_encoder_flops_match_flop_counter(vision_config):
    vision = AutoConfig.for_model(**vision_config)
    encoder = AutoModel.from_config(vision).eval()
    pixels = torch.randn(1, 3, 32, 32)
    # Gradients on: under no_grad, nn.MultiheadAttention (SigLIP's pooling head) takes a fused fast
    # path that FlopCounterMode cannot see; the FLOPs are the same.
    counter = counted(lambda: encoder(pixel_values=pixels, output_hidden_states=True))
    assert counter.get_total_flops() == vision_encoder_flops(vision)  # exact: only matmuls and convs


# ----- 7B geometry on the meta device -------------------------------------------------------------
# The full model forward cannot run on meta tensors: it locates placeholders with `input_ids.tolist()`
# and sizes the cross-attention with `int(query_mask.sum())`, which need real values. So the 7B check
# runs the real decoder (self-attention, MLPs, LM head) on meta `inputs_embeds`, and adds the hybrid
# branch's real modules (slow key/value projection, gate) and its scaled_dot_product_attention at the
# shapes `HybridAttention.cross_attention` gives them. Checked at the paper's headline pair:
# self-attention at 16 frames and slow-fast s2t4 at 128 frames.


def test_7b_headline_prefill_matches_flop_counter_on_meta():
    config = SlowFastConfig.from_name("reference-7b-s2t4")
    config.text_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)

    def decoder(length: int) -> int:
        embeds = torch.empty(1, length, 3584, device="meta")
        return counted(lambda: llm(inputs_embeds=embeds, logits_to_keep=1)).get_total_flops()

    baseline = estimate(config, 16, 64, "self-attention")
    assert decoder(baseline.sequence_length) == pytest.approx(baseline.llm_prefill_flops, rel=0.02)

    record = estimate(config, 128, 64, "slowfast")
    add_hybrid_layers(llm.model, config)  # without slow tokens, the hybrid layers run self-attention only
    hybrid = llm.model.layers[0].self_attn
    slow = torch.empty(1, record.slow_tokens, 3584, device="meta")  # (B, N, D)
    queries = torch.empty(1, 28, record.query_tokens, 128, device="meta")  # (B, H, Q, hd)
    attn_output = torch.empty(1, record.query_tokens, 28 * 128, device="meta")  # (B, Q, H*hd)
    key_mask = torch.ones(1, 1, 1, record.slow_tokens, dtype=torch.bool, device="meta")

    def branch():
        key, value = hybrid.project_slow(slow)
        key, value = (
            repeat_kv(key, hybrid.num_key_value_groups),
            repeat_kv(value, hybrid.num_key_value_groups),
        )
        F.scaled_dot_product_attention(queries, key, value, attn_mask=key_mask, scale=hybrid.scaling)
        hybrid.cross_attn_gate_proj(attn_output)

    total = (
        decoder(record.sequence_length) + len(config.hybrid_layer_indices) * counted(branch).get_total_flops()
    )
    assert total == pytest.approx(record.llm_prefill_flops, rel=0.02)


# ----- memory --------------------------------------------------------------------------------------
def test_7b_parameters_and_caches_match_closed_forms():
    config = SlowFastConfig.from_name("reference-7b")
    parameters = count_parameters(config)
    assert parameters.llm == 7_615_616_512  # Qwen2-7B-Instruct's published size (15,231,233,024 bf16 bytes)
    # 4 hybrid layers: kv projection 3584 -> 2 * 4 * 128 with bias, gate Linear(28 * 128, 1), warm-up scalar
    assert parameters.cross_attention == 4 * (3584 * 1024 + 1024 + 3584 + 1 + 1)
    slowfast = estimate(config, 64, 64, "slowfast", parameters=parameters)
    baseline = estimate(config, 64, 64, "self-attention", parameters=parameters)
    assert slowfast.parameters - baseline.parameters == parameters.cross_attention
    # bf16 keys and values of 28 layers x 4 kv heads x 128 = 57,344 bytes per token
    assert slowfast.kv_cache_bytes == 57_344 * (64 + 16 * 81)
    assert baseline.kv_cache_bytes == 57_344 * (64 + 64 * 81)
    assert slowfast.slow_kv_cache_bytes == 4 * 2 * 4 * 128 * 2 * 64 * 81
    assert (
        estimate(config, 64, 64, "slowfast", "float32", parameters).parameter_bytes == 4 * slowfast.parameters
    )


# ----- CLI -----------------------------------------------------------------------------------------
def run_cli(capsys, *args: str) -> list[dict]:
    assert cli_main(["flops", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_records_and_set_override(capsys):
    records = run_cli(capsys, "--frames", "64", "128", "--prompt-tokens", "64")
    assert [(r["design"], r["frames"]) for r in records] == [
        ("slowfast", 64),
        ("self-attention", 64),
        ("slowfast", 128),
        ("self-attention", 128),
    ]
    for field in (
        "fast_tokens",
        "slow_tokens",
        "llm_prefill_flops",
        "vision_flops",
        "decode_flops_per_token",
    ):
        assert all(isinstance(r[field], int) for r in records), field
    s1t4_64, s1t4_128 = records[0], records[2]
    assert s1t4_128["fast_tokens"] == 128 // 4 * 81

    # Temporal sampling stride 2 keeps 64 of 128 frames before pooling by 4: 16 fast frames, as at 64 frames.
    (s2t4_128,) = run_cli(
        capsys, "--frames", "128", "--design", "slowfast", "--set", "fast_temporal_sampling_stride=2"
    )
    assert s2t4_128["fast_tokens"] == s1t4_128["fast_tokens"] // 2 == s1t4_64["fast_tokens"]
    assert s2t4_128["slow_tokens"] == 128 * 81
    # Same sequence as 64 frames s1t4, so only the hybrid branch grows: 5184 more slow tokens to project
    # (3584 -> 1024) and to attend to from the 64 prompt tokens (28 heads x 128), in 4 layers.
    extra = 4 * (2 * 5184 * 3584 * 1024 + 2 * 2 * 28 * 64 * 5184 * 128)
    assert s2t4_128["llm_prefill_flops"] - s1t4_64["llm_prefill_flops"] == extra


def test_cli_table_and_saved_config(tmp_path, capsys):
    tiny_config().save_pretrained(tmp_path)
    assert cli_main(["flops", "--config", str(tmp_path), "--frames", "8", "--prompt-tokens", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["design", "frames", "fast", "slow", "seq"]
    assert lines[1].split()[:5] == ["slowfast", "8", "16", "32", "28"]
    assert lines[2].split()[:5] == ["self-attention", "8", "0", "32", "44"]


def test_cli_presets_are_the_named_configs(capsys):
    with pytest.raises(SystemExit):
        cli_main(["flops", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens too
    assert all(name in help_text for name in NAMED_CONFIGS)
    (record,) = run_cli(capsys, "--preset", "tiny-llama-convnext", "--frames", "8", "--design", "slowfast")
    # 8 frames of a 4 x 4 grid pooled 2x2; temporal pooling 4 -> 2 fast frames
    assert (record["slow_tokens"], record["fast_tokens"]) == (8 * 4, 2 * 4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "no_such_field=1"], "no field 'no_such_field'"),
        (["--set", "video_pooling_stride=0"], "video_pooling_stride must be an integer >= 1"),
        (["--preset", "nope"], "--preset 'nope' is unknown"),
        (["--frames", "0"], "frames must be an integer >= 1"),
    ],
)
def test_cli_bad_input_names_the_problem(capsys, args, message):
    assert cli_main(["flops", *args]) == 2
    assert message in capsys.readouterr().err
