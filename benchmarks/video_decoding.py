"""Time to sample frames from a long clip: PyAV seeking vs PyAV decoding everything vs decord.

`slowfast_vlm.processing.video.load_video(path, n, sampling="uniform", ...)` with
- `backend="pyav", seek=True`: seek to the keyframe before each wanted frame when that skips work;
- `backend="pyav", seek=False`: decode front to back up to the last wanted frame (with uniform
  sampling, the whole clip);
- `backend="decord"`: decord's `VideoReader.get_batch` (skipped with a note if decord is missing).
Both PyAV variants include the demux pass that reads every packet header (frame count, timestamps).
Decoders use their own threads (ffmpeg's frame/slice threading on all cores); `--threads` only sets
torch's.

The clip is synthetic, written once and reused from the temp directory: a scrolling colour gradient
with a moving square, h264 (libx264 defaults: crf 23, keyframe at most every 250 frames), yuv420p.

Commands (results in BENCHMARKS.md):

    python -m benchmarks.video_decoding           # 3-minute 640x360 30 fps clip, 16 and 64 frames, 3 rounds
    PYTHONPATH=/path/to/decord python -m benchmarks.video_decoding   # decord installed elsewhere
    python -m benchmarks.video_decoding --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import av
import numpy as np

from slowfast_vlm.processing.video import load_video, write_video

from .common import (
    add_common_arguments,
    interleaved,
    machine_note,
    markdown_table,
    median,
    new_figure,
    save_figure,
    setup,
    timed,
)

CACHE_DIR = Path(tempfile.gettempdir()) / "slowfast_vlm_bench"
VARIANTS = {
    "PyAV, seek": dict(backend="pyav", seek=True),
    "PyAV, decode all": dict(backend="pyav", seek=False),
    "decord": dict(backend="decord"),
}


class SyntheticClip:
    """Frames `(T, H, W, 3)` made one at a time, so `write_video` can encode a long clip without holding it."""

    def __init__(self, seconds: int, width: int, height: int, fps: int):
        self.shape = (seconds * fps, height, width, 3)
        y, x = np.mgrid[0:height, 0 : 2 * width]
        self.background = np.stack([x * 255 // (2 * width), y * 255 // height, (x + y) % 256], -1).astype(
            np.uint8
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        frames, height, width, _ = self.shape
        side = height // 4
        for t in range(frames):
            frame = self.background[:, t % width : t % width + width].copy()
            top, left = (t * 3) % (height - side), (t * 7) % (width - side)
            frame[top : top + side, left : left + side] = (255, 255, 255)
            yield frame


def synthetic_clip(seconds: int, width: int, height: int, fps: int) -> Path:
    """The cached clip's path, written first if missing."""
    path = (
        Path(tempfile.gettempdir()) / "slowfast_vlm_bench" / f"clip_{seconds}s_{width}x{height}_{fps}fps.mp4"
    )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.mp4")
        print(f"writing {path} ({seconds} s at {width}x{height}, {fps} fps) ...")
        write_video(partial, SyntheticClip(seconds, width, height, fps), fps)
        partial.rename(path)
    return path


def keyframe_count(path: Path) -> tuple[int, int]:
    """(frames, keyframes) of the clip's video stream, from packet headers."""
    with av.open(str(path)) as container:
        flags = [p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size]
    return len(flags), sum(flags)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeats=3)
    parser.add_argument("--clip", type=Path, help="time this video instead of the synthetic clip")
    parser.add_argument("--seconds", type=int, default=180, help="length of the synthetic clip")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE_DIR,
        help=f"where the synthetic clip is kept (default {CACHE_DIR})",
    )
    parser.add_argument("--num-frames", type=int, nargs="+", default=[16, 64], help="frames to sample")
    args = parser.parse_args(argv)
    setup(args)
    if args.clip is not None and not args.clip.is_file():
        raise SystemExit(f"--clip {args.clip}: no such file")
    path = args.clip or (
        synthetic_clip(10, 160, 90, 30) if args.quick else synthetic_clip(args.seconds, 640, 360, 30)
    )

    variants = dict(VARIANTS)
    note = ""
    if importlib.util.find_spec("decord") is None:
        del variants["decord"]
        note = "decord is not installed (pip install decord, or put it on PYTHONPATH): no decord column.\n"
    measures = {
        (name, n): (
            lambda n=n, kwargs=kwargs: timed(lambda: load_video(path, n, sampling="uniform", **kwargs))
        )
        for n in args.num_frames
        for name, kwargs in variants.items()
    }
    seconds = {key: median(values) for key, values in interleaved(measures, args.repeats).items()}

    frames, keyframes = keyframe_count(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        clip = f"{path.name}: {frames:,} frames, {stream.width}x{stream.height}, {float(stream.average_rate):g} fps"
    print(
        f"Sampling frames uniformly with load_video; {clip}, {keyframes} keyframes; "
        f"{machine_note()} (decoders use their own threads); median of {args.repeats} round(s)\n{note}"
    )
    fastest = {n: min(seconds[name, n] for name in variants) for n in args.num_frames}
    rows = [
        [n, name, f"{seconds[name, n]:.3f}", f"{seconds[name, n] / fastest[n]:.2f}x"]
        for n in args.num_frames
        for name in variants
    ]
    print(markdown_table(["frames sampled", "decoder", "seconds", "vs fastest"], rows))

    figure, axis = new_figure()
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        positions = [j + i * width for j in range(len(args.num_frames))]
        axis.bar(positions, [seconds[name, n] for n in args.num_frames], width, label=name)
    axis.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(args.num_frames))])
    axis.set_xticklabels([f"{n} frames" for n in args.num_frames])
    axis.set(ylabel="seconds per video", title=clip)
    axis.title.set_fontsize(9)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend()
    save_figure(figure, args.out / "video_decoding.png")


if __name__ == "__main__":
    main()
