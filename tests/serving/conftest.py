"""Shared fixtures: one tiny checkpoint, its runner, a media root with a clip, and in-process servers."""

import threading
import time

import pytest
from helpers import save_tiny_checkpoint, write_random_video

from slowfast_vlm.serving.model_runner import ModelRunner


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(directory, in-memory model, processor) of a tiny saved checkpoint."""
    path = tmp_path_factory.mktemp("serving") / "tiny-slowfast"
    model, processor = save_tiny_checkpoint(path)
    return path, model, processor


@pytest.fixture(scope="session")
def runner(checkpoint):
    return ModelRunner.load(str(checkpoint[0]), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def media_root(tmp_path_factory):
    """A media root holding `clip.mp4` (12 random frames at 8 fps)."""
    root = tmp_path_factory.mktemp("media")
    write_random_video(root / "clip.mp4", num_frames=12, fps=8)
    return root


@pytest.fixture(scope="session")
def serve():
    """`serve(app) -> base URL`: runs an ASGI app with uvicorn in a thread on a free 127.0.0.1 port."""
    import uvicorn

    servers = []

    def start(app) -> str:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
