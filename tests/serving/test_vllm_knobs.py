"""vLLM plugin: the slow branch's knobs, and the published geometry (5,184 slow and 1,296 fast tokens).

Runs inside the vLLM venv (`scripts/ci_vllm.sh`); skipped where vLLM is not importable.
"""

import os

import numpy as np
import pytest
from serving_helpers import chatml
from vllm_helpers import close_engine, greedy, make_engine, reference, save_checkpoint, vllm_request

pytest.importorskip("vllm", reason="vLLM is not installed here: run scripts/ci_vllm.sh (it builds its venv)")

PROMPT = chatml(("user", "What happens in this video?"))
TEXT_PROMPT = chatml(("user", "Describe a cat."), video=False)
# every knob away from its published value
KNOBS = {"cross_attn_queries": "all", "mask_system_tokens": True, "generated_tokens_see_slow": False}


def random_video(seed: int, num_frames: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def knobs_served(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-knobs") / "tiny-slowfast"
    model, processor = save_checkpoint(path, **KNOBS)
    engine = make_engine(path)
    yield model, processor, engine
    close_engine(engine)


def test_the_knobs_change_the_reference(knobs_served):
    """Guards the next test: the library answers differently with the knobs at their published values."""
    model, processor, _ = knobs_served
    video = random_video(4, 8)
    expected = reference(model, processor, PROMPT, video=video)
    published = {"cross_attn_queries": "text", "mask_system_tokens": False, "generated_tokens_see_slow": True}
    saved = {name: getattr(model.config, name) for name in published}
    model.config.update(published)
    try:
        assert reference(model, processor, PROMPT, video=video) != expected
    finally:
        model.config.update(saved)


def test_knobs_are_honoured_in_a_mixed_batch(knobs_served):
    model, processor, engine = knobs_served
    cases = [(PROMPT, random_video(4, 8)), (TEXT_PROMPT, None), (PROMPT, random_video(5, 12))]
    expected = [reference(model, processor, prompt, video=video) for prompt, video in cases]
    assert greedy(engine, [vllm_request(prompt, video=video) for prompt, video in cases]) == expected


def test_published_geometry_5184_slow_tokens(tmp_path):
    """64 frames of an 18 x 18 grid: 5,184 slow tokens in the cross-attention cache, 1,296 fast tokens in
    the prompt (`max_num_batched_tokens` must hold one item's encoder tokens: 8192)."""
    path = tmp_path / "tiny-slowfast-576"
    model, processor = save_checkpoint(path, vision_config={"image_size": 144})  # patch 8: 18 x 18
    video = random_video(6, 64, size=144)
    assert tuple(processor.frame_grid) == (18, 18) and processor.num_fast_tokens(64) == 1296  # 64 * 81 slow
    expected = reference(model, processor, PROMPT, video=video)
    engine = make_engine(path, max_model_len=2048, max_num_batched_tokens=8192, max_num_seqs=2)
    try:
        assert greedy(engine, [vllm_request(PROMPT, video=video)]) == [expected]
    finally:
        close_engine(engine)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel ranks need two cores")
def test_tensor_parallel_sharding_equals_generate(tmp_path, monkeypatch):
    """Two ranks (the kv heads, and the slow-token projection with them, split in two; the gate's input
    split and all-reduced) answer a mixed batch as the library does."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core a rank
    path = tmp_path / "tiny-slowfast"
    model, processor = save_checkpoint(path)
    cases = [(PROMPT, random_video(7, 12)), (TEXT_PROMPT, None), (PROMPT, random_video(8, 6))]
    expected = [reference(model, processor, prompt, video=video) for prompt, video in cases]
    assert len({tuple(answer) for answer in expected}) == len(cases)  # three different answers
    engine = make_engine(path, tensor_parallel_size=2)
    try:
        assert greedy(engine, [vllm_request(prompt, video=video) for prompt, video in cases]) == expected
    finally:
        close_engine(engine)
