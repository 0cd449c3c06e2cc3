"""Saving and loading: the model (safetensors, Auto classes, dtype, device_map) and the processor.

The model is saved with its cross-attention gates open, so that every hybrid parameter shapes the
logits: a parameter re-initialised on load would change them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import open_gates, tiny_config, tiny_model, tiny_tokenizer
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration, SlowFastModel
from slowfast_vlm.processing.processor import SlowFastProcessor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and its processor saved to one directory, plus a video + image input batch."""
    config = tiny_config()
    processor = SlowFastProcessor.from_model_config(config, tiny_tokenizer())
    model = processor.prepare_model(tiny_model(config))
    open_gates(model, 0.7)
    path = tmp_path_factory.mktemp("slowfast")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    rng = np.random.default_rng(0)
    inputs = processor(
        text=["<video>\nWhat happens?", "<image>\nWhat is this?"],
        videos=rng.integers(0, 256, (4, 24, 40, 3), dtype=np.uint8),
        images=Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)),
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    return path, model, processor, inputs, outputs


def test_safetensors_round_trip_is_bit_identical(saved):
    path, model, _, inputs, outputs = saved
    assert (path / "model.safetensors").exists()
    loaded, info = SlowFastForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = model.state_dict()
    reloaded = loaded.state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[name], original[name]) for name in original)
    with torch.no_grad():
        logits = loaded.eval()(**inputs).logits
    assert torch.equal(logits, outputs.logits)


def test_auto_classes_load_the_checkpoint(saved):
    path, _, _, inputs, outputs = saved
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, SlowFastConfig)
    assert config.video_token_id == 300 and config.image_token_id == 301

    generator = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert isinstance(generator, SlowFastForConditionalGeneration)
    base = AutoModel.from_pretrained(path).eval()
    assert isinstance(base, SlowFastModel)
    with torch.no_grad():
        assert torch.equal(generator(**inputs).logits, outputs.logits)
        assert torch.equal(base(**inputs).last_hidden_state, outputs.hidden_states[-1])


def test_dtype_bfloat16_is_honoured(saved):
    path, model, _, inputs, _ = saved
    loaded = SlowFastForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    # the weights are the saved ones, rounded
    original = dict(model.named_parameters())
    assert all(torch.equal(p, original[name].to(torch.bfloat16)) for name, p in loaded.named_parameters())
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_device_map_cpu(saved):
    path, _, _, inputs, outputs = saved
    loaded = SlowFastForConditionalGeneration.from_pretrained(path, device_map="cpu").eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, outputs.logits)


def test_processor_round_trip(saved):
    path, _, processor, _, _ = saved
    loaded = AutoProcessor.from_pretrained(path)
    assert isinstance(loaded, SlowFastProcessor)
    assert loaded.frame_grid == processor.frame_grid == (4, 4)
    for name in ("video_pooling_stride", "fast_temporal_pooling_stride", "min_fast_frames", "video_token_id"):
        assert getattr(loaded, name) == getattr(processor, name)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert loaded.apply_chat_template(conversation, add_generation_prompt=True) == prompt

    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (n, 18, 30, 3), dtype=np.uint8) for n in (3, 6)]
    image = rng.integers(0, 256, (16, 26, 3), dtype=np.uint8)
    kwargs = dict(
        text=[prompt, "<image> and <video>"], videos=videos, images=image, padding=True, return_tensors="pt"
    )
    expected, actual = processor(**kwargs), loaded(**kwargs)
    assert torch.equal(actual["input_ids"], expected["input_ids"])
    assert torch.equal(actual["attention_mask"], expected["attention_mask"])
    assert torch.equal(actual["pixel_values"], expected["pixel_values"])
    assert all(
        torch.equal(a, b) for a, b in zip(actual["pixel_values_videos"], expected["pixel_values_videos"])
    )
