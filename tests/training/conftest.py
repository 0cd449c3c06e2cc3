"""Fixtures for training tests: tiny base models saved to disk, real mp4 videos, LLaVA-style data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from PIL import Image
from training_helpers import random_frames
from transformers import AutoModel, AutoModelForCausalLM

from slowfast_vlm.processing.video import write_video

TOKENIZER_VOCAB = 300  # tiny_tokenizer's size before the processor adds <video> / <image>


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> dict[str, str]:
    """A tiny Qwen2 causal LM (vocab 300), a SigLIP vision model and the tokenizer, saved locally."""
    folder = tmp_path_factory.mktemp("base")
    config = tiny_config()
    text_config = config.text_config
    text_config.vocab_size = TOKENIZER_VOCAB
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(folder / "llm")
    tiny_tokenizer().save_pretrained(folder / "llm")
    AutoModel.from_config(config.vision_config).save_pretrained(folder / "vision")
    return {"llm": str(folder / "llm"), "vision": str(folder / "vision")}


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    """Two 8-frame videos, a corrupt one, and an image."""
    folder = tmp_path_factory.mktemp("media")
    write_video(folder / "cat.mp4", random_frames(seed=1), fps=8)
    write_video(folder / "cook.mp4", random_frames(seed=2), fps=8)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(
        folder / "dog.png"
    )
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
