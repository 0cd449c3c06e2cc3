"""The README's Python snippets run as written: each block is executed with the shipped demo model as
`path`, its demo clip as the `cat.mp4` / `clip.mp4` the snippets name, and, for the OpenAI client
snippet, a server on the 127.0.0.1:8000 it names. Blocks that need a hub download are listed, not run."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from slowfast_vlm.default_model import DEMO_CLIP, default_model_path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
NEEDS_THE_HUB = ("llava-hf/",)  # plug and play: downloads a 7B host model


@pytest.fixture
def in_clip_folder(tmp_path, monkeypatch) -> Path:
    for name in ("cat.mp4", "clip.mp4"):
        shutil.copy(DEMO_CLIP, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def server_on_8000(in_clip_folder):
    """The OpenAI snippet's server: the demo model on 127.0.0.1:8000, media root = the clip folder."""
    pytest.importorskip("openai")
    import uvicorn

    from slowfast_vlm.serving.model_runner import ModelRunner
    from slowfast_vlm.serving.server import create_app

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is in use")
    app = create_app(ModelRunner.load(None, "cpu", "float32"), media_root=in_clip_folder)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8000, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield
    server.should_exit = True
    thread.join(10)


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 5 and any("OpenAI(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_snippet_runs(index, in_clip_folder, request):
    block = BLOCKS[index]
    if any(marker in block for marker in NEEDS_THE_HUB):
        pytest.skip("downloads a hub model")
    if "OpenAI(" in block:
        request.getfixturevalue("server_on_8000")
    namespace = {"path": str(default_model_path())}
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    if "OpenAI(" in block:
        assert namespace["reply"].choices[0].message.content is not None
