"""Generation: cached decoding equals recomputing the whole sequence, slow K/V projected once."""

import pytest
import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_model
from torch._inductor.compile_fx import compile_fx

from slowfast_vlm import fast_token_count
from slowfast_vlm.modeling.slow_tokens import query_positions


def prompt(model, frames, before=(3, 4), after=(5, 6, 7)):
    count = fast_token_count(frames, model.model.visual_grid(frames), model.config)
    return list(before) + [VIDEO_TOKEN_ID] * count + list(after)


def recompute_greedy(model, ids, video, steps, see_slow):
    """Greedy decoding without any cache: the whole sequence is run again at every step.

    Which positions read the slow tokens is spelled out: the prompt's text positions, plus the
    generated positions only when `see_slow`.
    """
    prompt_queries = query_positions(model.model.placeholder_mask(ids), None, model.config)
    sequence, logits = ids, []
    for _ in range(steps):
        generated = sequence.shape[1] - ids.shape[1]
        queries = torch.cat([prompt_queries, torch.full((1, generated), see_slow)], dim=1)
        with torch.no_grad():
            out = model(
                input_ids=sequence, pixel_values_videos=video, slow_query_mask=queries, use_cache=False
            )
        logits.append(out.logits[:, -1])
        sequence = torch.cat([sequence, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence, torch.stack(logits, 1)


@pytest.mark.parametrize("see_slow", [True, False])
@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_cached_greedy_equals_recompute(see_slow, llm):
    model = tiny_model(llm=llm, generated_tokens_see_slow=see_slow, seed=10)
    open_gates(model)
    ids, video = torch.tensor([prompt(model, 8)]), torch.randn(1, 8, 3, 32, 32)
    out = model.generate(
        input_ids=ids,
        pixel_values_videos=video,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected_ids, expected_logits = recompute_greedy(model, ids, video, 6, see_slow)
    assert torch.equal(out.sequences, expected_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, rtol=1e-4, atol=1e-5)


def test_generated_tokens_see_slow_switch_matters():
    logits = {}
    for see_slow in (True, False):
        model = tiny_model(generated_tokens_see_slow=see_slow, seed=11)
        open_gates(model)
        ids, video = (
            torch.tensor([prompt(model, 8)]),
            torch.randn(1, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        )
        out = model.generate(
            input_ids=ids,
            pixel_values_videos=video,
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits[see_slow] = torch.stack(out.logits, 1)
    torch.testing.assert_close(logits[True][:, 0], logits[False][:, 0])  # the prefill step is the same
    assert not torch.allclose(logits[True][:, 1:], logits[False][:, 1:])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_equals_uncached_generate(num_beams):
    """Greedy and beam search: `use_cache=True` gives what recomputing everything gives."""
    model = tiny_model(seed=12)
    open_gates(model)
    video = torch.randn(2, 8, 3, 32, 32)
    ids = torch.tensor([prompt(model, 8), prompt(model, 8, before=(9, 10))])
    kwargs = dict(
        input_ids=ids, pixel_values_videos=video, max_new_tokens=5, do_sample=False, num_beams=num_beams
    )
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))


def left_padded_batch(model):
    """Three left-padded prompts: videos of 4 and 12 frames (padded slow tokens), and text only."""
    torch.manual_seed(1)
    videos = [torch.randn(4, 3, 32, 32), torch.randn(12, 3, 32, 32)]
    prompts = [prompt(model, 4), prompt(model, 12, before=(2,)), [20, 21, 22]]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return prompts, videos, {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": videos}


def test_left_padded_batch_generation_equals_each_alone():
    model = tiny_model(seed=13)
    open_gates(model)
    prompts, videos, inputs = left_padded_batch(model)
    width = inputs["input_ids"].shape[1]
    batched = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for i, p in enumerate(prompts):
        visual = {"pixel_values_videos": [videos[i]]} if i < 2 else {}
        alone = model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, **visual)
        assert torch.equal(batched[i, width:], alone[0, len(p) :])


@pytest.mark.slow  # inductor compiles C++ (about a minute on 2 cores)
def test_compiled_decoding_step_gives_eager_tokens():
    """The slow branch of a decoding step compiles to one graph with inductor (`fullgraph`: a host
    synchronisation or a data-dependent shape would break it), and generation with it compiled yields
    eager's tokens, on a batch with padded slow tokens and a sample without any."""
    model = tiny_model(seed=13)
    open_gates(model)
    _, _, inputs = left_padded_batch(model)
    eager = model.generate(**inputs, max_new_tokens=6, do_sample=False)

    graphs = []

    def inductor(graph, example_inputs):
        graphs.append(graph)
        return compile_fx(graph, example_inputs)

    torch._dynamo.reset()
    try:
        for layer in model.hybrid_attentions:
            layer.decoding_cross_attention = torch.compile(
                layer.decoding_cross_attention, backend=inductor, fullgraph=True, dynamic=False
            )
        compiled = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        torch._dynamo.reset()
    assert graphs  # the compiled decoding path ran
    assert torch.equal(compiled, eager)


def test_vision_and_slow_projection_run_once_per_request():
    model = tiny_model(seed=14, vision_frame_chunk_size=100)
    open_gates(model)
    calls = {"vision": 0, "kv": 0}
    model.model.vision_tower.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
    )
    for layer in model.hybrid_attentions:
        layer.cross_attn_kv_proj.register_forward_hook(lambda *a: calls.__setitem__("kv", calls["kv"] + 1))
    model.generate(
        input_ids=torch.tensor([prompt(model, 8)]),
        pixel_values_videos=torch.randn(1, 8, 3, 32, 32),
        max_new_tokens=6,
        do_sample=False,
    )
    assert calls == {"vision": 1, "kv": len(model.hybrid_attentions)}

    # re-projection at every step (the reference's decoding cost) when caching is switched off
    calls.update(vision=0, kv=0)
    model.generate(
        input_ids=torch.tensor([prompt(model, 8)]),
        pixel_values_videos=torch.randn(1, 8, 3, 32, 32),
        max_new_tokens=6,
        do_sample=False,
        cache_slow_kv=False,
        min_new_tokens=6,
    )
    assert calls == {"vision": 1, "kv": 6 * len(model.hybrid_attentions)}


def test_sampling_runs_and_respects_seed():
    model = tiny_model(seed=15)
    ids, video = torch.tensor([prompt(model, 4)]), torch.randn(1, 4, 3, 32, 32)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(
            model.generate(
                input_ids=ids,
                pixel_values_videos=video,
                max_new_tokens=5,
                do_sample=True,
                temperature=1.5,
                top_k=0,
            )
        )
    assert torch.equal(runs[0], runs[1])
