"""The package speaks the installed transformers' own names: the KV cache goes in and comes out under
them, and nothing transformers has deprecated is passed to it (CI runs this at both ends of the range)."""

import torch
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_model
from transformers import Cache

from slowfast_vlm import fast_token_count
from slowfast_vlm.transformers_compat import CACHE_NAME, allow_indexed_cpu_map_location, cache_field, cache_of


def deprecated(messages: list[str]) -> list[str]:
    return [m for m in messages if "deprecat" in m.lower() or "past_key_values" in m]


def test_cache_round_trip_and_generate_use_no_deprecated_name(transformers_deprecations):
    model = tiny_model(seed=10)
    open_gates(model)
    count = fast_token_count(8, model.model.visual_grid(8), model.config)
    ids = torch.tensor([[3, 4, *[VIDEO_TOKEN_ID] * count, 5, 6]])
    video = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        prefill = model(input_ids=ids, pixel_values_videos=video, use_cache=True)
        kv_cache = cache_of(prefill)
        assert isinstance(kv_cache, Cache) and kv_cache.get_seq_length() == ids.shape[1]
        assert getattr(prefill, CACHE_NAME) is kv_cache
        # One step with the cache passed back equals the last position of the whole sequence run anew.
        next_id = prefill.logits[:, -1:].argmax(-1)
        step = model(
            input_ids=next_id, slow_cache=prefill.slow_cache, use_cache=True, **cache_field(kv_cache)
        )
        whole = model(input_ids=torch.cat([ids, next_id], 1), pixel_values_videos=video, use_cache=False)
        torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
        model.generate(input_ids=ids, pixel_values_videos=video, max_new_tokens=4, do_sample=False)
    assert deprecated(transformers_deprecations) == []


def test_an_indexed_cpu_map_location_loads_onto_the_cpu(tmp_path):
    """What transformers < 5.24 passes when resuming a multi-process CPU run (args.device is "cpu:0")."""
    torch.save({"step": torch.arange(3)}, tmp_path / "state.pt")
    allow_indexed_cpu_map_location()
    loaded = torch.load(tmp_path / "state.pt", map_location=torch.device("cpu", 0), weights_only=True)
    assert torch.equal(loaded["step"], torch.arange(3)) and loaded["step"].device.type == "cpu"
