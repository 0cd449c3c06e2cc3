"""Peak memory (RSS) against a video's source resolution, for `slowfast-vlm ask` and for the server.

    python -m benchmarks.memory ask       # ask on the shipped model: 640x360 .. 4000x3000, 16 and 64 frames
    python -m benchmarks.memory serve     # the server under 200 concurrent 4000x3000 requests
    python -m benchmarks.memory ask --quick

`ask` runs each case in a fresh process, which reports its own peak RSS (`VmHWM` in /proc; the
`ru_maxrss` of a child also counts the parent's image it was forked from): the real command (frames scaled while decoding to the model's input size), and the same steps with
frames decoded at the source resolution (`short_side=None`), what `ask` did before. `serve` starts
`slowfast-vlm serve` with a memory budget, sends the requests at once from threads (127.0.0.1 only),
and reads the server's peak RSS (`VmHWM` in /proc) and the statuses it answered. Memory figures, not
timings: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .common import markdown_table

SIZES = [(640, 360), (1920, 1080), (4000, 3000)]
QUICK_SIZES = [(320, 180), (1280, 960)]

PEAK = """
import atexit, sys
def report():
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    sys.stderr.write(f"PEAK_KIB {hwm.split()[1]}\\n")
atexit.register(report)
"""
ASK = (
    PEAK
    + """
from slowfast_vlm.cli import main
main(["ask", *sys.argv[1:]])
"""
)
SOURCE_RESOLUTION = (
    PEAK
    + """
from slowfast_vlm.default_model import default_model_path
from slowfast_vlm.inference import answer, load_model
from slowfast_vlm.processing.video import load_video
model, processor = load_model(str(default_model_path()), "cpu", "float32")
frames, _ = load_video(sys.argv[1], int(sys.argv[2]), fps=8, short_side=None)
answer(model, processor, frames, "What digit is shown?", max_new_tokens=4)
"""
)


def write_clip(path: Path, width: int, height: int, frames: int, fps: int = 8) -> Path:
    """A `frames`-frame h264 clip: a flat background and a moving square (tiny files at any size,
    like the 48 KB, 4000x3000 clip of issue 17). An existing file is kept (`--clips`)."""
    if path.exists():
        return path
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        side = max(8, min(width, height) // 8)
        for i in range(frames):
            image = np.full((height, width, 3), 40, np.uint8)
            x = (i * side // 2) % max(1, width - side)
            image[height // 3 : height // 3 + side, x : x + side] = (230, 200, 20)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def peak_rss_mib(code: str, *args: str) -> float:
    """Run `python -c code args` to completion; the peak RSS it reports, in MiB (it must succeed)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    peaks = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_KIB ")]
    if result.returncode != 0 or not peaks:
        raise SystemExit(f"{args} failed: {result.stderr[-2000:]}")
    return int(peaks[-1]) / 1024


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min), {os.cpu_count()} cores"


def bench_ask(args: argparse.Namespace, folder: Path) -> str:
    rows = []
    for frames in args.frames:
        for width, height in QUICK_SIZES if args.quick else SIZES:
            clip = write_clip(folder / f"{width}x{height}x{frames}.mp4", width, height, frames)
            scaled = peak_rss_mib(
                ASK, str(clip), "What digit is shown?", "--frames", str(frames), "--max-new-tokens", "4"
            )
            source = peak_rss_mib(SOURCE_RESOLUTION, str(clip), str(frames))
            rows.append([f"{width}x{height}", frames, f"{clip.stat().st_size / 1024:.0f}", f"{scaled:.0f}",
                         f"{source:.0f}"])  # fmt: skip
    table = markdown_table(
        ["source", "frames", "file KiB", "ask: peak RSS MiB (decoded at model size)", "at source size MiB"],
        rows,
    )
    return f"{table}\n\n{load_note()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_mib(pid: int) -> float:
    """The peak RSS of a running process (Linux `VmHWM`), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def bench_serve(args: argparse.Namespace, folder: Path) -> str:
    import httpx

    width, height = (1280, 960) if args.quick else (4000, 3000)
    clip = write_clip(folder / "big.mp4", width, height, 64)
    body = json.dumps({
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()}},
            {"type": "text", "text": "What digit is shown?"}]}],
        "max_tokens": 1, "num_frames": 64,
    })  # fmt: skip
    port = free_port()
    command = [sys.executable, "-m", "slowfast_vlm.cli", "serve", "--port", str(port),
               "--memory-budget-mb", str(args.budget_mb), "--max-decoding", "2"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        idle = vm_hwm_mib(server.pid)

        def post(_: int) -> str:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body,
                                      headers={"Content-Type": "application/json"}, timeout=args.timeout)  # fmt: skip
                return str(response.status_code)
            except httpx.TransportError as error:
                return type(error).__name__

        started = time.monotonic()
        with ThreadPoolExecutor(args.requests) as pool:
            statuses = collections.Counter(pool.map(post, range(args.requests)))
        elapsed = time.monotonic() - started
        peak = vm_hwm_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    counts = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
    table = markdown_table(
        ["requests", "source", "body KiB", "budget MiB", "idle RSS MiB", "peak RSS MiB", "answers"],
        [[args.requests, f"{width}x{height}x64", f"{len(body) / 1024:.0f}", args.budget_mb, f"{idle:.0f}",
          f"{peak:.0f}", counts]],
    )  # fmt: skip
    return f"{table}\n\nall answered in {elapsed:.0f} s; {load_note()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("ask", "serve"))
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script runs")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64], help="frames per clip (ask)")
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests (serve)")
    parser.add_argument("--budget-mb", type=int, default=1024, help="the server's --memory-budget-mb")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a request may take (serve)")
    parser.add_argument("--clips", type=Path, help="keep the generated clips here, for the next run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.clips or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(bench_ask(args, folder) if args.what == "ask" else bench_serve(args, folder))


if __name__ == "__main__":
    main()
