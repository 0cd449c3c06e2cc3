"""The visual cache (encode once, ask many): its byte budget and LRU order; replies through it equal the
replies of the plain path (the processor's pixels, every token computed), which `test_inference` checks
against prompts written out literally; a follow-up turn continues the earlier turn's caches, encodes
nothing and gives the token ids of a full run of the whole conversation; and every case that cannot
continue exactly runs in full, counted."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint

from slowfast_vlm.inference import (
    build_conversation,
    compute_attention_map,
    encode_videos,
    generate_responses,
    load_model,
    reply,
)
from slowfast_vlm.modeling.model import EncodedVisual
from slowfast_vlm.visual_cache import VisualCache, frames_key

BIG = 2**30


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("visual_cache") / "model"
    save_tiny_checkpoint(path)
    return load_model(path, "cpu", "float32")


def video(seed: int, num_frames: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 32, 32, 3), dtype=np.uint8)


@contextmanager
def encoded_frames(model):
    """Yields a list that collects the number of frames of every vision-encoder call."""
    seen: list[int] = []
    handle = model.model.vision_tower.register_forward_hook(
        lambda module, args, out: seen.append(out.last_hidden_state.shape[0])  # (frames, patches, C)
    )
    try:
        yield seen
    finally:
        handle.remove()


def ids(reply_) -> list[int]:
    return reply_.output[0].tolist()


# ----- budget and order --------------------------------------------------------------------------------
def item(num_floats: int) -> EncodedVisual:
    """An entry of exactly 4 * num_floats bytes (float32 slow tokens, no fast tokens)."""
    return EncodedVisual(torch.zeros(num_floats, 1, 1), torch.zeros(0, 1))


def test_the_least_recently_used_entry_goes_first_and_the_budget_holds():
    cache = VisualCache(budget_bytes=400)
    cache.put("a", item(40))  # 160 bytes
    cache.put("b", item(40))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", item(40))  # 480 > 400: "b" goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 320 and cache.stats["evictions"] == 1
    cache.put("huge", item(101))  # 404 bytes: more than the whole budget, not kept, nothing evicted
    assert cache.get("huge") is None and cache.nbytes == 320 and len(cache) == 2
    assert cache.stats["visual_hits"] == 3 and cache.stats["visual_misses"] == 2


def test_a_zero_budget_keeps_nothing_and_a_negative_one_is_refused():
    cache = VisualCache(budget_bytes=0)
    cache.put("a", item(1))
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        VisualCache(-1)


def test_the_key_is_the_content_and_the_settings():
    frames = video(0)
    changed = frames.copy()
    changed[3, 5, 7, 1] ^= 1
    assert frames_key(frames, "s") == frames_key(frames.copy(), "s")
    assert len({frames_key(frames, "s"), frames_key(changed, "s"), frames_key(frames, "t")}) == 3
    assert frames_key(frames[:4], "s") != frames_key(frames, "s")


# ----- one turn ----------------------------------------------------------------------------------------
def test_a_reply_through_the_cache_equals_the_plain_reply_and_encodes_the_video_once(loaded):
    model, processor = loaded
    frames = video(1)
    conversation = build_conversation("What happens in this video?")
    plain = reply(model, processor, conversation, frames, max_new_tokens=8)
    cache = VisualCache(BIG)
    with encoded_frames(model) as seen:
        first = reply(model, processor, conversation, frames, max_new_tokens=8, visual_cache=cache)
        again = reply(model, processor, conversation, frames, max_new_tokens=8, visual_cache=cache)
    assert ids(first) == ids(again) == ids(plain) and first.text == plain.text
    assert seen == [len(frames)]
    assert cache.stats["visual_hits"] == 1 and cache.stats["visual_misses"] == 1
    assert isinstance(first.video, EncodedVisual) and first.video.slow.shape[0] == len(frames)


def test_a_batch_through_the_cache_equals_the_plain_batch_and_encodes_each_video_once(loaded):
    model, processor = loaded
    a, b = video(2), video(3, num_frames=4)
    questions = ["What happens?", "Is there a dog?", "Describe it."]
    prompts = [
        processor.apply_chat_template(build_conversation(q), add_generation_prompt=True) for q in questions
    ]
    plain = generate_responses(model, processor, prompts, [a, b, a], max_new_tokens=6, do_sample=False)
    cache = VisualCache(BIG)
    with encoded_frames(model) as seen:
        cached = generate_responses(
            model, processor, prompts, [a, b, a], max_new_tokens=6, do_sample=False, visual_cache=cache
        )
        generate_responses(
            model, processor, prompts[:1], [b], max_new_tokens=6, do_sample=False, visual_cache=cache
        )
    assert cached == plain
    assert sum(seen) == len(a) + len(b)  # "a" twice in the batch, "b" again later: each encoded once


def test_the_attention_map_of_an_encoded_video_equals_that_of_its_pixels(loaded):
    model, processor = loaded
    frames = video(4)
    conversation = build_conversation("Where is the cat?")
    plain = reply(model, processor, conversation, frames, max_new_tokens=4)
    cached = reply(model, processor, conversation, frames, max_new_tokens=4, visual_cache=VisualCache(BIG))
    from_pixels = compute_attention_map(model, plain.output, plain.video)
    from_encoded = compute_attention_map(model, cached.output, cached.video)
    torch.testing.assert_close(from_encoded.per_frame, from_pixels.per_frame)


# ----- conversations -----------------------------------------------------------------------------------
def test_follow_ups_continue_the_caches_and_equal_full_runs_of_the_whole_conversation(loaded):
    model, processor = loaded
    frames = video(5)
    cache = VisualCache(BIG)
    history: list[tuple[str, str]] = []
    previous = None
    for question in ("What happens in this video?", "Is there a dog?", "Describe it in detail."):
        conversation = build_conversation(question, history)
        with encoded_frames(model) as seen:
            turn = reply(model, processor, conversation, frames, max_new_tokens=8, visual_cache=cache)
        full = reply(model, processor, conversation, frames, max_new_tokens=8)  # no cache: every token
        assert ids(turn) == ids(full) and turn.text == full.text
        if previous is None:
            assert seen == [len(frames)] and turn.reused_tokens == 0
        else:
            # the whole earlier conversation but its last token, whose keys/values were never computed
            assert seen == [] and turn.reused_tokens == previous.output.shape[1] - 1
            assert ids(turn)[: turn.reused_tokens] == ids(previous)[: turn.reused_tokens]
        history.append((question, turn.text))
        previous = turn
    assert cache.stats["conversation_reuses"] == 2 and cache.stats["conversation_fallbacks"] == 0


def test_an_edited_answer_continues_from_the_common_prefix(loaded):
    model, processor = loaded
    frames = video(6)
    cache = VisualCache(BIG)
    first = reply(model, processor, build_conversation("What happens?"), frames, 8, visual_cache=cache)
    edited = build_conversation("Is there a dog?", [("What happens?", "A cat jumps over the fence.")])
    turn = reply(model, processor, edited, frames, max_new_tokens=8, visual_cache=cache)
    full = reply(model, processor, edited, frames, max_new_tokens=8)
    assert ids(turn) == ids(full)
    prompt_ids = processor(
        text=processor.apply_chat_template(edited, add_generation_prompt=True), videos=[frames]
    )
    prompt_ids = prompt_ids["input_ids"][0]
    common = next(i for i, (x, y) in enumerate(zip(prompt_ids, ids(first))) if x != y)
    assert (
        turn.reused_tokens
        == common
        > max(i for i, t in enumerate(prompt_ids) if t == processor.video_token_id)
    )


def test_another_video_or_a_model_whose_answers_do_not_read_the_video_runs_in_full(loaded, monkeypatch):
    model, processor = loaded
    cache = VisualCache(BIG)
    first = reply(model, processor, build_conversation("What happens?"), video(7), 8, visual_cache=cache)
    follow_up = build_conversation("Is there a dog?", [("What happens?", first.text)])
    other = reply(model, processor, follow_up, video(8), max_new_tokens=8, visual_cache=cache)
    assert other.reused_tokens == 0 and cache.stats["conversation_fallbacks"] == 1
    assert ids(other) == ids(reply(model, processor, follow_up, video(8), max_new_tokens=8))

    # answers generated without reading the slow tokens are not what a prompt's text computes
    monkeypatch.setattr(model.config, "generated_tokens_see_slow", False)
    cache = VisualCache(BIG)
    first = reply(model, processor, build_conversation("What happens?"), video(7), 8, visual_cache=cache)
    follow_up = build_conversation("Is there a dog?", [("What happens?", first.text)])
    turn = reply(model, processor, follow_up, video(7), max_new_tokens=8, visual_cache=cache)
    assert turn.reused_tokens == 0 and cache.stats["visual_hits"] == 1
    assert ids(turn) == ids(reply(model, processor, follow_up, video(7), max_new_tokens=8))


def test_conversations_count_toward_the_budget(loaded):
    model, processor = loaded
    frames = video(9)
    (encoded,), _ = encode_videos(model, processor, [frames])
    cache = VisualCache(budget_bytes=encoded.nbytes)  # room for the video, none for a conversation
    first = reply(model, processor, build_conversation("What happens?"), frames, 8, visual_cache=cache)
    follow_up = build_conversation("Is there a dog?", [("What happens?", first.text)])
    turn = reply(model, processor, follow_up, frames, max_new_tokens=8, visual_cache=cache)
    assert cache.nbytes <= cache.budget_bytes and turn.reused_tokens == 0
    assert cache.stats["visual_hits"] == 1 and cache.stats["conversation_fallbacks"] == 1
