"""The lmms-eval model `slowfast_vlm` (lmms-eval >= 0.7; optional extra: scripts/install_lmms_eval.sh).

lmms-eval finds it through the `lmms_eval.models` entry point of this package (`model_manifest`):

    lmms-eval --model slowfast_vlm --model_args pretrained=PATH,num_frames=64,fps=2 --tasks videomme

Model args: `pretrained` (a folder saved with `save_pretrained`, model + processor), `num_frames`
(most frames per video), `fps` (frame sampling rate), `sampling` ("fps" or "uniform"; these three
default to the model's own, `SlowFastProcessor.sampling_defaults`: 64 frames at 2 fps for the
released models), `device` (default: the process's accelerate device), `dtype` (as for
`inference.load_model`; "auto": bfloat16 on a GPU that supports it, else float32), `num_workers`
(video decoding threads), `on_error` ("mark" or "raise", see `SlowFastLMMS`), `visual_cache_mb` (MiB of
encoded videos kept, so that the questions of a video encode it once; 0: none; default 1024). `--batch_size N` batches requests. Under
`accelerate launch` each process holds a full model on its own GPU (data parallel).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from tqdm import tqdm

from ..inference import chat_prompt, generate_responses, load_model, to_device
from ..visual_cache import VisualCache
from .evaluator import prefetch

MODEL_ID = "slowfast_vlm"
FAILED_RESPONSE = "[slowfast_vlm: sample failed]"
"""What `generate_until` answers for a failed sample with `on_error=mark`: no option letter, no words
a task could score as right."""
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def model_manifest() -> ModelManifest:
    """The entry point lmms-eval loads (group `lmms_eval.models`)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SlowFastLMMS")


class SampleError(RuntimeError):
    """A request that could not be served (its visual input failed); the message names it."""


def generation_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's `generation_kwargs` as `model.generate` arguments, and its `until` stop strings.

    Sampling happens only when the task asks for `do_sample` with a temperature > 0 (or none given);
    `top_p` applies only when sampling. Keys for other models (e.g. `image_aspect_ratio`) are ignored.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = gen_kwargs.get("temperature")
    do_sample = bool(gen_kwargs.get("do_sample", False)) and (temperature is None or float(temperature) > 0)
    settings = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": do_sample,
    }
    if do_sample:
        settings["temperature"] = 1.0 if temperature is None else float(temperature)
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, until


class SlowFastLMMS(lmms):
    """A saved `SlowFastForConditionalGeneration` behind lmms-eval's simple-model interface.

    Each request's visuals (`doc_to_visual`) are video paths (decoded with `load_video`), image
    paths or PIL images; the context gets one placeholder per visual in front unless it has its own.

    A request whose visual cannot be read is logged with its task, split and doc id. With
    `on_error="mark"` (default) `generate_until` answers it with :data:`FAILED_RESPONSE` and goes on;
    with `"raise"` it finishes the other requests and then raises :class:`SampleError` listing every
    failure. `loglikelihood` always raises: any number returned would be scored as a choice.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        fps: float | None = None,
        sampling: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        num_workers: int = 2,
        on_error: str = "mark",
        visual_cache_mb: float = 1024,
        max_batch_size: int | None = None,  # passed by lmms-eval for "auto" batch sizes; unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"slowfast_vlm: unknown model_args {sorted(unknown)}; see {__name__}'s docstring"
            )
        if on_error not in ("mark", "raise"):
            raise ValueError(f"slowfast_vlm: on_error must be 'mark' or 'raise', got {on_error!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"slowfast_vlm: batch_size must be a positive integer, got {batch_size!r}")
        # lmms-eval synchronises processes through `self.accelerator` (data parallel: one full model
        # per process, each on its own GPU whatever --device says)
        self.accelerator = Accelerator()
        state = self.accelerator.state
        device = state.device if state.num_processes > 1 or device is None else device
        self.model, self.processor = load_model(pretrained, device, dtype)
        options = self.processor.sampling_options(
            None if num_frames is None else int(num_frames), None if fps is None else float(fps), sampling
        )
        self.num_frames, self.fps, self.sampling = options["num_frames"], options["fps"], options["sampling"]
        self.batch_size_per_device = int(batch_size)
        self.num_workers, self.on_error = int(num_workers), on_error
        budget = float(visual_cache_mb)
        self.visual_cache = VisualCache.from_megabytes(budget) if budget > 0 else None
        self._rank, self._world_size = state.process_index, state.num_processes

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----- inputs ------------------------------------------------------------------------------------
    def _load(self, args: tuple) -> tuple[list[np.ndarray], list, str | None]:
        """Decode one request's visuals (`doc_to_visual`): `(videos, images, error)`."""
        doc_to_visual, doc_id, task, split = args[-4:]
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            videos, images = [], []
            for visual in visuals or []:
                if isinstance(visual, PIL.Image.Image):
                    images.append(visual.convert("RGB"))
                elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in IMAGE_SUFFIXES:
                    images.append(PIL.Image.open(visual).convert("RGB"))
                elif isinstance(visual, (str, Path)):
                    frames, _ = self.processor.load_video(
                        visual, self.num_frames, fps=self.fps, sampling=self.sampling
                    )
                    videos.append(frames)
                else:
                    raise ValueError(f"unsupported visual input {type(visual).__name__}")
        except (OSError, ValueError) as e:  # FileNotFoundError, VideoDecodeError, PIL errors
            error = f"{type(e).__name__}: {e}"
            logger.error(f"slowfast_vlm: {self._name(args)} failed: {error}")
            return [], [], error
        return videos, images, None

    def _load_chunk(self, requests: Sequence[Instance], chunk: list[int]) -> list[tuple]:
        """`_load` for each request of a chunk, decoding each document's visuals once."""
        loaded: dict[tuple, tuple] = {}
        for i in chunk:
            doc = tuple(requests[i].args[-3:])  # (doc_id, task, split)
            if doc not in loaded:
                loaded[doc] = self._load(requests[i].args)
        return [loaded[tuple(requests[i].args[-3:])] for i in chunk]

    def _batches(
        self, requests: Sequence[Instance], key: Callable[[Instance], str], failures: dict[str, str]
    ):
        """Batches of up to `batch_size` requests with the same `key`, as lists of `(index, args, videos,
        images)` of the requests whose visuals loaded; the others go into `failures` (name -> error), and
        a batch left with none is not yielded. The next batches' visuals are decoded in background
        threads while the model works on the current one."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(key(request), []).append(i)
        size = self.batch_size
        chunks = [indices[s : s + size] for indices in groups.values() for s in range(0, len(indices), size)]
        workers = self.num_workers
        loads = prefetch(
            chunks, lambda chunk: self._load_chunk(requests, chunk), 1, workers, lookahead=workers
        )
        with tqdm(total=len(requests), desc="slowfast_vlm", disable=self.rank != 0) as bar:
            for chunk, (loaded,) in zip(chunks, loads):
                ok = []
                for i, (videos, images, error) in zip(chunk, loaded):
                    if error is None:
                        ok.append((i, requests[i].args, videos, images))
                    else:
                        failures[self._name(requests[i].args)] = error
                if ok:
                    yield ok
                bar.update(len(chunk))

    @staticmethod
    def _name(args: tuple) -> str:
        doc_id, task, split = args[-3:]
        return f"{task}/{split}/doc {doc_id}"

    # ----- lmms interface ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = [FAILED_RESPONSE] * len(requests)  # answered below unless their visuals failed
        failures: dict[str, str] = {}

        def same_settings(request: Instance) -> str:  # one batch, one set of generation settings
            return json.dumps(request.args[1], sort_keys=True, default=str)

        for ok in self._batches(requests, same_settings, failures):
            settings, until = generation_settings(ok[0][1][1])
            responses = generate_responses(
                self.model,
                self.processor,
                [
                    chat_prompt(self.processor, args[0], len(videos), len(images))
                    for _, args, videos, images in ok
                ],
                **_visuals(ok),
                stop_strings=until,
                visual_cache=self.visual_cache,
                **settings,
            )
            for (i, args, _, _), response in zip(ok, responses):
                results[i] = response
                self.cache_hook.add_partial("generate_until", (args[0], args[1]), response)
        self._report(failures, always_raise=False)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """`(-sum of log p(continuation tokens | context + visuals), whether greedy decoding gives them)`.

        The sum is negated because lmms-eval's multiple-choice scoring picks the choice with the
        *smallest* value (`np.argmin`, its models return a loss), so the most likely choice wins.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        failures: dict[str, str] = {}

        def same_document(request: Instance) -> str:  # a document's choices share one decoded video
            return repr(request.args[-3:])

        for ok in self._batches(requests, same_document, failures):
            contexts, continuations = [], []
            for _, (context, target, _, doc_id, task, split), videos, images in ok:
                if not isinstance(target, str):  # loglikelihood tasks pass their doc_to_target
                    target = str(target(self.task_dict[task][split][doc_id]))
                contexts.append(chat_prompt(self.processor, context, len(videos), len(images)))
                continuations.append(target)
            scores = continuation_logprobs(
                self.model,
                self.processor,
                contexts,
                continuations,
                **_visuals(ok),
            )
            for (i, *_), (log_prob, greedy) in zip(ok, scores):
                results[i] = (-log_prob, greedy)
        self._report(failures, always_raise=True)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("slowfast_vlm does not implement multi-round generation")

    def _report(self, failures: dict[str, str], always_raise: bool) -> None:
        if not failures:
            return
        listing = "; ".join(f"{name}: {error}" for name, error in failures.items())
        if always_raise or self.on_error == "raise":
            raise SampleError(f"slowfast_vlm: {len(failures)} request(s) failed: {listing}")
        logger.warning(
            f"slowfast_vlm: {len(failures)} request(s) failed and were answered {FAILED_RESPONSE!r}: {listing}"
        )


def _visuals(batch: list[tuple]) -> dict[str, list]:
    """The `videos` and `images` of a batch of `(index, args, videos, images)`, in request order."""
    return {
        "videos": [video for *_, videos, _ in batch for video in videos],
        "images": [image for *_, images in batch for image in images],
    }


@torch.inference_mode()
def continuation_logprobs(
    model, processor, contexts: list[str], continuations: list[str], videos=None, images=None
) -> list[tuple[float, bool]]:
    """Per pair: the summed log-probability of the continuation's tokens after the context (with its
    visuals), and whether each of them is the greedy choice.

    The continuation is tokenized on its own and appended to the context's tokens, so the context's
    tokens (and its placeholder expansion) are the same for every candidate continuation.
    """
    inputs = processor(text=contexts, videos=videos or None, images=images or None)
    tokenizer = processor.tokenizer
    targets = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    rows = [list(context) + target for context, target in zip(inputs["input_ids"], targets)]
    length = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])  # (B, L), right-padded
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    visual = {k: v for k, v in inputs.items() if k in ("pixel_values_videos", "pixel_values")}
    batch = to_device(
        {"input_ids": input_ids, "attention_mask": attention_mask, **visual}, model.device, model.dtype
    )
    logits = model(**batch).logits  # (B, L, V)
    results = []
    for row, context, target in zip(range(len(rows)), inputs["input_ids"], targets):
        start = len(context)
        # the token at position p is predicted by the logits at p - 1
        log_probs = F.log_softmax(logits[row, start - 1 : start - 1 + len(target)].float(), dim=-1)  # (n, V)
        wanted = torch.tensor(target, device=log_probs.device)
        total = log_probs.gather(-1, wanted[:, None]).sum().item()
        results.append((total, bool((log_probs.argmax(-1) == wanted).all())))
    return results
