"""Builders for training tests: frames, LLaVA-style records and data files, a tiny TrainConfig."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np

from slowfast_vlm.training import DataConfig, ModelConfig, TrainConfig

SLOWFAST_KNOBS = {"hybrid_every_n_layers": 2, "min_fast_frames": 2}  # hybrid layers 0 and 2, as tiny_config


def random_frames(num_frames: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    """`(T, size, size, 3)` uint8 frames: a flat random colour per frame plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(20, 236, (num_frames, 1, 1, 3))
    return np.clip(colours + rng.integers(-20, 20, (num_frames, size, size, 3)), 0, 255).astype(np.uint8)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def conversation(question: str, answer: str, placeholder: str = "") -> list[dict[str, str]]:
    return [{"from": "human", "value": placeholder + question}, {"from": "gpt", "value": answer}]


GOOD_RECORDS = [
    {"id": "cat", "video": "cat.mp4", "conversations": conversation("What happens in this video?", "A cat jumps over the fence.", "<image>\n")},
    {"id": "cook", "video": "cook.mp4", "conversations": conversation("Describe it in detail.", "The man is cooking pasta.")},
    {"id": "dog", "image": "dog.png", "conversations": conversation("Is there a dog in the image?", "Yes, a brown dog is sleeping.")},
    {"id": "text", "conversations": [{"role": "user", "content": "You are a helpful assistant."}, {"role": "assistant", "content": "A cat runs into the garden."}]},
]  # fmt: skip


def make_config(
    base_models: dict[str, str],
    data_file: Path,
    media_root: Path,
    output_dir: Path,
    stage: str = "stage1",
    training: dict | None = None,
    **data,
) -> TrainConfig:
    """A TrainConfig for the tiny models: 4 frames per video, fp32, no logging integrations."""
    return TrainConfig(
        model=ModelConfig(
            llm=base_models["llm"], vision=base_models["vision"], slowfast=dict(SLOWFAST_KNOBS)
        ),
        data=DataConfig(
            train=[str(data_file)], media_root=str(media_root), **{"num_frames": 4, "max_length": 256, **data}
        ),
        stage=stage,
        training={
            "output_dir": str(output_dir),
            "per_device_train_batch_size": 2,
            "max_steps": 4,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            "seed": 0,
            **(training or {}),
        },
    )


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
