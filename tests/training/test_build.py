"""Building a model to train: pretrained weights land where they belong, the cross K/V start from the
loaded k_proj/v_proj, a fresh model computes what the base LLM computes; components, presets, LoRA."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM
from transformers.utils import is_peft_available

from slowfast_vlm import SlowFastForConditionalGeneration
from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.training.build import (
    ModelConfig,
    build_model,
    component_parameters,
    learning_rates,
    merge_lora,
    set_trainable,
)

KV_HEADS, HEAD_DIM = 2, 16  # tiny_config: 64 wide, 4 heads, 2 kv heads


@pytest.fixture(scope="module")
def built(base_models):
    torch.manual_seed(0)
    model, processor = build_model(
        ModelConfig(
            llm=base_models["llm"], vision=base_models["vision"], slowfast={"hybrid_every_n_layers": 2}
        )
    )
    return model, processor


def test_pretrained_weights_are_copied(built, base_models):
    model, _ = built
    llm = AutoModelForCausalLM.from_pretrained(base_models["llm"])
    ours = model.model.language_model.state_dict()
    for name, value in llm.model.state_dict().items():
        if name == "embed_tokens.weight":  # resized for <video> / <image>: the first 300 rows are the LLM's
            assert torch.equal(ours[name][:300], value)
        else:
            assert torch.equal(ours[name], value), name
    assert torch.equal(model.lm_head.weight[:300], llm.lm_head.weight)
    for name, value in AutoModel.from_pretrained(base_models["vision"]).state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name


def test_cross_kv_starts_from_the_loaded_k_and_v_projections(built, base_models):
    model, _ = built
    llm_state = AutoModelForCausalLM.from_pretrained(base_models["llm"]).state_dict()
    assert model.config.hybrid_layer_indices == [0, 2]
    for index in (0, 2):
        kv = model.model.language_model.layers[index].self_attn.cross_attn_kv_proj
        for head in range(KV_HEADS):  # rows laid out (head, [key | value], head_dim)
            for slot, proj in enumerate(("k_proj", "v_proj")):
                rows = slice((2 * head + slot) * HEAD_DIM, (2 * head + slot + 1) * HEAD_DIM)
                source = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                prefix = f"model.layers.{index}.self_attn.{proj}"
                assert torch.equal(kv.weight[rows], llm_state[f"{prefix}.weight"][source])
                assert torch.equal(kv.bias[rows], llm_state[f"{prefix}.bias"][source])
        gate = model.model.language_model.layers[index].self_attn.cross_attn_warm_up_gate
        assert gate.item() == 0.0


def test_fresh_model_computes_what_the_base_llm_computes(built, base_models):
    model, processor = built
    llm = AutoModelForCausalLM.from_pretrained(base_models["llm"]).eval()
    input_ids = torch.tensor([processor.tokenizer("A cat jumps over the fence.")["input_ids"]])
    with torch.no_grad():
        ours = model.eval()(input_ids=input_ids).logits[..., :300]
        reference = llm(input_ids=input_ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_tokenizer_placeholders_and_embeddings_fit(built):
    model, processor = built
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 302 == model.get_input_embeddings().num_embeddings == model.lm_head.out_features
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<video>")
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert isinstance(processor, SlowFastProcessor) and processor.frame_grid == (4, 4)


def test_continue_from_a_slow_fast_checkpoint(built, tmp_path):
    model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = build_model(ModelConfig(init_from=str(tmp_path)))
    assert isinstance(loaded, SlowFastForConditionalGeneration)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_build_needs_a_source():
    with pytest.raises(ValueError, match="init_from .* or both llm and vision"):
        build_model(ModelConfig(llm="somewhere"))
    with pytest.raises(ValueError, match="model.dtype"):
        build_model(ModelConfig(init_from="x", dtype="float99"))


def test_base_checkpoints_that_do_not_fit_are_refused_by_name(base_models, tmp_path):
    """A base LLM lacking a weight the slow-fast model needs, and one stored as .bin, each give one line."""
    llm = tmp_path / "llm"
    shutil.copytree(base_models["llm"], llm)
    weights = load_file(llm / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, llm / "model.safetensors")
    config = ModelConfig(llm=str(llm), vision=base_models["vision"])
    with pytest.raises(
        ValueError,
        match=r"model.llm: the checkpoint lacks the weights \['model.language_model.norm.weight'\]",
    ):
        build_model(config)
    (llm / "model.safetensors").unlink()
    torch.save(weights, llm / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=rf"model.llm: {llm} holds .bin weights; the build reads safetensors only"
    ):
        build_model(config)


def test_new_parameters_are_the_same_draws_in_bf16_as_in_fp32(base_models):
    """A bf16 build (as under ZeRO-3 in bf16) gets an fp32 build's new parameters, rounded."""
    config = dict(llm=base_models["llm"], vision=base_models["vision"], slowfast={"hybrid_every_n_layers": 2})
    fp32, _ = build_model(ModelConfig(**config), seed=5)
    bf16, _ = build_model(ModelConfig(**config, dtype="bfloat16"), seed=5)
    new = [
        n for n, _ in fp32.named_parameters() if "multi_modal_projector" in n or "cross_attn_gate_proj" in n
    ]
    assert len(new) == 4 + 2 * 2  # projector: 2 linear layers; gate projection of hybrid layers 0 and 2
    reference, ours = dict(fp32.named_parameters()), dict(bf16.named_parameters())
    for name in new:
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], reference[name].to(torch.bfloat16)), name


# ----- components and presets ------------------------------------------------------------------------
def test_every_parameter_belongs_to_one_component(built):
    model, _ = built
    components = component_parameters(model)
    names = {c: {n for n, _ in params} for c, params in components.items()}
    all_names = {n for n, _ in model.named_parameters()}
    assert set.union(*names.values()) == all_names and sum(map(len, names.values())) == len(all_names)
    assert names["vision"] == {n for n in all_names if n.startswith("model.vision_tower.")}
    assert names["projector"] == {n for n in all_names if n.startswith("model.multi_modal_projector.")}
    cross = {n for n in all_names if ".cross_attn_" in n}
    assert names["cross_attention"] == cross and len(cross) == 2 * 5  # kv w+b, gate w+b, warm-up gate
    assert "lm_head.weight" in names["llm"] and "model.language_model.norm.weight" in names["llm"]


def test_presets_are_the_published_recipe():
    assert learning_rates("stage1") == {"projector": 1e-3, "cross_attention": 2e-4}
    assert learning_rates("stage2") == {"llm": 2e-5, "projector": 2e-5, "cross_attention": 2e-5}
    assert learning_rates("stage1", {"cross_attention": None, "vision": 1e-5}) == {
        "projector": 1e-3,
        "vision": 1e-5,
    }
    with pytest.raises(ValueError, match="no component is trained"):
        learning_rates("custom")
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['decoder'\]"):
        learning_rates("custom", {"decoder": 1e-4})
    with pytest.raises(ValueError, match="stage must be one of"):
        learning_rates("stage3")


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_set_trainable_follows_the_preset(built, stage):
    model, _ = built
    rates = learning_rates(stage)
    set_trainable(model, rates)
    for component, params in component_parameters(model).items():
        assert all(p.requires_grad == (component in rates) for _, p in params), component


@pytest.mark.skipif(not is_peft_available(), reason="peft is not installed")
def test_lora_trains_adapters_only_and_merges_back(base_models):
    torch.manual_seed(0)
    model, processor = build_model(
        ModelConfig(
            llm=base_models["llm"],
            vision=base_models["vision"],
            slowfast={"hybrid_every_n_layers": 2},
            lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        )
    )
    set_trainable(model, learning_rates("stage2"))
    trained_llm = [n for n, p in component_parameters(model)["llm"] if p.requires_grad]
    assert trained_llm and all("lora_" in n for n in trained_llm)
    assert not any("lora_" in n for n in dict(model.model.vision_tower.named_parameters()))
    assert not any("cross_attn" in n and "lora_" in n for n, _ in model.named_parameters())
    input_ids = torch.tensor([processor.tokenizer("A cat jumps.")["input_ids"]])
    with torch.no_grad():
        plain = model.eval()(input_ids=input_ids).logits  # lora_B starts at zero
        for name, param in model.named_parameters():  # non-zero adapters, so that merging folds something in
            if "lora_B" in name:
                param.normal_(std=0.1)
        before = model.eval()(input_ids=input_ids).logits
        merge_lora(model)
        after = model(input_ids=input_ids).logits
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert not torch.allclose(before, plain, atol=1e-3)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
