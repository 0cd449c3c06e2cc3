"""The CPU decoding kernel of the slow cross-attention: SDPA's arithmetic, one read of the keys/values."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import VIDEO_TOKEN_ID, open_gates, tiny_model

from slowfast_vlm import fast_token_count
from slowfast_vlm.modeling import cpu_decode_attention
from slowfast_vlm.modeling.cpu_decode_attention import attend, pack, usable

pytestmark = pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(), reason="the kernel needs a CPU with AVX512-BF16"
)


def reference(query, key, value, bias, scale):
    """SDPA's CPU arithmetic spelt out: fp32 scores of the bf16 inputs, fp32 softmax numerators rounded to
    bf16 before they weight the values, divided by the fp32 sum."""
    scores = query.float() @ key.float().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias[:, None, None, :]
    numerators = (scores - scores.amax(-1, keepdim=True)).exp()
    out = numerators.to(torch.bfloat16).float() @ value.float() / numerators.sum(-1, keepdim=True)
    return out.to(torch.bfloat16)


@pytest.mark.parametrize(
    "batch, heads, rows, head_dim, num_keys",
    [(2, 2, 4, 64, 37), (1, 4, 7, 128, 2053), (3, 1, 1, 32, 16), (2, 2, 8, 64, 100), (1, 1, 5, 96, 1)],
)
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_computes_sdpas_attention(batch, heads, rows, head_dim, num_keys, padded):
    torch.manual_seed(0)
    query = torch.randn(batch, heads, rows, head_dim).bfloat16()
    key, value = (torch.randn(batch, heads, num_keys, head_dim).bfloat16() for _ in range(2))
    bias = None
    if padded:  # sample 0 keeps only its first half of the keys
        bias = torch.zeros(batch, num_keys)
        bias[0, (num_keys + 1) // 2 :] = float("-inf")
    with torch.no_grad():
        out = attend(query, pack(key, value, None if bias is None else bias[:, None, None, :]), 0.125)
    expected = reference(query, key, value, bias, 0.125)
    # the same arithmetic up to the order of fp32 sums and exp's last bits: at most one bf16 step apart
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-5)
    mask = None if bias is None else bias[:, None, None, :].bfloat16()
    sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.125)
    torch.testing.assert_close(out, sdpa, rtol=2**-6, atol=2e-3)


def test_pack_lays_keys_and_values_out_by_pairs():
    key, value = torch.randn(2, 3, 21, 64).bfloat16(), torch.randn(2, 3, 21, 64).bfloat16()
    packed = pack(key, value, None)
    assert packed.keys.shape == (2, 3, 2, 32, 16, 2) and packed.values.shape == (2, 3, 16, 64, 2)
    assert packed.num_keys == 21 and packed.bias.numel() == 0
    for b, h, n, d in [(0, 0, 0, 0), (1, 2, 17, 63), (0, 1, 20, 5), (1, 0, 15, 32)]:
        assert packed.keys[b, h, n // 16, d // 2, n % 16, d % 2] == key[b, h, n, d]
        assert packed.values[b, h, n // 2, d, n % 2] == value[b, h, n, d]
    assert not packed.keys[:, :, 1, :, 5:].any() and not packed.values[:, :, 11:].any()  # zero padding


def test_kernel_only_without_autograd_for_bf16_cpu_tensors(monkeypatch):
    key = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert usable(key)
        assert not usable(key.float()) and not usable(torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16))
        monkeypatch.setenv(cpu_decode_attention.ENV_SWITCH, "0")
        assert not usable(key)
    monkeypatch.delenv(cpu_decode_attention.ENV_SWITCH)
    assert not usable(key)  # autograd on


def test_compiled_graph_keeps_the_kernel_whole():
    """A registered op with a shape function: a compiled decoding step captures it in one graph."""
    query = torch.randn(2, 2, 4, 64).bfloat16()
    packed = pack(torch.randn(2, 2, 40, 64).bfloat16(), torch.randn(2, 2, 40, 64).bfloat16(), None)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q: attend(q, packed, 0.125), backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert torch.equal(compiled(query), attend(query, packed, 0.125))
    finally:
        torch._dynamo.reset()


def generate_bf16(model, monkeypatch, kernel: bool):
    monkeypatch.setenv(cpu_decode_attention.ENV_SWITCH, "1" if kernel else "0")
    count = fast_token_count(8, model.model.visual_grid(8), model.config)
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * count + [5, 6, 7]] * 2)
    torch.manual_seed(1)
    video = torch.randn(2, 8, 3, 32, 32).bfloat16()
    calls = []
    original = cpu_decode_attention.attend
    monkeypatch.setattr(cpu_decode_attention, "attend", lambda *a: calls.append(1) or original(*a))
    out = model.generate(
        input_ids=ids, pixel_values_videos=video, max_new_tokens=6, min_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out, len(calls)


def test_bf16_generation_on_cpu_reads_the_cache_through_the_kernel(monkeypatch):
    """hd 32 (128 wide, 4 heads, 2 kv heads): every decoding step of each hybrid layer goes through the
    kernel, and the tokens and logits are SDPA's."""
    model = tiny_model(seed=21, text_config={"hidden_size": 128}).to(torch.bfloat16)
    open_gates(model)
    with_kernel, kernel_calls = generate_bf16(model, monkeypatch, kernel=True)
    with_sdpa, sdpa_calls = generate_bf16(model, monkeypatch, kernel=False)
    assert kernel_calls == 5 * len(model.hybrid_attentions) and sdpa_calls == 0  # 5 steps after the prefill
    assert torch.equal(with_kernel.sequences, with_sdpa.sequences)
    for a, b in zip(with_kernel.logits, with_sdpa.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05)


def test_a_kernel_that_cannot_be_built_warns_and_leaves_sdpa(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_decode_attention._extension.cache_clear()
    try:
        with torch.no_grad():
            assert not usable(torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16))
        assert (
            "could not be built (Ninja is required to load C++ extensions): decoding uses SDPA" in caplog.text
        )
    finally:
        cpu_decode_attention._extension.cache_clear()  # the next use loads the real one again


def torch_like_load(calls):
    """Stands in for `cpp_extension.load` with torch's locking: a `lock` file already in the build folder
    would make it wait forever (torch's FileBaton), so here it fails instead."""
    from torch.utils.file_baton import FileBaton

    def load(**kwargs):
        baton = FileBaton(str(Path(kwargs["build_directory"]) / "lock"))
        if not baton.try_acquire():
            raise AssertionError("torch would wait forever on the lock file left in the build folder")
        baton.release()
        calls.append(kwargs["build_directory"])
        return "kernel"

    return load


def kill_a_build_midway(build: Path, keep_running: bool) -> subprocess.Popen:
    """A process that takes the build lock and leaves torch's `lock` file, as a build does; it is killed
    (SIGKILL: nothing cleans up) unless `keep_running`, in which case it holds the lock until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "open(sys.argv[2], 'w').close(); print('building', flush=True); time.sleep(120)",
            str(build / "build.lock"),
            str(build / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "building"
    if not keep_running:
        holder.kill()
        holder.wait()
    return holder


def load_extension_with(monkeypatch, calls):
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "load", torch_like_load(calls))
    cpu_decode_attention._extension.cache_clear()
    try:
        return cpu_decode_attention._extension()
    finally:
        cpu_decode_attention._extension.cache_clear()  # the next use loads the real one again


def test_a_build_killed_midway_does_not_stall_the_next_load(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = cpu_decode_attention.build_directory()
    build.mkdir(parents=True)
    kill_a_build_midway(build, keep_running=False)
    assert (build / "lock").exists()  # what made every later torch load wait forever
    calls = []
    assert load_extension_with(monkeypatch, calls) == "kernel"
    assert calls == [str(build)] and build.is_relative_to(tmp_path)


def test_a_build_running_elsewhere_is_waited_for_then_sdpa_is_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_decode_attention, "BUILD_LOCK_TIMEOUT_S", 0.5)
    build = cpu_decode_attention.build_directory()
    build.mkdir(parents=True)
    holder = kill_a_build_midway(build, keep_running=True)
    calls = []
    try:
        assert load_extension_with(monkeypatch, calls) is None
    finally:
        holder.kill()
        holder.wait()
    assert calls == [] and "still being built by another process after 0.5 s" in caplog.text
    assert load_extension_with(monkeypatch, calls) == "kernel"  # its holder gone, the lock is free


def test_unpack_gives_back_the_keys_and_values_pack_was_given():
    for num_keys in (21, 32, 37):
        key, value = torch.randn(2, 3, num_keys, 64).bfloat16(), torch.randn(2, 3, num_keys, 64).bfloat16()
        keys, values = cpu_decode_attention.unpack(pack(key, value, None))
        assert torch.equal(keys, key) and torch.equal(values, value)


def continue_bf16(model, monkeypatch, kernel: bool):
    """A prompt, then 5 more tokens on its caches (a follow-up turn): 10 query rows per kv head, more than
    the kernel keeps in registers, so that step reads the cached slow keys/values through SDPA."""
    from slowfast_vlm.transformers_compat import cache_field, cache_of

    monkeypatch.setenv(cpu_decode_attention.ENV_SWITCH, "1" if kernel else "0")
    count = fast_token_count(8, model.model.visual_grid(8), model.config)
    ids = torch.tensor([[3, 4] + [VIDEO_TOKEN_ID] * count + [5, 6, 7]] * 2)
    torch.manual_seed(1)
    video = torch.randn(2, 8, 3, 32, 32).bfloat16()
    unpacked = []
    original = cpu_decode_attention.unpack
    monkeypatch.setattr(cpu_decode_attention, "unpack", lambda packed: unpacked.append(1) or original(packed))
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values_videos=video, use_cache=True)
        more = torch.tensor([[8, 9, 10, 11, 12]] * 2)
        mask = torch.ones(2, ids.shape[1] + 5, dtype=torch.long)
        carried = {"slow_cache": first.slow_cache, **cache_field(cache_of(first))}
        second = model(input_ids=more, attention_mask=mask, use_cache=True, **carried)
    return first.slow_cache, second.logits, len(unpacked)


def test_the_cache_keeps_one_layout_and_a_longer_step_unpacks_it(monkeypatch):
    model = tiny_model(seed=21, text_config={"hidden_size": 128}).to(torch.bfloat16)
    open_gates(model)
    packed_cache, with_kernel, unpacked = continue_bf16(model, monkeypatch, kernel=True)
    sdpa_cache, with_sdpa, _ = continue_bf16(model, monkeypatch, kernel=False)
    hybrid = {layer.layer_idx for layer in model.hybrid_attentions}
    assert unpacked == len(hybrid)  # the follow-up step, once per hybrid layer
    assert set(packed_cache.packed) == hybrid and not packed_cache.key_values  # no second copy
    assert set(sdpa_cache.key_values) == hybrid and not sdpa_cache.packed
    assert torch.equal(with_kernel, with_sdpa)  # the same keys/values, read by the same SDPA


def test_the_visual_cache_counts_the_packed_layouts():
    from slowfast_vlm.modeling.slow_tokens import build_slow_cache
    from slowfast_vlm.visual_cache import tensor_bytes

    tokens = torch.randn(21, 64).bfloat16()
    slow_cache = build_slow_cache([tokens], like=tokens)
    projected = torch.randn(1, 2, 21, 32).bfloat16(), torch.randn(1, 2, 21, 32).bfloat16()
    with torch.no_grad():
        slow_cache.get(0, lambda _: projected)
    assert 0 in slow_cache.packed
    # tokens + keys and values padded to 32 positions, all bf16 (no padding mask: an empty fp32 bias)
    assert tensor_bytes(slow_cache) == 2 * (21 * 64 + 2 * (2 * 32 * 32))
