"""A browser demo: upload or pick a video, see the sampled frames, chat about it with streamed
answers, and see which frames each answer read (the slow-token attention map).

One generation runs at a time; other visitors wait in a visible queue.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image

from ..attention_maps import save_attention_map_png
from ..inference import Reply, build_conversation, compute_attention_map, first_line, text_span
from .model_runner import ModelRunner


def _chat(turns: list[tuple[str, str]]) -> list[dict]:
    """Chatbot messages for (question, answer) turns."""
    return [
        message
        for asked, answered in turns
        for message in ({"role": "user", "content": asked}, {"role": "assistant", "content": answered})
    ]


def _attention_image(
    runner: ModelRunner, reply: Reply, frames: np.ndarray, title: str
) -> tuple[PIL.Image.Image | None, str]:
    """The attention map PNG of what the question's own tokens read (`title`: the question), and a
    sentence naming the frame they read most."""
    try:
        span = text_span(runner.processor, reply.prompt, title, len(frames))
    except ValueError as error:
        return None, f"No attention map: {first_line(error)}"
    with runner.lock:
        attention = compute_attention_map(runner.model, reply.output, reply.video, span)
    with tempfile.TemporaryDirectory() as directory:
        path = save_attention_map_png(
            attention, Path(directory) / "attention.png", frames=frames, title=title
        )
        image = PIL.Image.open(path)
        image.load()
    per_frame = ", ".join(f"{mass:.2f}" for mass in attention.per_frame)
    summary = (
        f"The question's words read **frame {attention.peak_frame}** most. Attention per frame: {per_frame}"
    )
    return image, summary


def load_frames(runner: ModelRunner, video: str | None, num_frames: int, fps: float):
    """Handler for a new video or new sampling settings: the decoded frames, gallery items
    `(frame, caption)`, and an emptied chat (chatbot, turns, attention image and summary)."""
    reset = ([], [], None, "")
    if not video:
        return None, [], *reset
    try:
        frames, metadata = runner.load_video(video, int(num_frames), fps)
    except (OSError, ValueError) as error:
        raise gr.Error(f"Cannot use this video: {str(error).replace(video, Path(video).name)}") from error
    gallery = [
        (frame, f"frame {i} · {seconds:.2f} s")
        for i, (frame, seconds) in enumerate(zip(frames, metadata.timestamps))
    ]
    return frames, gallery, *reset


def respond(runner: ModelRunner, question, frames, turns, temperature, max_new_tokens, show_attention):
    """Handler for a question: yields (chatbot messages, emptied question box, turns, attention image,
    attention summary) as the answer streams in; the attention map comes with the last yield."""
    question = question.strip()
    if frames is None:
        raise gr.Error("Upload a video or pick a sample first.")
    if not question:
        gr.Warning("Type a question first.")
        yield _chat(turns), "", turns, gr.skip(), gr.skip()
        return
    generation = runner.start(
        build_conversation(question, turns), frames, int(max_new_tokens), float(temperature)
    )
    history = _chat(turns) + [{"role": "user", "content": question}]
    text = ""
    for piece in generation:
        text += piece
        yield [*history, {"role": "assistant", "content": text}], "", turns, gr.skip(), gr.skip()
    try:
        reply = generation.result()
    except ValueError as error:  # e.g. a question longer than the model's positions
        raise gr.Error(f"Cannot answer: {first_line(error)}") from error
    turns = [*turns, (question, reply.text)]
    image, summary = None, ""
    if show_attention:
        image, summary = _attention_image(runner, reply, frames, question)
    yield _chat(turns), "", turns, image, summary


def build_demo(runner: ModelRunner, samples: Sequence[str | Path] = ()) -> gr.Blocks:
    """The Gradio app for `runner`, queued: one event at a time, the others wait in a visible queue."""
    with gr.Blocks(title="slowfast-vlm demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# Slow-Fast video chat\nModel: `{runner.name}`. Upload a video, then ask about it.")
        frames = gr.State(None)  # (T, H, W, 3) uint8 of this visitor's video
        turns = gr.State([])  # [(question, answer)] of this visitor's chat
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                if samples:
                    gr.Examples([[str(sample)] for sample in samples], inputs=[video], label="Sample videos")
                with gr.Accordion("Settings", open=False):
                    num_frames = gr.Slider(1, 256, value=runner.num_frames, step=1, label="Frames (at most)")
                    fps = gr.Slider(0.25, 30, value=runner.fps, step=0.25, label="Sampling rate (frames/s)")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                    show_attention = gr.Checkbox(True, label="Show which frames the question read")
                gallery = gr.Gallery(label="Sampled frames", columns=6, height=220, elem_id="frames")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the video", show_label=False, scale=5, elem_id="question"
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear = gr.Button("New chat", scale=1)
                attention_image = gr.Image(
                    label="Which frames the answer read", type="pil", elem_id="attention"
                )
                attention_text = gr.Markdown(elem_id="attention-summary")

        loaded = [frames, gallery, chatbot, turns, attention_image, attention_text]
        for trigger in (video.change, num_frames.release, fps.release):
            trigger(partial(load_frames, runner), [video, num_frames, fps], loaded)
        answered = [chatbot, question, turns, attention_image, attention_text]
        asked = [question, frames, turns, temperature, max_new_tokens, show_attention]
        for trigger in (question.submit, send.click):
            trigger(partial(respond, runner), asked, answered)
        clear.click(lambda: ([], [], None, ""), None, [chatbot, turns, attention_image, attention_text])
    return demo.queue(default_concurrency_limit=1)


def launch(demo: gr.Blocks, host: str, port: int, max_upload_mb: float = 256, block: bool = True) -> str:
    """Start the demo's web server; returns its URL (`block=False`: in the background)."""
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=int(max_upload_mb * 1024 * 1024),
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo.local_url


def main(args: argparse.Namespace) -> int:
    from ..default_model import DEMO_CLIP

    samples = args.samples if args.samples is not None else [p for p in (DEMO_CLIP,) if p.exists()]
    missing = [str(sample) for sample in samples if not sample.is_file()]
    if missing:
        print(f"slowfast-vlm demo: --samples: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        runner = ModelRunner.from_args(args)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm demo: cannot load model: {first_line(error)}", file=sys.stderr)
        return 2
    launch(build_demo(runner, samples), args.host, args.port, args.max_upload_mb)
    return 0
