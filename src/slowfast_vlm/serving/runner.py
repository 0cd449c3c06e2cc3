"""One loaded model shared by the demo and the API server: video decoding with the model's frame
settings, and generations that stream text from a worker thread, one at a time on the model."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..ask import DTYPES, load_model_and_processor, reply, resolve_device_dtype
from ..processing.video import VideoMetadata, load_video


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype`: the options of `ModelRunner.from_args`."""
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the shipped demo model)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="default: bfloat16 on GPU")


@dataclass
class Reply:
    """A finished generation.

    Attributes:
        text: the answer, cut before the first stop sequence.
        finish_reason: "stop" (end of turn or a stop sequence) or "length" (`max_new_tokens` reached).
        output: `(1, L)` prompt + generated ids.
        video: `(T, 3, H, W)` pixels the model saw, or None for a text-only chat.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    output: torch.Tensor
    video: torch.Tensor | None


class StopTrimmer:
    """Streams text up to the first of `stops`: holds back a tail that could still become a stop
    sequence, and drops everything from a stop sequence on."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is safe to emit now."""
        if self.stopped:
            return ""
        self.pending += text
        cuts = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self.pending[: min(cuts)]
        held = max(
            (n for stop in self.stops for n in range(1, len(stop)) if self.pending.endswith(stop[:n])),
            default=0,
        )
        ready, self.pending = (
            self.pending[: len(self.pending) - held],
            self.pending[len(self.pending) - held :],
        )
        return ready

    def flush(self) -> str:
        """What was held back at the end of the stream (never part of a stop sequence)."""
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest


class _Cancelled(StoppingCriteria):
    """Stops generation once `event` is set (e.g. the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _PromptCountingStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that also notes the prompt length (`generate` puts the prompt first)."""

    prompt_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.prompt_tokens = value.shape[-1]
        super().put(value)


class Generation:
    """A generation running in a worker thread. Iterate it for text pieces as they are generated
    (already cut at a stop sequence), then call `result()` for the `Reply`."""

    def __init__(self, runner: ModelRunner, stop: Sequence[str], cancel: threading.Event | None, **kwargs):
        self.streamer = _PromptCountingStreamer(
            runner.processor.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        self.trimmer = StopTrimmer(stop)
        self.future: Future[Reply] = Future()
        worker = threading.Thread(target=self._run, args=(runner, stop, cancel), kwargs=kwargs, daemon=True)
        worker.start()

    def _run(
        self, runner: ModelRunner, stop: Sequence[str], cancel: threading.Event | None, **kwargs
    ) -> None:
        try:
            self.future.set_result(runner._generate(self.streamer, stop, cancel, **kwargs))
        except BaseException as error:  # handed to whoever calls result()
            self.streamer.end()  # unblocks the iterator: generate() never reached its own end()
            self.future.set_exception(error)

    def __iter__(self) -> Iterator[str]:
        for text in self.streamer:
            if piece := self.trimmer.feed(text):
                yield piece
        if rest := self.trimmer.flush():
            yield rest

    def result(self, timeout: float | None = None) -> Reply:
        """The finished `Reply`; re-raises the generation's error."""
        return self.future.result(timeout)


class ModelRunner:
    """A model + processor with its video defaults; generations run one at a time.

    Args:
        name: the model's name in the API (`load` uses the checkpoint directory's name or the hub id).
    """

    def __init__(self, model, processor, name: str = "slowfast-vlm"):
        self.model, self.processor, self.name = model, processor, name
        defaults = processor.sampling_defaults()
        self.num_frames: int = defaults["num_frames"]
        self.fps: float = defaults["fps"]
        self.sampling: str = defaults["sampling"]
        self.lock = threading.Lock()  # one generation at a time on the model

    @classmethod
    def load(cls, model_id: str | None = None, device: str = "auto", dtype: str = "auto") -> ModelRunner:
        """Load `model_id` (default: the shipped demo model); `OSError` if it cannot be found."""
        from ..default_model import default_model_path

        model_id = model_id or str(default_model_path())
        model, processor = load_model_and_processor(model_id, *resolve_device_dtype(device, dtype))
        local = Path(model_id)
        return cls(model, processor, name=local.resolve().name if local.is_dir() else model_id)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelRunner:
        return cls.load(args.model, args.device, args.dtype)

    def load_video(
        self, path: str | Path, num_frames: int | None = None, fps: float | None = None
    ) -> tuple[np.ndarray, VideoMetadata]:
        """Decoded frames `(T, H, W, 3)` uint8 sampled with the given or the model's settings."""
        return load_video(path, num_frames or self.num_frames, fps=fps or self.fps, sampling=self.sampling)

    def start(
        self,
        conversation: list[dict],
        frames: np.ndarray | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Start answering the chat-template `conversation` (its `{"type": "video"}` part takes `frames`)."""
        return Generation(
            self,
            stop,
            cancel,
            conversation=conversation,
            frames=frames,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )

    def generate(self, conversation: list[dict], frames: np.ndarray | None = None, **kwargs) -> Reply:
        """`start(...).result()`: the whole answer at once."""
        return self.start(conversation, frames, **kwargs).result()

    def _generate(
        self,
        streamer: _PromptCountingStreamer,
        stop: Sequence[str],
        cancel: threading.Event | None,
        conversation: list[dict],
        frames: np.ndarray | None,
        max_new_tokens: int,
        temperature: float,
    ) -> Reply:
        extra = {}
        if stop:
            extra.update(stop_strings=list(stop), tokenizer=self.processor.tokenizer)
        if cancel is not None:
            extra.update(stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        with self.lock, torch.inference_mode():
            text, output, video = reply(
                self.model,
                self.processor,
                conversation,
                frames,
                max_new_tokens,
                temperature,
                streamer,
                **extra,
            )
        trimmer = StopTrimmer(stop)
        trimmed = trimmer.feed(text) + trimmer.flush()
        completion_tokens = output.shape[1] - streamer.prompt_tokens
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        at_length = completion_tokens >= max_new_tokens and output[0, -1].item() not in eos
        return Reply(
            text=trimmed.strip(),
            finish_reason="length" if at_length and not trimmer.stopped else "stop",
            prompt_tokens=streamer.prompt_tokens,
            completion_tokens=completion_tokens,
            output=output,
            video=video,
        )
