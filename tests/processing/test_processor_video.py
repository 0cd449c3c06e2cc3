"""`SlowFastProcessor.load_video`: a video decoded at the model's input size, the one helper the evaluator,
the lmms-eval plugin, training data, the serving runner and `ask` decode with."""

from __future__ import annotations

import numpy as np
from helpers import tiny_config, tiny_tokenizer

from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.processing.video import load_video, write_video


def test_frames_are_scaled_while_decoding_to_the_models_input_size(tmp_path):
    config = tiny_config()
    processor = SlowFastProcessor.from_model_config(config, tiny_tokenizer())
    path = tmp_path / "wide.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (12, 96, 160, 3), dtype=np.uint8)  # (T, H, W, 3)
    write_video(path, frames, 8)

    decoded, metadata = processor.load_video(path, 4, fps=4.0, sampling="uniform")
    side = config.vision_config.image_size  # siglip resizes to image_size x image_size
    assert decoded.shape == (4, side, round(side * 160 / 96), 3)
    direct, direct_metadata = load_video(path, 4, fps=4.0, sampling="uniform", short_side=side)
    np.testing.assert_array_equal(decoded, direct)
    assert metadata == direct_metadata
