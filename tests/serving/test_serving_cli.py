"""`slowfast-vlm serve` and `slowfast-vlm demo`: options reach the app; bad options exit 2 with a reason."""

import pytest

from slowfast_vlm.cli import main

pytest.importorskip("gradio", reason="needs the serve extra: pip install 'slowfast-vlm[serve]'")
from fastapi.testclient import TestClient  # noqa: E402


def test_serve_builds_the_app_from_its_options(checkpoint, media_root, monkeypatch):
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: started.update(app=app, host=host, port=port))
    args = ["--model", str(checkpoint[0]), "--device", "cpu", "--media-root", str(media_root)]
    assert (
        main(["serve", *args, "--served-model-name", "clips-bot", "--port", "9123", "--max-queue", "3"]) == 0
    )
    assert (started["host"], started["port"]) == ("127.0.0.1", 9123)
    client = TestClient(started["app"])
    assert client.get("/health").json() == {"status": "ok", "model": "clips-bot", "pending": 0}
    service = started["app"].state.service
    assert (service.max_queue, service.media_root) == (3, media_root)


def test_demo_launches_with_its_options(checkpoint, media_root, monkeypatch):
    import slowfast_vlm.serving.demo as demo

    launched = {}
    monkeypatch.setattr(
        demo, "launch", lambda app, host, port, mb: launched.update(host=host, port=port, mb=mb)
    )
    clip = str(media_root / "clip.mp4")
    assert main(["demo", "--model", str(checkpoint[0]), "--port", "7999", "--samples", clip]) == 0
    assert launched == {"host": "127.0.0.1", "port": 7999, "mb": 256}


@pytest.mark.parametrize(
    "args, reason",
    [
        (["serve", "--model", "{tmp}/nowhere"], "cannot load model"),
        (["serve", "--model", "{model}", "--media-root", "{tmp}/missing"], "--media-root"),
        (["demo", "--model", "{tmp}/nowhere"], "cannot load model"),
        (["demo", "--model", "{model}", "--samples", "{tmp}/none.mp4"], "no such file"),
    ],
)
def test_bad_options_exit_2_with_a_reason(args, reason, checkpoint, tmp_path, capsys):
    args = [arg.format(tmp=tmp_path, model=checkpoint[0]) for arg in args]
    assert main(args) == 2
    assert reason in capsys.readouterr().err
