"""The Gradio demo: its chat logic, and the page driven in headless Chromium (Selenium)."""

import os
import shutil
import socket
from pathlib import Path

import pytest
from serving_helpers import chatml, greedy_reference

from slowfast_vlm.inference import answer
from slowfast_vlm.processing.video import load_video

gr = pytest.importorskip("gradio", reason="needs the serve extra: pip install 'slowfast-vlm[serve]'")
from slowfast_vlm.serving.demo import build_demo, launch, load_frames, respond  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"


def test_respond_streams_a_multi_turn_chat(runner, checkpoint, media_root):
    """The demo's event handlers, called directly: load a video, ask twice, get the greedy answers."""
    _, model, processor = checkpoint
    frames, gallery, *_ = load_frames(runner, str(media_root / "clip.mp4"), 8, 8.0)
    # 8 of 12 frames at 8 fps: the fourth pick is frame round(4 * 12 / 8 - 1) = 5, at 5 / 8 s
    assert len(gallery) == len(frames) == 8 and gallery[3][1] == "frame 3 · 0.62 s"

    first = list(respond(runner, "What happens?", frames, [], 0, 6, True))
    chat, _, turns, image, summary = first[-1]
    expected = answer(model, processor, frames, "What happens?", max_new_tokens=6).text
    assert turns == [("What happens?", expected)] and chat[-1] == {"role": "assistant", "content": expected}
    assert image.size[0] > 100 and "frame" in summary

    reuses = runner.visual_cache.stats["conversation_reuses"]
    encoded = []  # the follow-up encodes nothing: the video's slow tokens and the chat's KV cache are kept
    hook = runner.model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(1))
    try:
        chat, _, turns, _, _ = list(respond(runner, "Is there a dog?", frames, turns, 0, 6, False))[-1]
    finally:
        hook.remove()
    history = [("user", "What happens?"), ("assistant", expected), ("user", "Is there a dog?")]
    assert turns[-1][1] == greedy_reference(model, processor, chatml(*history), frames, 6)[0]
    assert encoded == [] and runner.visual_cache.stats["conversation_reuses"] == reuses + 1
    assert [message["role"] for message in chat] == ["user", "assistant"] * 2


def test_bad_video_is_a_page_error(runner, tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(gr.Error, match="Cannot use this video: notes.mp4: not a readable video"):
        load_frames(runner, str(tmp_path / "notes.mp4"), 8, 2.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)
def test_demo_in_headless_chromium(runner, checkpoint, media_root, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    _, model, processor = checkpoint
    frames = load_video(media_root / "clip.mp4", runner.num_frames, fps=runner.fps)[0]
    expected = answer(model, processor, frames, "What happens?", max_new_tokens=128).text

    demo = build_demo(runner, samples=[media_root / "clip.mp4"])
    url = launch(demo, "127.0.0.1", _free_port(), block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1400",
    ):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager must not try to download one
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(url)
        upload = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#video input[type=file]")))
        upload.send_keys(str(media_root / "clip.mp4"))
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#frames img")) == len(frames))

        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What happens?")
        browser.find_element(By.CSS_SELECTOR, "#send").click()
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#attention img"))
        bot = browser.find_elements(By.CSS_SELECTOR, "#chat .message.bot, #chat [data-testid=bot]")
        assert bot and bot[-1].text.strip() == expected
        assert "read frame" in browser.find_element(By.CSS_SELECTOR, "#attention-summary").text

        screenshot = tmp_path / "demo.png"
        browser.save_screenshot(str(screenshot))
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / "demo.png")
        print(f"screenshot: {ARTIFACTS / 'demo.png'}")

        # a file that is no video: the reason shows in the page
        (tmp_path / "notes.mp4").write_text("not a video")
        browser.get(url)
        upload = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#video input[type=file]")))
        upload.send_keys(str(tmp_path / "notes.mp4"))
        reason = "Cannot use this video: notes.mp4: not a readable video container"
        wait.until(lambda _: reason in browser.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(ARTIFACTS / "demo-bad-video.png"))
    finally:
        browser.quit()
        demo.close()
