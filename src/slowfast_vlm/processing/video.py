"""Video decoding and frame sampling (architecture section 1.1).

Two sampling rules pick frame indices without decoding anything
(:func:`fps_sample_indices`, :func:`uniform_sample_indices`); :func:`load_video`
decodes exactly those frames with PyAV (default) or decord (optional).

A frame index always means the i-th frame in presentation order. The PyAV
backend reads the stream's packets once without decoding them to learn the exact
frame count and every frame's timestamp, so it can then seek straight to the
wanted frames even in variable-frame-rate files.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

DEFAULT_TARGET_FPS = 2.0
"""Target frame rate of fps sampling when none is given (the reference evaluation value)."""

MAX_SOURCE_PIXELS = 4096 * 4096
"""Default cap on the pixels of one source frame (a 16.8 MP frame, e.g. 4096 x 4096 or 5461 x 3072)."""
MAX_DURATION = 4 * 3600.0
"""Default cap on a video's duration in seconds."""

Sampling = Literal["fps", "uniform"]
Backend = Literal["auto", "pyav", "decord"]
_Chooser = Callable[[int, float], list[int]]  # (total_frames, video_fps) -> frame indices


class VideoDecodeError(ValueError):
    """A file that exists but cannot be decoded as a video; the message names the file."""


@dataclass(frozen=True)
class VideoMetadata:
    """Timing of a decoded video and of the frames chosen from it.

    ``timestamps`` are seconds since the first frame of the video, one per entry of
    ``frame_indices``; ``width`` / ``height`` are those of the returned frames
    (after display rotation). ``seeks`` counts container seeks (0: decoded
    front to back).
    """

    path: str
    total_frames: int
    average_fps: float
    duration: float
    frame_indices: list[int]
    timestamps: list[float]
    width: int
    height: int
    backend: str
    seeks: int = 0


def fps_sample_indices(total_frames: int, video_fps: float, num_frames: int, target_fps: float) -> list[int]:
    """Reference fps sampling: candidates every ``round(video_fps / target_fps)`` frames.

    With ``n`` candidates, all are kept if ``n <= num_frames``; otherwise the ones at
    positions ``round((i + 1) * n / num_frames - 1)`` for ``i < num_frames``. ``round``
    is Python's (round half to even), exactly as in the reference code, so e.g. a
    25 fps video sampled at 2 fps uses a step of 12, not 13.
    """
    _check_counts(total_frames, num_frames)
    if not (video_fps > 0 and target_fps > 0):
        raise ValueError(f"video_fps and target_fps must be > 0, got {video_fps} and {target_fps}")
    step = max(1, round(video_fps / target_fps))
    candidates = range(0, total_frames, step)
    n = len(candidates)
    if n <= num_frames:
        return list(candidates)
    return [candidates[round((i + 1) * n / num_frames - 1)] for i in range(num_frames)]


def uniform_sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Reference uniform sampling: ``np.linspace(0, total_frames - 1, num_frames, dtype=int)``.

    ``dtype=int`` truncates (it does not round), as the reference does; with more
    frames asked for than exist, indices repeat.
    """
    _check_counts(total_frames, num_frames)
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def load_video(
    path: str | os.PathLike[str],
    num_frames: int,
    fps: float | None = None,
    sampling: Sampling = "fps",
    backend: Backend = "auto",
    seek: bool | None = None,
    short_side: int | None = None,
    max_source_pixels: int | None = MAX_SOURCE_PIXELS,
    max_duration: float | None = MAX_DURATION,
    do_sample_frames: bool = True,
    return_metadata: bool = True,
) -> tuple[np.ndarray, VideoMetadata] | np.ndarray:
    """Decode the sampled frames of a video.

    Args:
        path: video file.
        num_frames: most frames to return (fps sampling returns fewer for short videos).
        fps: target rate of ``sampling="fps"`` (default :data:`DEFAULT_TARGET_FPS`);
            ignored by ``sampling="uniform"``.
        sampling: ``"fps"`` (:func:`fps_sample_indices`) or ``"uniform"``
            (:func:`uniform_sample_indices`).
        backend: ``"auto"`` (PyAV), ``"pyav"`` or ``"decord"`` (must be installed).
        seek: PyAV only. ``None``: seek to the wanted frames when the container's
            timestamps allow it exactly, else decode front to back; ``True``: same,
            but raise :class:`VideoDecodeError` instead of falling back; ``False``:
            always decode front to back.
        short_side: scale frames while decoding (swscale, area averaging) so that their shorter
            side is at most this many pixels, keeping the aspect ratio: memory then follows the
            model's input size (`SlowFastProcessor.decode_short_side()`), not the file's. None:
            the stream's stored size.
        max_source_pixels, max_duration: refuse (:class:`VideoDecodeError`) a video whose frames
            have more pixels, or which lasts longer in seconds; None: no cap.
        do_sample_frames, return_metadata: transformers' video keywords. ``do_sample_frames=False``
            decodes every frame (``num_frames`` and ``fps`` are then not used);
            ``return_metadata=False`` returns the frames alone.

    Returns:
        RGB uint8 frames ``(T, H, W, 3)``, upright per the display rotation, and
        their :class:`VideoMetadata` (unless ``return_metadata=False``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoDecodeError: empty file, not a video container, no video stream,
            no decodable frames, a corrupt stream, or a video past the caps.
        ValueError: invalid arguments.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    if sampling not in ("fps", "uniform"):
        raise ValueError(f"sampling must be 'fps' or 'uniform', got {sampling!r}")
    if backend not in ("auto", "pyav", "decord"):
        raise ValueError(f"backend must be 'auto', 'pyav' or 'decord', got {backend!r}")
    target_fps = DEFAULT_TARGET_FPS if fps is None else fps
    if not (target_fps > 0 and math.isfinite(target_fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")

    def choose(total: int, video_fps: float) -> list[int]:
        if not do_sample_frames:
            return list(range(total))
        if sampling == "uniform":
            return uniform_sample_indices(total, num_frames)
        return fps_sample_indices(total, video_fps, num_frames, target_fps)

    caps = _Caps(short_side, max_source_pixels, max_duration)
    if backend == "decord":
        frames, metadata = _load_decord(path, choose, caps)
    else:
        frames, metadata = _load_pyav(path, choose, seek, caps)
    return (frames, metadata) if return_metadata else frames


@dataclass(frozen=True)
class _Caps:
    """The output size rule and the limits of one `load_video` call."""

    short_side: int | None
    max_source_pixels: int | None
    max_duration: float | None

    def check(self, path: str, width: int, height: int, duration: float | None) -> None:
        """Raise `VideoDecodeError` for a source past the caps."""
        if self.max_source_pixels is not None and width * height > self.max_source_pixels:
            raise VideoDecodeError(
                f"{path}: frames of {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{self.max_source_pixels:,} pixels per frame"
            )
        if self.max_duration is not None and duration is not None and duration > self.max_duration:
            raise VideoDecodeError(f"{path}: {duration:g} s long, over the limit of {self.max_duration:g} s")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """`(width, height)` of the returned frames: the source's, scaled down to `short_side`."""
        shorter = min(width, height)
        if self.short_side is None or shorter <= self.short_side:
            return width, height
        scale = self.short_side / shorter
        return max(1, round(width * scale)), max(1, round(height * scale))


def _check_counts(total_frames: int, num_frames: int) -> None:
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


# --------------------------------------------------------------------------- PyAV


@dataclass(frozen=True)
class _Probe:
    """What one demux pass (no decoding) learns about the video stream."""

    total_frames: int
    frame_pts: list[int] | None  # presentation-order pts of every frame; None: unusable for seeking
    keyframe_pts: list[int]  # sorted
    keyframe_seek_ts: list[int]  # per keyframe: the timestamp that makes a seek land on it
    time_base: Fraction
    average_fps: float
    duration: float
    width: int
    height: int


class _SeekMiss(Exception):
    """Seeking did not land exactly on a wanted frame."""


def _open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: not a readable video container ({e})") from e


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    # Cover art in audio files is a one-frame "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not container.streams:
        # a header that ends before any stream is described: an mp4 cut inside its index
        raise VideoDecodeError(f"{path}: not a readable video container (no streams: truncated file?)")
    if not streams:
        has_audio = bool(container.streams.audio)
        raise VideoDecodeError(f"{path}: no video stream" + (" (audio-only file)" if has_audio else ""))
    return streams[0]


def _probe(path: str) -> _Probe:
    with _open(path) as container:
        stream = _video_stream(container, path)
        pts: list[int | None] = []
        keyframes: list[tuple[int, int]] = []
        try:
            for packet in container.demux(stream):
                # size 0 is the end-of-stream flush packet; discard-flagged packets
                # (edit-list pre-roll) are decoded for reference only and yield no frame.
                if packet.size == 0 or packet.is_discard:
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe and packet.pts is not None:
                    # Some demuxers (mp4) seek by decode timestamp: a seek to a keyframe's pts
                    # can land on a later keyframe whose dts is still <= that pts. dts <= pts,
                    # so seeking to this keyframe's dts lands on it (or on an earlier one).
                    seek_ts = packet.pts if packet.dts is None else min(packet.pts, packet.dts)
                    keyframes.append((packet.pts, seek_ts))
        except av.error.FFmpegError as e:
            raise VideoDecodeError(f"{path}: corrupt video stream ({e})") from e
        total = len(pts)
        if total == 0:
            truncated = " (truncated file?)" if stream.frames else ""
            raise VideoDecodeError(f"{path}: no decodable video frames{truncated}")
        if stream.frames > total:
            warnings.warn(
                f"{path}: container declares {stream.frames} frames but only {total} are present "
                "(truncated file?); sampling from those present",
                stacklevel=4,
            )
        frame_pts: list[int] | None = None
        if None not in pts:
            ordered = sorted(pts)  # type: ignore[type-var]
            # Duplicate timestamps make "the frame at pts t" ambiguous.
            if len(set(ordered)) == total:
                frame_pts = ordered
        time_base = stream.time_base or Fraction(1, 1)
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            average_fps = float(rate)
        elif frame_pts is not None and total > 1 and frame_pts[-1] > frame_pts[0]:
            average_fps = (total - 1) / float((frame_pts[-1] - frame_pts[0]) * time_base)
        elif total == 1:
            average_fps = 1.0  # any rate samples a one-frame video the same way
        else:
            raise VideoDecodeError(f"{path}: cannot determine the frame rate")
        if stream.duration:
            duration = float(stream.duration * time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = total / average_fps
        keyframes.sort()
        return _Probe(
            total_frames=total,
            frame_pts=frame_pts,
            keyframe_pts=[pts for pts, _ in keyframes],
            keyframe_seek_ts=[ts for _, ts in keyframes],
            time_base=time_base,
            average_fps=average_fps,
            duration=duration,
            width=stream.width,
            height=stream.height,
        )


def _to_rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8, upright, scaled to `width` x `height` (before rotation) as it is converted: the
    output size of the load, so a mid-stream resolution change still stacks. Area averaging keeps a
    large downscale free of aliasing."""
    rgb = frame.to_ndarray(format="rgb24", width=width or None, height=height or None, interpolation="AREA")
    # frame.rotation is the counter-clockwise display rotation; np.rot90 turns counter-clockwise.
    # Only quarter turns are applied; other angles go to the nearest one.
    quarter_turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _decoded_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str
) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(stream)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: corrupt video stream ({e})") from e


def _decode_sequential(
    path: str, wanted: Sequence[int], probe: _Probe
) -> tuple[dict[int, tuple[np.ndarray, float]], int]:
    """Decode front to back; the i-th decoded frame is frame i.

    Returns the wanted frames found, as ``{index: (rgb, seconds)}``, and how many
    frames were decoded (the true count when a wanted index was never reached).
    """
    wanted_set = set(wanted)
    last = max(wanted)
    found: dict[int, tuple[np.ndarray, float]] = {}
    first_pts: int | None = None
    count = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        for index, frame in enumerate(_decoded_frames(container, stream, path)):
            count = index + 1
            if first_pts is None:
                first_pts = frame.pts
            if index in wanted_set:
                if frame.pts is None or first_pts is None:
                    seconds = index / probe.average_fps
                else:
                    seconds = float((frame.pts - first_pts) * probe.time_base)
                found[index] = (_to_rgb(frame, probe.width, probe.height), seconds)
            if index == last:
                break
    return found, count


def _prepend(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


def _seek_to_keyframe(
    container, stream, path: str, probe: _Probe, k: int, target: int
) -> Iterator[av.VideoFrame]:
    """Seek so that decoding starts at keyframe `k`; returns the decoded-frame iterator from there.

    A seek to the keyframe's pts lands on it exactly with most demuxers. mp4 seeks by decode
    timestamp, where that seek may land on a later keyframe: then seek again to the keyframe's dts,
    which lands on it or on an earlier one (correct, with some extra decoding).
    """
    keyframe_pts = probe.keyframe_pts[k]
    for seek_ts in dict.fromkeys((keyframe_pts, probe.keyframe_seek_ts[k])):
        try:
            container.seek(seek_ts, stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError as e:
            raise _SeekMiss(f"seek towards pts {target} failed ({e})") from e
        frames = _decoded_frames(container, stream, path)
        try:
            first = next(frames, None)
        except VideoDecodeError as e:  # possibly caused by the seek: let the caller fall back
            raise _SeekMiss(str(e)) from e
        if first is not None and first.pts is not None and first.pts <= keyframe_pts:
            return _prepend(first, frames)
        frames.close()
    raise _SeekMiss(f"no seek landed at or before the keyframe of pts {target}")


def _decode_seeking(
    path: str, wanted: Sequence[int], probe: _Probe
) -> tuple[dict[int, tuple[np.ndarray, float]], int]:
    """Fetch frame i as the decoded frame whose pts is exactly ``probe.frame_pts[i]``.

    Before each wanted frame the container seeks to it when the last keyframe at
    or before it lies beyond the last decoded frame (seeking then skips decoding
    work); otherwise decoding simply continues. Returns ``{index: (rgb, seconds)}``
    and the number of seeks. Raises :class:`_SeekMiss` if a frame's exact pts never
    comes out of the decoder or decoding fails.
    """
    assert probe.frame_pts is not None
    frame_pts = probe.frame_pts
    found: dict[int, tuple[np.ndarray, float]] = {}
    seeks = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        frames = _decoded_frames(container, stream, path)
        cursor = frame_pts[0]  # pts of the last frame decoded (decoding starts at the first)
        for index in sorted(set(wanted)):
            target = frame_pts[index]
            k = bisect.bisect_right(probe.keyframe_pts, target)
            if k and probe.keyframe_pts[k - 1] > cursor:
                frames.close()
                frames = _seek_to_keyframe(container, stream, path, probe, k - 1, target)
                seeks += 1
            try:
                for frame in frames:
                    if frame.pts is None:
                        raise _SeekMiss("decoded frame without pts")
                    cursor = frame.pts
                    if frame.pts >= target:
                        break
                else:
                    raise _SeekMiss(f"stream ended before pts {target}")
            except VideoDecodeError as e:
                # Possibly caused by the seek (a bad container index); a front-to-back
                # pass tells a really corrupt stream apart.
                raise _SeekMiss(str(e)) from e
            if frame.pts != target:
                raise _SeekMiss(f"wanted pts {target}, decoder gave {frame.pts}")
            seconds = float((target - frame_pts[0]) * probe.time_base)
            found[index] = (_to_rgb(frame, probe.width, probe.height), seconds)
        frames.close()
    return found, seeks


def _load_pyav(
    path: str, choose: _Chooser, seek: bool | None, caps: _Caps
) -> tuple[np.ndarray, VideoMetadata]:
    probe = _probe(path)
    caps.check(path, probe.width, probe.height, probe.duration)
    width, height = caps.output_size(probe.width, probe.height)
    probe = dataclasses.replace(probe, width=width, height=height)
    total = probe.total_frames
    indices = choose(total, probe.average_fps)
    found: dict[int, tuple[np.ndarray, float]] | None = None
    seeks = 0
    if seek is not False:
        try:
            if probe.frame_pts is None:
                raise _SeekMiss("the container gives no unique timestamp for every frame")
            found, seeks = _decode_seeking(path, indices, probe)
        except _SeekMiss as e:
            if seek:
                raise VideoDecodeError(f"{path}: cannot seek to exact frames: {e}") from e
    if found is None:
        found, decoded = _decode_sequential(path, indices, probe)
        if len(found) < len(set(indices)):
            # The container lists frames that do not decode (e.g. missing references):
            # sample again from the frames that do.
            if decoded == 0:
                raise VideoDecodeError(f"{path}: no decodable video frames")
            warnings.warn(
                f"{path}: only {decoded} of the {total} frames in the container decode; sampling from those",
                stacklevel=3,
            )
            total = decoded
            indices = choose(total, probe.average_fps)
            found, _ = _decode_sequential(path, indices, probe)
    frames = np.stack([found[i][0] for i in indices])
    metadata = VideoMetadata(
        path=path,
        total_frames=total,
        average_fps=probe.average_fps,
        duration=probe.duration,
        frame_indices=list(indices),
        timestamps=[found[i][1] for i in indices],
        width=frames.shape[2],
        height=frames.shape[1],
        backend="pyav",
        seeks=seeks,
    )
    return frames, metadata


# ------------------------------------------------------------------------- decord


def _load_decord(path: str, choose: _Chooser, caps: _Caps) -> tuple[np.ndarray, VideoMetadata]:
    try:
        import decord
    except ImportError as e:
        raise ImportError("backend='decord' needs decord: pip install 'slowfast-vlm[decord]'") from e
    # Header checks with PyAV so both backends fail the same way on a bad file.
    with _open(path) as container:
        stream = _video_stream(container, path)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        caps.check(path, stream.width, stream.height, duration)
        width, height = caps.output_size(stream.width, stream.height)
        if (width, height) == (stream.width, stream.height):
            width = height = -1  # decord's "as stored"
        elif round(next(_decoded_frames(container, stream, path)).rotation / 90) % 2:
            width, height = height, width  # decord's size is that of the rotated frames
    try:
        # decord applies the display rotation itself, and resizes while decoding.
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height)
        total = len(reader)
        if total == 0:
            raise VideoDecodeError(f"{path}: no decodable video frames")
        average_fps = float(reader.get_avg_fps())
        indices = choose(total, average_fps)
        frames = reader.get_batch(indices).asnumpy()
        # Start times of the chosen frames and of frame 0, to count from the first frame.
        starts = reader.get_frame_timestamp([*indices, 0])[:, 0]
        duration = float(reader.get_frame_timestamp(total - 1)[1] - starts[-1])
    except (decord.DECORDError, RuntimeError) as e:  # decord raises both
        raise VideoDecodeError(f"{path}: decord cannot decode it ({e})") from e
    metadata = VideoMetadata(
        path=path,
        total_frames=total,
        average_fps=average_fps,
        duration=duration,
        frame_indices=list(indices),
        timestamps=[float(t - starts[-1]) for t in starts[:-1]],
        width=frames.shape[2],
        height=frames.shape[1],
        backend="decord",
    )
    return frames, metadata


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: float, crf: int | None = None) -> Path:
    """Encode RGB uint8 frames `(T, H, W, 3)` as an h264 yuv420p mp4; `crf` sets the quality (lower = better).

    The output is byte-identical for identical frames: x264 is told to be CPU-independent, since it
    otherwise picks CPU-specific algorithms, and the cores of one machine may differ.
    """
    options = {"x264-params": "cpu-independent=1"}
    if crf is not None:
        options["crf"] = str(crf)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
            )
        container.mux(stream.encode())
    return Path(path)
