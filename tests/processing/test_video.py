"""Tests of slowfast_vlm.processing.video on small videos written here with PyAV.

Every frame carries its own index as 8 big black/white blocks (one bit each), which
survives lossy compression, so each test can tell exactly WHICH frame came back.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from slowfast_vlm.processing.video import (
    VideoDecodeError,
    fps_sample_indices,
    load_video,
    uniform_sample_indices,
)

H, W = 32, 64  # 2 x 4 blocks of 16 x 16 pixels
BLOCK = 16


def code_image(index: int) -> np.ndarray:
    """(H, W, 3) uint8 frame whose 8 blocks spell ``index`` in binary (row-major, MSB first)."""
    bits = [(index >> (7 - b)) & 1 for b in range(8)]
    grid = np.array(bits, dtype=np.uint8).reshape(2, 4) * 255
    return np.repeat(np.repeat(grid, BLOCK, 0), BLOCK, 1)[..., None].repeat(3, axis=2)


def read_index(frame: np.ndarray) -> int:
    """Inverse of code_image on a decoded (upright) frame: threshold each block's centre."""
    index = 0
    for b in range(8):
        r, c = divmod(b, 4)
        centre = frame[r * BLOCK + 4 : (r + 1) * BLOCK - 4, c * BLOCK + 4 : (c + 1) * BLOCK - 4]
        index = (index << 1) | int(centre.mean() > 128)
    return index


def write_video(
    path: Path,
    codec: str,
    fps: int,
    n: int,
    *,
    pts_ms: list[int] | None = None,
    rotation: int | None = None,
    gop: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode frames 0..n-1 (each showing its index); ``pts_ms`` gives explicit, possibly irregular, timestamps."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(code_image(i), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_indices(frames: np.ndarray) -> list[int]:
    return [read_index(f) for f in frames]


# ----------------------------------------------------------------- index functions


def reference_fps_indices(total, video_fps, num_frames, target_fps):
    # Transcribed from the published sampling code (section 1.1), independently of the module.
    interval = round(video_fps / target_fps)
    if interval < 1:
        interval = 1
    frame_idx = list(range(total))[::interval]
    if len(frame_idx) < num_frames:
        return frame_idx
    n = len(frame_idx)
    return [frame_idx[round((i + 1) * n / num_frames - 1)] for i in range(num_frames)]


def test_fps_sample_indices_matches_reference_formula():
    combos = itertools.product(
        [1, 2, 7, 30, 31, 100, 241, 1000, 4499],
        [10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0],
        [1, 2, 8, 16, 64],
        [0.5, 1.0, 2.0, 4.0, 50.0],
    )
    checked = 0
    for total, video_fps, num, target in combos:
        assert fps_sample_indices(total, video_fps, num, target) == reference_fps_indices(
            total, video_fps, num, target
        ), (total, video_fps, num, target)
        checked += 1
    assert checked == 9 * 8 * 5 * 5


def test_fps_sample_indices_uses_bankers_rounding():
    # 25 / 2 = 12.5 rounds to 12 (half to even), not 13.
    assert fps_sample_indices(100, 25.0, 100, 2.0) == list(range(0, 100, 12))
    # 3 candidates, 2 wanted: positions round(0.5) = 0 and round(2.0) = 2.
    assert fps_sample_indices(3, 10.0, 2, 10.0) == [0, 2]
    # Fewer candidates than wanted: all of them.
    assert fps_sample_indices(10, 30.0, 64, 2.0) == [0]
    assert fps_sample_indices(60, 30.0, 64, 2.0) == [0, 15, 30, 45]


def test_uniform_sample_indices_truncates_like_linspace_int():
    for total, num in itertools.product([1, 2, 5, 8, 31, 100, 997], [1, 2, 3, 7, 16, 64]):
        expected = [int(x) for x in np.linspace(0, total - 1, num)]  # int() truncates, as dtype=int does
        assert uniform_sample_indices(total, num) == expected, (total, num)
    assert uniform_sample_indices(8, 3) == [0, 3, 7]  # 3.5 truncated, not rounded to 4
    assert uniform_sample_indices(2, 4) == [0, 0, 0, 1]  # more wanted than exist: repeats


@pytest.mark.parametrize(
    "call",
    [
        lambda: fps_sample_indices(0, 30.0, 4, 2.0),
        lambda: fps_sample_indices(10, 30.0, 0, 2.0),
        lambda: fps_sample_indices(10, 30.0, 4, 0.0),
        lambda: fps_sample_indices(10, 0.0, 4, 2.0),
        lambda: uniform_sample_indices(0, 4),
        lambda: uniform_sample_indices(10, 0),
    ],
)
def test_index_functions_reject_bad_counts(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------ decoding


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4_h264_10": write_video(d / "a.mp4", "libx264", 10, 37),
        "webm_vp9_24": write_video(d / "b.webm", "libvpx-vp9", 24, 50, gop=6),
        "mkv_h264_30": write_video(d / "c.mkv", "libx264", 30, 61, gop=5),
        "mp4_h264_30_gop5": write_video(d / "d.mp4", "libx264", 30, 90, gop=5),
        "mkv_mjpeg_24": write_video(d / "e.mkv", "mjpeg", 24, 40),
    }


CFR = [
    ("mp4_h264_10", 10, 37),
    ("webm_vp9_24", 24, 50),
    ("mkv_h264_30", 30, 61),
    ("mp4_h264_30_gop5", 30, 90),
]


@pytest.mark.parametrize(("name", "fps", "n"), CFR)
@pytest.mark.parametrize("sampling", ["fps", "uniform"])
def test_decodes_the_sampled_frames(videos, name, fps, n, sampling):
    frames, meta = load_video(videos[name], num_frames=8, fps=4.0, sampling=sampling)
    expected = fps_sample_indices(n, fps, 8, 4.0) if sampling == "fps" else uniform_sample_indices(n, 8)
    assert frames.dtype == np.uint8 and frames.shape == (len(expected), H, W, 3)
    assert meta.frame_indices == expected
    assert decoded_indices(frames) == expected
    assert meta.total_frames == n
    assert meta.average_fps == pytest.approx(fps)
    assert meta.duration == pytest.approx(n / fps, abs=0.05)
    # Timestamps are stored in a millisecond time base in webm/mkv: allow that rounding.
    assert meta.timestamps == pytest.approx([i / fps for i in expected], abs=1e-3)
    assert (meta.width, meta.height, meta.backend) == (W, H, "pyav")


def test_default_target_fps_is_two(videos):
    _, meta = load_video(videos["mkv_h264_30"], num_frames=64)
    assert meta.frame_indices == [0, 15, 30, 45, 60]  # step round(30 / 2) = 15


@pytest.mark.parametrize("name", ["webm_vp9_24", "mkv_h264_30", "mp4_h264_30_gop5", "mkv_mjpeg_24"])
@pytest.mark.parametrize("sampling", ["fps", "uniform"])
def test_seeking_gives_the_same_frames_as_decoding_everything(videos, name, sampling):
    seeked, seek_meta = load_video(videos[name], num_frames=6, fps=3.0, sampling=sampling, seek=True)
    full, full_meta = load_video(videos[name], num_frames=6, fps=3.0, sampling=sampling, seek=False)
    assert seek_meta.seeks > 0  # the seek path really seeked (small GOPs)
    assert full_meta.seeks == 0
    assert seek_meta.frame_indices == full_meta.frame_indices
    assert decoded_indices(seeked) == full_meta.frame_indices
    # Same decoder, same keyframe-started GOPs: bit-identical pixels.
    np.testing.assert_array_equal(seeked, full)
    assert seek_meta.timestamps == pytest.approx(full_meta.timestamps)


def test_repeated_indices_are_all_returned(videos):
    frames, meta = load_video(videos["mkv_h264_30"], num_frames=3, sampling="uniform", seek=True)
    assert meta.frame_indices == [0, 30, 60]
    frames, meta = load_video(videos["mkv_mjpeg_24"], num_frames=50, sampling="uniform", seek=True)
    assert len(frames) == 50 and meta.frame_indices == uniform_sample_indices(40, 50)
    assert decoded_indices(frames) == meta.frame_indices


# Irregular gaps (ms); frame i is the i-th frame in presentation order, whatever its time.
VFR_PTS = [0, 10, 50, 60, 200, 210, 220, 400, 401, 500, 600, 610, 620, 700, 800, 900, 1000, 1500, 1600, 1700]
VFR_PTS += [1700 + 7 * k * k for k in range(1, 21)]


@pytest.mark.parametrize(
    ("suffix", "codec"), [("mkv", "libx264"), ("mp4", "libx264"), ("webm", "libvpx-vp9")]
)
def test_variable_frame_rate(tmp_path, suffix, codec):
    # Starts at 250 ms: timestamps count from the first frame.
    path = write_video(
        tmp_path / f"vfr.{suffix}", codec, 30, len(VFR_PTS), pts_ms=[250 + t for t in VFR_PTS], gop=4
    )
    for seek in (True, False):
        frames, meta = load_video(path, num_frames=9, sampling="uniform", seek=seek)
        expected = uniform_sample_indices(len(VFR_PTS), 9)
        assert meta.total_frames == len(VFR_PTS)
        assert decoded_indices(frames) == expected == meta.frame_indices
        assert meta.timestamps == pytest.approx([VFR_PTS[i] / 1000 for i in expected], abs=1e-3)
        assert (meta.seeks > 0) == seek


def test_duplicate_timestamps_fall_back_to_sequential_decoding(tmp_path):
    src = write_video(tmp_path / "src.mkv", "mjpeg", 10, 12)
    dup = tmp_path / "dup.mkv"
    # Remux with frames 4 and 5 sharing a timestamp: "the frame at pts t" is ambiguous there.
    with av.open(str(src)) as inp, av.open(str(dup), "w") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        packets = [p for p in inp.demux(in_stream) if p.size]
        packets[5].pts = packets[5].dts = packets[4].pts
        for packet in packets:
            packet.stream = out_stream
            out.mux(packet)
    frames, meta = load_video(dup, num_frames=12, sampling="uniform")
    assert meta.seeks == 0
    assert decoded_indices(frames) == list(range(12))
    with pytest.raises(VideoDecodeError, match="dup.mkv: cannot seek"):
        load_video(dup, num_frames=12, sampling="uniform", seek=True)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_display_rotation_is_applied(tmp_path, rotation):
    # PyAV writes the display matrix with set_display_rotation; older PyAV has no way to write it.
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write display rotation metadata")
    path = write_video(tmp_path / "rot.mp4", "libx264", 10, 12, rotation=rotation)
    frames, meta = load_video(path, num_frames=3, sampling="uniform")
    quarter_turns = rotation // 90
    assert meta.frame_indices == [0, 5, 11]
    # The rotation is counter-clockwise, which is np.rot90's direction.
    expected_hw = (W, H) if quarter_turns % 2 else (H, W)
    assert frames.shape == (3, *expected_hw, 3) and (meta.height, meta.width) == expected_hw
    for frame, index in zip(frames, meta.frame_indices):
        upright = np.rot90(code_image(index), quarter_turns).astype(int)
        assert np.abs(frame.astype(int) - upright).mean() < 10
        assert read_index(np.rot90(frame, -quarter_turns)) == index


def test_video_with_audio_track_uses_the_video_stream(tmp_path):
    path = tmp_path / "av.mp4"
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=16000)
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        for i in range(10):
            for packet in video.encode(av.VideoFrame.from_ndarray(code_image(i), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for packet in _encode_silence(audio, 10):
            container.mux(packet)
    frames, meta = load_video(path, num_frames=4, sampling="uniform")
    assert decoded_indices(frames) == meta.frame_indices == [0, 3, 6, 9]


# -------------------------------------------------------------------------- errors


def _encode_silence(stream, n_frames: int):
    for i in range(n_frames):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = stream.rate, i * 1024
        yield from stream.encode(frame)
    yield from stream.encode()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(tmp_path / "nope.mp4", num_frames=4)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4: empty file"):
        load_video(path, num_frames=4)


def test_text_file_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoDecodeError, match=r"notes\.mp4: not a readable video container"):
        load_video(path, num_frames=4)


def test_audio_only_file(tmp_path):
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for packet in _encode_silence(stream, 8):
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match=r"speech\.m4a: no video stream \(audio-only file\)"):
        load_video(path, num_frames=4)


def test_truncated_mp4_without_index(tmp_path, videos):
    # A plain mp4 keeps its index (moov) at the end: cutting the file loses it.
    data = videos["mp4_h264_10"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match=r"cut\.mp4: not a readable video container"):
        load_video(path, num_frames=4)


@pytest.fixture
def faststart_mp4(tmp_path) -> Path:
    # Index first (faststart), no B-frames: cutting the file drops whole frames from the end.
    return write_video(
        tmp_path / "fs.mp4",
        "libx264",
        10,
        30,
        options={"bf": "0"},
        container_options={"movflags": "faststart"},
    )


def _packet_ends(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [p.pos + p.size for p in container.demux(video=0) if p.size]


def test_truncated_mp4_at_a_frame_boundary_warns_and_uses_the_frames_present(tmp_path, faststart_mp4):
    path = tmp_path / "short.mp4"
    path.write_bytes(faststart_mp4.read_bytes()[: _packet_ends(faststart_mp4)[19]])
    with pytest.warns(UserWarning, match=r"short\.mp4: container declares 30 frames but only 20"):
        frames, meta = load_video(path, num_frames=5, sampling="uniform")
    assert meta.total_frames == 20
    assert decoded_indices(frames) == meta.frame_indices == uniform_sample_indices(20, 5)


@pytest.mark.parametrize("seek", [None, False])
def test_garbage_inside_the_stream_is_a_corrupt_stream(tmp_path, faststart_mp4, seek):
    data = bytearray(faststart_mp4.read_bytes())
    start = _packet_ends(faststart_mp4)[9]  # frame 10 begins here
    data[start : start + 4] = b"\xff" * 4  # its NAL length prefix now overruns the packet
    path = tmp_path / "garbled.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match=r"garbled\.mp4: corrupt video stream"):
        load_video(path, num_frames=30, sampling="uniform", seek=seek)


def test_frames_that_do_not_decode_are_not_counted(tmp_path):
    src = write_video(tmp_path / "src.mkv", "libx264", 30, 20, gop=5, options={"bf": "0"})
    path = tmp_path / "nokey.mkv"
    # Drop the first keyframe: frames 1-4 lose their reference and never come out of the decoder.
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in [p for p in inp.demux(in_stream) if p.size][1:]:
            packet.stream = out_stream
            out.mux(packet)
    with pytest.warns(UserWarning, match=r"nokey\.mkv: only 15 of the 19 frames in the container decode"):
        frames, meta = load_video(path, num_frames=5, sampling="uniform")
    assert meta.total_frames == 15
    assert meta.frame_indices == uniform_sample_indices(15, 5)
    assert decoded_indices(frames) == [5 + i for i in meta.frame_indices]
    assert meta.timestamps == pytest.approx([i / 30 for i in meta.frame_indices], abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 4, "sampling": "random"}, "sampling"),
        ({"num_frames": 4, "backend": "opencv"}, "backend"),
        ({"num_frames": 4, "fps": 0.0}, "fps"),
    ],
)
def test_bad_arguments(videos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_video(videos["mp4_h264_10"], **kwargs)


# -------------------------------------------------------------------------- decord


def test_decord_backend_matches_pyav(videos, tmp_path):
    pytest.importorskip("decord")
    rotated = write_video(tmp_path / "rot.mp4", "libx264", 10, 12, rotation=90)
    for path in (videos["mp4_h264_10"], videos["mkv_h264_30"], rotated):
        frames, meta = load_video(path, num_frames=6, fps=3.0, backend="decord")
        reference, ref_meta = load_video(path, num_frames=6, fps=3.0)
        assert meta.backend == "decord"
        assert meta.frame_indices == ref_meta.frame_indices
        assert meta.total_frames == ref_meta.total_frames
        assert meta.timestamps == pytest.approx(ref_meta.timestamps, abs=1e-3)
        assert frames.shape == reference.shape  # rotated the same way
        assert np.abs(frames.astype(int) - reference.astype(int)).mean() < 3


def test_decord_backend_errors_name_the_file(tmp_path):
    pytest.importorskip("decord")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    with pytest.raises(VideoDecodeError, match=r"notes\.mp4: not a readable video container"):
        load_video(text, num_frames=4, backend="decord")


def test_short_side_scales_frames_while_decoding(tmp_path):
    from PIL import Image

    from slowfast_vlm.processing.video import write_video as encode

    # smooth frames (gradients) so that two area-averaging resamplers agree closely
    y, x = np.mgrid[0:96, 0:128]
    frames = np.stack([np.stack([x * 2, y * 2, (x + y + 10 * t) % 256], -1) for t in range(8)]).astype(
        np.uint8
    )
    path = encode(tmp_path / "wide.mp4", frames, fps=8, crf=10)
    full, _ = load_video(path, 4, sampling="uniform")
    small, meta = load_video(path, 4, sampling="uniform", short_side=24)
    assert small.shape == (4, 24, 32, 3) and (meta.width, meta.height) == (32, 24)
    # independent reference: the full-size frames shrunk by Pillow's box filter (an area average)
    reference = np.stack(
        [np.asarray(Image.fromarray(f).resize((32, 24), Image.Resampling.BOX)) for f in full]
    )
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 3
    # never enlarged: a short side above the source's leaves the frames as stored
    assert np.array_equal(load_video(path, 4, sampling="uniform", short_side=500)[0], full)


def test_caps_on_source_pixels_and_duration(tmp_path):
    from slowfast_vlm.processing.video import write_video as encode

    path = encode(tmp_path / "clip.mp4", np.zeros((16, 24, 40, 3), np.uint8), fps=8)  # 2 s of 40x24
    assert len(load_video(path, 4, max_source_pixels=40 * 24, max_duration=2.0)[0]) == 4  # at the caps
    with pytest.raises(
        VideoDecodeError, match=r"clip\.mp4: frames of 40x24 = 960 pixels, over the limit of 959"
    ):
        load_video(path, 4, max_source_pixels=959)
    with pytest.raises(VideoDecodeError, match=r"clip\.mp4: 2 s long, over the limit of 1\.5 s"):
        load_video(path, 4, max_duration=1.5)
    with pytest.raises(ValueError, match="fps must be a finite number > 0, got inf"):
        load_video(path, 4, fps=float("inf"))
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1, got 2.5"):
        load_video(path, 2.5)


def test_transformers_keywords_all_frames_and_frames_alone(tmp_path):
    from slowfast_vlm.processing.video import write_video as encode

    frames = np.stack([np.full((16, 16, 3), 16 * i, np.uint8) for i in range(10)])
    path = encode(tmp_path / "ramp.mp4", frames, fps=8, crf=0)
    every, meta = load_video(path, 4, do_sample_frames=False)
    assert meta.frame_indices == list(range(10)) and len(every) == 10
    assert np.abs(every.astype(int) - frames.astype(int)).max() <= 3  # near-lossless: frame i is frame i
    alone = load_video(path, 4, sampling="uniform", return_metadata=False)
    assert isinstance(alone, np.ndarray) and np.array_equal(alone, every[[0, 3, 6, 9]])  # linspace(0, 9, 4)
