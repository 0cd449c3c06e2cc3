"""One loaded model shared by the demo and the API server: video decoding with the model's frame
settings, and generations (`inference.reply`) that stream text from a worker thread, one at a time
on the model, through the runner's `VisualCache` (a video is encoded once; a conversation's next turn
continues from the caches of the turn before)."""

from __future__ import annotations

import argparse
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..default_model import default_model_path
from ..inference import Reply, load_model, reply
from ..processing.video import VideoMetadata
from ..visual_cache import VisualCache


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


class Generation:
    """A generation running in a worker thread. Iterate it for text pieces as they are generated
    (already cut at a stop sequence), then call `result()` for the `Reply` (its text cut there too)."""

    def __init__(self, runner: ModelRunner, stop: Sequence[str], cancel: threading.Event | None, **kwargs):
        self.streamer = TextIteratorStreamer(
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
        visual_cache_mb: the `VisualCache`'s budget in MiB (0: no cache, every turn runs in full).
    """

    def __init__(self, model, processor, name: str = "slowfast-vlm", visual_cache_mb: float = 1024):
        self.model, self.processor, self.name = model, processor, name
        self.visual_cache = VisualCache.from_megabytes(visual_cache_mb) if visual_cache_mb > 0 else None
        defaults = processor.sampling_defaults()
        self.num_frames: int = defaults["num_frames"]
        self.fps: float = defaults["fps"]
        self.sampling: str = defaults["sampling"]
        self.lock = threading.Lock()  # one generation at a time on the model

    @classmethod
    def load(
        cls,
        model_id: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        visual_cache_mb: float = 1024,
    ) -> ModelRunner:
        """Load `model_id` (default: the shipped demo model) with `inference.load_model`; `OSError` if
        it cannot be found, `ValueError` for a bad device or dtype."""
        model_id = model_id or str(default_model_path())
        model, processor = load_model(model_id, device, dtype)
        local = Path(model_id)
        name = local.resolve().name if local.is_dir() else model_id
        return cls(model, processor, name=name, visual_cache_mb=visual_cache_mb)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelRunner:
        """`load` with the options of `model_options.add_model_arguments` and `--visual-cache-mb`."""
        return cls.load(args.model, args.device, args.dtype, args.visual_cache_mb)

    def load_video(
        self, path: str | Path, num_frames: int | None = None, fps: float | None = None, **caps
    ) -> tuple[np.ndarray, VideoMetadata]:
        """Decoded frames `(T, H, W, 3)` uint8 sampled with the given (None: the model's) settings,
        scaled while decoding to the model's input size; `caps` (`max_source_pixels`, `max_duration`)
        go to `load_video`."""
        return self.processor.load_video(
            path,
            self.num_frames if num_frames is None else num_frames,
            fps=self.fps if fps is None else fps,
            sampling=self.sampling,
            **caps,
        )

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
        streamer: TextIteratorStreamer,
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
        with self.lock:
            result = reply(
                self.model,
                self.processor,
                conversation,
                frames,
                max_new_tokens,
                temperature,
                streamer,
                visual_cache=self.visual_cache,
                **extra,
            )
        trimmer = StopTrimmer(stop)
        trimmed = trimmer.feed(result.text) + trimmer.flush()
        # a stop sequence ends the answer even where it came with the last allowed token
        finish_reason = "stop" if trimmer.stopped else result.finish_reason
        return dataclasses.replace(result, text=trimmed.strip(), finish_reason=finish_reason)
