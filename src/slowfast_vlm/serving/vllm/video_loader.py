"""vLLM video loader `slowfast`: this library's decoding (`load_video`, PyAV) and reference frame sampling.

Selected with `--media-io-kwargs '{"video": {"video_backend": "slowfast", "num_frames": 64, "fps": 2}}'`
(what `slowfast-vlm serve --engine vllm` passes); a request's own `media_io_kwargs` `num_frames` / `fps` /
`sampling` override those, as in vLLM's convention. Its hard limits (frames, source pixels, duration, the
decoded size) come from the environment variable `SLOWFAST_VLLM_VIDEO_LIMITS` (JSON, set by the launcher),
which no request can change. The frames are those the project's own server gives the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from ...processing.video import load_video

BACKEND = "slowfast"
LIMITS_ENV = "SLOWFAST_VLLM_VIDEO_LIMITS"
REQUEST_KEYS = ("num_frames", "fps", "sampling")
ENGINE_KEYS = ("video_backend", "backend")


def video_limits() -> dict[str, Any]:
    """`max_frames`, `max_source_pixels`, `max_duration`, `short_side` set by the launcher (absent: none)."""
    return json.loads(os.environ.get(LIMITS_ENV) or "{}")


class SlowFastVideoLoader:
    """`VideoLoader.load_bytes` for vLLM's `VIDEO_LOADER_REGISTRY` (registered in `register()`)."""

    @classmethod
    def load_bytes(
        cls, data: bytes, num_frames: int = 64, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Encoded video bytes -> sampled RGB frames `(T, H, W, 3)` and vLLM's metadata dict."""
        unknown = sorted(set(kwargs) - set(REQUEST_KEYS) - set(ENGINE_KEYS))
        if unknown:
            raise ValueError(
                f"media_io_kwargs.video: unsupported {unknown}; a request may set {list(REQUEST_KEYS)}"
            )
        limits = video_limits()
        cap = limits.get("max_frames")
        if cap is not None and not 1 <= int(num_frames) <= cap:
            raise ValueError(
                f"media_io_kwargs.video.num_frames: {num_frames} is outside 1..{cap} (the server's cap)"
            )
        options = {k: limits[k] for k in ("short_side", "max_source_pixels", "max_duration") if k in limits}
        with tempfile.NamedTemporaryFile(suffix=".video") as file:
            file.write(data)
            file.flush()
            frames, meta = load_video(
                file.name,
                num_frames=int(num_frames),
                fps=kwargs.get("fps"),
                sampling=kwargs.get("sampling", "fps"),
                **options,
            )
        return frames, {
            "total_num_frames": meta.total_frames,
            "fps": meta.average_fps,
            "duration": meta.duration,
            "video_backend": BACKEND,
            "frames_indices": list(meta.frame_indices),
            "do_sample_frames": False,
        }
