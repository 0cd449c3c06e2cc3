"""A decoding step's cross-attention to cached slow keys/values on a CPU, reading each key and value once.

In a decoding step each sample and kv head asks a few query rows (the kv head's group of query heads, one
new token) of N slow keys. SDPA's CPU kernel splits the keys into blocks and runs two small GEMMs per block,
sample and kv head, at a fraction of the rate at which the keys and values can be read (BENCHMARKS.md,
"Decoding"). `cpu_decode_attention.cpp` streams them once with the query rows in registers, using
AVX512-BF16 dot products over keys and values stored pair-interleaved (`pack`, once per request, when the
hybrid layer's keys/values are cached; the cache then keeps only these layouts, and `unpack` gives SDPA's
back to the steps the kernel does not answer). Its arithmetic is SDPA's: bf16 products summed in fp32,
softmax in fp32, probabilities rounded to bf16 before they weight the values.

Used for bf16 keys/values on a CPU with AVX512-BF16, without autograd, for at most 8 query rows per kv head;
everything else goes through SDPA. The extension is compiled on first use (about 40 s; cached under
torch's extensions folder, `TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions) and needs a C++ compiler
and ninja; where it cannot be built a warning says so and SDPA is used.
`SLOWFAST_VLM_CPU_DECODE_KERNEL=0` keeps SDPA everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_SWITCH = "SLOWFAST_VLM_CPU_DECODE_KERNEL"
MAX_ROWS = 8  # query rows per kv head the kernel keeps in registers
KEY_BLOCK = 16  # keys per packed block: one AVX-512 vector of fp32 scores
BUILD_LOCK_TIMEOUT_S = 600.0  # how long a process waits for another one's build before it uses SDPA
_NAME = "slowfast_vlm_cpu_decode_attention"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


class PackedKeyValue(NamedTuple):
    """One hybrid layer's slow keys/values in the kernel's layouts (`pack`)."""

    keys: torch.Tensor  # (B, kv_heads, ceil(N/16), hd/2, 16, 2)
    values: torch.Tensor  # (B, kv_heads, ceil(N/16)*8, hd, 2)
    num_keys: int  # N
    bias: torch.Tensor  # (B, N) fp32 additive key mask (0 / -inf); empty (0,) when nothing is padded


def build_directory() -> Path:
    """Where the kernel is built and cached: one folder per Python and torch build under torch's
    extensions root (`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    build = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / build / _NAME


@functools.cache
def _extension():
    """The compiled kernel, or None (with a warning) where it cannot be built."""
    from filelock import FileLock, Timeout
    from torch.utils.cpp_extension import load

    logger.warning(
        "loading the CPU decoding kernel of the slow cross-attention (built on first use, about 40 s)"
    )
    build = build_directory()
    try:
        build.mkdir(parents=True, exist_ok=True)
        # torch marks a build in progress with a plain `lock` file, which a killed build leaves behind and
        # every later load then waits on forever. An OS lock, released when its holder dies, guards the
        # build instead: whoever holds it knows a `lock` file it finds is a dead build's.
        with FileLock(build / "build.lock", timeout=BUILD_LOCK_TIMEOUT_S):
            (build / "lock").unlink(missing_ok=True)
            return load(
                name=_NAME,
                sources=[str(Path(__file__).with_suffix(".cpp"))],
                extra_cflags=_FLAGS,
                build_directory=str(build),
            )
    except Timeout:
        logger.warning(
            "the CPU decoding kernel is still being built by another process after %g s (%s): "
            "decoding uses SDPA",
            BUILD_LOCK_TIMEOUT_S,
            build,
        )
        return None
    except Exception as error:  # no compiler, no ninja, ...: the model still runs, through SDPA
        logger.warning("the CPU decoding kernel could not be built (%s): decoding uses SDPA", error)
        return None


def usable(key: torch.Tensor) -> bool:
    """Whether the decoding steps can read these `(B, kv_heads, N, hd)` keys (and their values) through
    the kernel: bf16 on a CPU with AVX512-BF16, hd a multiple of 32, no autograd, not switched off."""
    return (
        key.device.type == "cpu"
        and key.dtype == torch.bfloat16
        and key.shape[-1] % 32 == 0
        and not torch.is_grad_enabled()
        and os.environ.get(ENV_SWITCH, "1") != "0"
        and torch.cpu._is_avx512_bf16_supported()
        and _extension() is not None
    )


def pack(key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> PackedKeyValue:
    """`(B, kv_heads, N, hd)` keys and values (and SDPA's `(B, 1, 1, N)` additive mask) -> the kernel's layouts:
    keys of 16 consecutive positions interleaved by dimension pairs, values by position pairs; zero-padded
    to a multiple of 16 positions (the kernel masks the padding)."""
    batch, heads, num_keys, head_dim = key.shape
    pad = -num_keys % KEY_BLOCK
    padded = num_keys + pad
    if pad:
        key, value = F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
    # keys[b, h, block, j, l, t] = key[b, h, 16 * block + l, 2 * j + t], moved as 32-bit pairs (10x faster)
    pairs = (
        key.contiguous().view(torch.int32).view(batch, heads, padded // KEY_BLOCK, KEY_BLOCK, head_dim // 2)
    )
    keys = pairs.transpose(3, 4).contiguous().view(torch.bfloat16)
    # values[b, h, i, d, t] = value[b, h, 2 * i + t, d]
    values = value.view(batch, heads, padded // 2, 2, head_dim).transpose(3, 4)
    # an empty tensor, not None, for "no mask": the op's schema then has no optional, and a decoding step
    # allocates nothing to stand in for it
    key_bias = (
        key.new_empty(0, dtype=torch.float32) if bias is None else bias[:, 0, 0, :].float().contiguous()
    )
    return PackedKeyValue(keys.view(*keys.shape[:-1], KEY_BLOCK, 2), values.contiguous(), num_keys, key_bias)


def unpack(packed: PackedKeyValue) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: the `(B, kv_heads, N, hd)` keys and values in SDPA's layout, for the steps the
    kernel does not answer (the cache keeps the packed layouts only)."""
    batch, heads, blocks, half_dim, _, _ = packed.keys.shape
    # keys[b, h, 16 * block + l, 2 * j + t] = packed.keys[b, h, block, j, l, t], moved as 32-bit pairs
    pairs = packed.keys.view(torch.int32).view(batch, heads, blocks, half_dim, KEY_BLOCK)
    keys = pairs.transpose(3, 4).contiguous().view(torch.bfloat16).view(batch, heads, blocks * KEY_BLOCK, -1)
    values = packed.values.transpose(3, 4).reshape(batch, heads, blocks * KEY_BLOCK, -1)
    return keys[:, :, : packed.num_keys], values[:, :, : packed.num_keys]


@torch.library.custom_op("slowfast_vlm::cpu_decode_attention", mutates_args=())
def _decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_keys: int,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _extension().decode_attention(query, keys, values, num_keys, bias, scale)


@_decode_attention.register_fake
def _(query, keys, values, num_keys, bias, scale):
    return torch.empty_like(query)


def attend(queries: torch.Tensor, packed: PackedKeyValue, scale: float) -> torch.Tensor:
    """`(B, kv_heads, R, hd)` bf16 queries (R <= 8) -> `(B, kv_heads, R, hd)`: softmax(q k^T * scale + bias) v,
    as SDPA computes it. A registered op, so a compiled decoding step keeps it in its graph."""
    return _decode_attention(
        queries.contiguous(), packed.keys, packed.values, packed.num_keys, packed.bias, scale
    )
