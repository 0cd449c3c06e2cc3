"""The inference module: the one device/dtype rule of `load_model` (auto: CUDA if available, else
the CPU; bfloat16 on a CUDA device that supports it, else float32), the model fitted to its
processor, chat prompts, and a reply checked against `generate` on a prompt written out literally."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import VOCAB, save_tiny_checkpoint, tiny_model, tiny_tokenizer, write_random_video

from slowfast_vlm import SlowFastProcessor, load_video
from slowfast_vlm.cli import main
from slowfast_vlm.inference import (
    answer,
    build_conversation,
    chat_prompt,
    compute_attention_map,
    load_model,
    reply,
    resolve_device,
    resolve_dtype,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture
def cuda(monkeypatch):
    """`cuda(available, bf16=True)`: pretend this machine has one CUDA device (or none)."""

    def pretend(available: bool, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(available))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)

    return pretend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("inference") / "model"
    model, processor = save_tiny_checkpoint(path)
    return path, model, processor


def test_auto_device_is_cuda_when_available_else_cpu(cuda):
    cuda(False)
    assert resolve_device("auto") == torch.device("cpu")
    cuda(True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda:0")) == torch.device("cuda:0")


def test_auto_dtype_is_bfloat16_on_a_gpu_that_supports_it_else_float32(cuda):
    cuda(False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "auto") is torch.float32
    cuda(True, bf16=True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "auto") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    cuda(True, bf16=False)
    assert resolve_dtype("auto", "cuda") is torch.float32
    # a named dtype is taken as is, on any device
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("bfloat16", "cuda") is torch.bfloat16
    assert resolve_dtype(torch.float64, "cpu") is torch.float64


def test_bad_devices_and_dtypes_are_value_errors(cuda):
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    cuda(False)
    with pytest.raises(ValueError, match="'cuda': this machine has 0 CUDA device"):
        resolve_device("cuda")
    cuda(True)
    with pytest.raises(ValueError, match="'cuda:1': this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_load_model_on_a_cpu_machine_gives_float32_in_eval_mode(checkpoint, cuda):
    cuda(False)
    model, processor = load_model(checkpoint[0])
    assert model.device == torch.device("cpu") and model.dtype is torch.float32
    assert not model.training
    assert isinstance(processor, SlowFastProcessor)
    model, _ = load_model(str(checkpoint[0]), "cpu", "bfloat16")
    assert model.dtype is torch.bfloat16


def test_load_model_fits_the_model_to_its_processor(tmp_path):
    # saved without `prepare_model`: the config's placeholder ids are not the tokenizer's, the
    # embeddings (VOCAB rows) are smaller than the tokenizer, and generate has no pad / eos ids
    model = tiny_model()
    processor = SlowFastProcessor.from_model_config(model.config, tiny_tokenizer())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert VOCAB < 302 and model.config.video_token_id != 300 and model.generation_config.pad_token_id is None

    loaded, _ = load_model(tmp_path, "cpu", "float32")
    # tiny_tokenizer: 300 tokens, <|endoftext|> (0) pads, <|im_end|> (2) ends a turn; the processor
    # adds <video> (300) and <image> (301)
    assert (loaded.config.video_token_id, loaded.config.image_token_id) == (300, 301)
    assert loaded.get_input_embeddings().num_embeddings >= 302
    assert (loaded.generation_config.pad_token_id, loaded.generation_config.eos_token_id) == (0, 2)


def test_conversations_put_the_visuals_in_the_first_question(checkpoint):
    _, _, processor = checkpoint
    conversation = build_conversation("Is there a dog?", [("What happens?", "A cat jumps.")])
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n"
        "<|im_start|>assistant\nA cat jumps.<|im_end|>\n"
        "<|im_start|>user\nIs there a dog?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt(processor, "Q?", num_videos=2, num_images=1) == (
        SYSTEM + "<|im_start|>user\n<video>\n<video>\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    # a question with its own placeholder gets none added
    assert chat_prompt(processor, "Before <video> after?") == (
        SYSTEM + "<|im_start|>user\nBefore <video> after?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_answer_is_greedy_generate_and_records_what_it_read(checkpoint, tmp_path):
    _, model, processor = checkpoint
    write_random_video(tmp_path / "clip.mp4", num_frames=8)
    frames, _ = load_video(tmp_path / "clip.mp4", 8, fps=8)
    result = answer(model, processor, frames, "What happens?", max_new_tokens=5)

    prompt = SYSTEM + "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[1]
    assert torch.equal(result.output, ids)
    assert result.text == processor.decode(ids[0, prompt_tokens:], skip_special_tokens=True).strip()
    assert (result.prompt_tokens, result.completion_tokens) == (prompt_tokens, ids.shape[1] - prompt_tokens)
    ended = ids[0, -1].item() == 2  # <|im_end|>
    assert result.finish_reason == ("stop" if ended or ids.shape[1] - prompt_tokens < 5 else "length")
    torch.testing.assert_close(result.video, inputs["pixel_values_videos"][0])

    attention = compute_attention_map(model, result.output, result.video)
    assert attention.per_layer.shape[1] == len(frames)  # a map over each of the 8 frames
    np.testing.assert_allclose(attention.per_frame.sum(), 1.0, rtol=1e-5)


def test_a_text_only_chat_has_no_video(checkpoint):
    _, model, processor = checkpoint
    conversation = [{"role": "user", "content": "Hello?"}]
    result = reply(model, processor, conversation, max_new_tokens=3)
    inputs = processor(
        text=SYSTEM + "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt"
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert result.video is None and torch.equal(result.output, ids)


def test_ask_loads_with_the_auto_rule(checkpoint, cuda, tmp_path, capsys):
    cuda(False)
    write_random_video(tmp_path / "clip.mp4", num_frames=4)
    args = ["ask", "--model", str(checkpoint[0]), str(tmp_path / "clip.mp4"), "q", "--max-new-tokens", "1"]
    assert main(args) == 0
    assert "on cpu (float32)" in capsys.readouterr().err


def test_load_model_in_a_fresh_process_warns_of_no_unknown_model_type(checkpoint):
    """Loading through `slowfast_vlm.inference` alone (no top-level name, which registers the Auto classes)
    must not make transformers' AutoTokenizer fall back to a bare config with a model-type warning."""
    path, _, _ = checkpoint
    code = f"from slowfast_vlm.inference import load_model; load_model({str(path)!r}, 'cpu', 'float32')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "to instantiate a model of type" not in result.stderr
