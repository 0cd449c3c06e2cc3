"""Encode once, ask many: a byte-budgeted LRU cache of encoded videos and of the conversations continued
from them (docs/serving.md, "Reuse").

Two kinds of entries share one budget:

- an encoded video (`EncodedVisual`: slow tokens and the fast tokens built from them), keyed by content: a
  hash of the decoded frames and of the settings that turn frames into tokens (pixel preprocessing, the
  model's dtype and device). The same frames sampled again give the same key, whatever file they came from;
- a conversation's state after a turn: its token ids, the self-attention KV cache over them and the
  `SlowCache` with its projected slow keys/values. A later turn whose tokens start with the same ids
  (and whose video has the same key) continues from it and computes only its new tokens.

The least recently used entry is evicted first; an entry larger than the whole budget is not kept; a
budget of 0 keeps nothing. Thread-safe (one lock around the bookkeeping, never around the model).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .modeling.model import EncodedVisual
from .modeling.slow_tokens import SlowCache

logger = logging.getLogger(__name__)


def frames_key(frames: np.ndarray, settings: str) -> str:
    """The content key of decoded `frames` `(T, H, W, 3)` turned into tokens with `settings`."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{frames.shape}|{frames.dtype}|{settings}".encode())
    digest.update(np.ascontiguousarray(frames).data)
    return digest.hexdigest()


def tensor_bytes(*objects: Any) -> int:
    """Bytes held by the tensors in `objects`, looked for in tensors, sequences, dicts, a transformers
    KV cache's `layers` (their `keys` / `values`) and a `SlowCache` (its keys/values in either layout)."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            total += tensor_bytes(*obj)
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
        elif isinstance(obj, SlowCache):
            total += tensor_bytes(obj.tokens, obj.key_values, obj.packed)
        elif hasattr(obj, "layers"):
            total += sum(
                tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))
                for layer in obj.layers
            )
    return total


@dataclass
class ConversationState:
    """A conversation after a turn: the KV cache holds `ids` `(L,)` (on the CPU), `slow_cache` its video's slow
    tokens and projected keys/values (None for a text-only chat), `video_key` names the video."""

    ids: torch.Tensor
    kv_cache: Any
    slow_cache: SlowCache | None
    video_key: str | None

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.kv_cache, self.slow_cache)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of the 1-D tensors `a` and `b`."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class VisualCache:
    """Encoded videos and conversation states within `budget_bytes` (0: disabled), least recently used out first.

    `stats` counts `visual_hits`, `visual_misses`, `conversation_reuses`, `conversation_fallbacks` (a
    follow-up turn that found no state to continue and ran in full) and `evictions`.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()  # key -> (value, bytes)
        self.nbytes = 0
        self.stats = dict.fromkeys(
            ("visual_hits", "visual_misses", "conversation_reuses", "conversation_fallbacks", "evictions"), 0
        )
        self.lock = threading.Lock()
        self._states = 0  # names conversation entries

    @classmethod
    def from_megabytes(cls, megabytes: float) -> VisualCache:
        """A cache of `megabytes` MiB (the command-line option)."""
        return cls(int(megabytes * 2**20))

    def __len__(self) -> int:
        return len(self.entries)

    def _put(self, key: tuple[str, str], value: Any, size: int) -> None:
        with self.lock:
            if key in self.entries:
                self.nbytes -= self.entries.pop(key)[1]
            if size > self.budget_bytes:
                return
            self.entries[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.budget_bytes:
                _, (_, evicted) = self.entries.popitem(last=False)
                self.nbytes -= evicted
                self.stats["evictions"] += 1

    # ----- encoded videos ----------------------------------------------------------------------------
    def get(self, key: str) -> EncodedVisual | None:
        """The encoded video under `key` (marked most recently used), or None."""
        with self.lock:
            entry = self.entries.get(("video", key))
            self.stats["visual_hits" if entry else "visual_misses"] += 1
            if entry is None:
                return None
            self.entries.move_to_end(("video", key))
            return entry[0]

    def put(self, key: str, encoded: EncodedVisual) -> None:
        """Keep `encoded` under `key`, evicting the least recently used entries beyond the budget."""
        self._put(("video", key), encoded, encoded.nbytes)

    # ----- conversations -----------------------------------------------------------------------------
    def take_conversation(
        self, ids: torch.Tensor, video_key: str | None, min_prefix: int, follow_up: bool
    ) -> tuple[ConversationState, int] | None:
        """Remove and return the state whose ids share the longest prefix with the prompt `ids` `(L,)`, its
        video being `video_key`, with the number of its tokens to keep (at least `min_prefix`, at most
        `L - 1`: one token is left to compute). None when no state qualifies; for a `follow_up` turn (the
        conversation has earlier turns) that is counted and logged as a fallback to a full run.

        The caller continues the state's caches and must crop them to the tokens kept (they change)."""
        ids = ids.cpu()
        with self.lock:
            best, best_length = None, 0
            for key, (state, _) in self.entries.items():
                if key[0] != "conversation" or state.video_key != video_key:
                    continue
                length = min(common_prefix(state.ids, ids), len(ids) - 1)
                if length >= max(min_prefix, 1) and length > best_length:
                    best, best_length = key, length
            if best is None:
                if follow_up:
                    self.stats["conversation_fallbacks"] += 1
                    logger.info("no cached conversation continues this prompt: running it in full")
                return None
            state, size = self.entries.pop(best)
            self.nbytes -= size
            self.stats["conversation_reuses"] += 1
            return state, best_length

    def put_conversation(self, state: ConversationState) -> None:
        """Keep a conversation's state for its next turn."""
        with self.lock:
            self._states += 1
            name = str(self._states)
        self._put(("conversation", name), state, state.nbytes)
