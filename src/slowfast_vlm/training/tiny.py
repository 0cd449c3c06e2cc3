"""Write a tiny, random, offline setup to try the training pipeline on a CPU in a minute.

The LLM and encoder of the named config "tiny" (a 4-layer Qwen2 LLM, a 32 px SigLIP encoder), a
byte-level BPE tokenizer with ChatML tokens, a few short mp4 videos of a moving square, an image, and
`train.jsonl` (what `configs/tiny_cpu.yaml` reads):

    python -m slowfast_vlm.training.tiny outputs/tiny
    slowfast-vlm train configs/tiny_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM, SiglipVisionModel

from ..config import SlowFastConfig
from ..processing.video import write_video

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 40), "blue": (50, 80, 230)}
MOTIONS = {"right": (1, 0), "down": (0, 1)}


def moving_square(
    colour: tuple[int, int, int], motion: tuple[int, int], num_frames: int = 16, size: int = 32
):
    """`(T, size, size, 3)` frames of an 8 px square crossing a grey background."""
    frames = np.full((num_frames, size, size, 3), 90, dtype=np.uint8)
    for t in range(num_frames):
        x, y = (4 + motion[0] * t, 4 + motion[1] * t)
        frames[t, y : y + 8, x : x + 8] = colour
    return frames


def train_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with Qwen's ChatML special tokens:
    `<|endoftext|>` (id 0, padding), `<|im_start|>` (1), `<|im_end|>` (2, end of turn)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def write_tiny_setup(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the tiny models and data under `folder`; returns the paths (`llm`, `vision`, `data`, `media`)."""
    folder = Path(folder)
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    records = []
    for colour, rgb in COLOURS.items():
        for motion, step in MOTIONS.items():
            name = f"{colour}_{motion}.mp4"
            write_video(media / name, moving_square(rgb, step), fps=8)
            records.append(
                {
                    "id": f"{colour}_{motion}",
                    "video": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat moves in the video, and where?"},
                        {"from": "gpt", "value": f"A {colour} square moves {motion}."},
                    ],
                }
            )
    Image.fromarray(moving_square(COLOURS["red"], (0, 0), num_frames=1)[0]).save(media / "red.png")
    records.append(
        {
            "id": "red_image",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "What colour is the square?"},
                {"from": "gpt", "value": "The square is red."},
            ],
        }
    )
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    texts = ["You are a helpful assistant."] + [t["value"] for r in records for t in r["conversations"]]
    tokenizer = train_tokenizer(texts)
    config = SlowFastConfig.from_name(
        "tiny", text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 1024}
    )
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(config.text_config)
    llm.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    vision = SiglipVisionModel(config.vision_config)
    vision.save_pretrained(folder / "vision")
    return {
        "llm": str(folder / "llm"),
        "vision": str(folder / "vision"),
        "data": str(data),
        "media": str(media),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="outputs/tiny")
    print(json.dumps(write_tiny_setup(parser.parse_args().folder), indent=2))
