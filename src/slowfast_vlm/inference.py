"""Running a slow-fast model: loading it (one device and dtype rule), chat prompts, generation
(one conversation streamed to a `streamer`, or a batch of prompts), and recording which frames and
regions the answer read (attention maps).

Used by `slowfast-vlm ask`, `eval`, `demo` and `serve` and by the lmms-eval plugin.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention_maps import AttentionMap, video_attention_map
from .model_options import DTYPES
from .modeling import SlowFastForConditionalGeneration
from .processing.processor import SlowFastProcessor


# ----- loading -----------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"`: CUDA when available, else the CPU; any other name as torch reads it ("cuda:1").

    Raises `ValueError` for a name torch does not know or a CUDA device this machine does not have.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from error
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """`"auto"`: bfloat16 on a CUDA device that supports it, else float32; any other of `DTYPES` as named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        cuda = resolve_device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_model(
    model_id: str | os.PathLike[str], device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> tuple[SlowFastForConditionalGeneration, SlowFastProcessor]:
    """`(model, processor)` of a checkpoint (ours or the reference release's format): the model fitted
    to the processor (`SlowFastProcessor.prepare_model`), in eval mode, on `resolve_device(device)`
    in `resolve_dtype(dtype, device)`.

    Raises `OSError` when the checkpoint cannot be found or fetched, `ValueError` for a bad device or dtype.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_model_path(model_id)
    model = SlowFastForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
    processor = SlowFastProcessor.from_pretrained(model_id)
    return processor.prepare_model(model).to(device).eval(), processor


def check_model_path(model_id: str | os.PathLike[str]) -> None:
    """Raise `FileNotFoundError` for a model id that can only be a local path (absolute, `./`, `~`,
    more than one `/`, a trailing `/`) and names no directory: the hub would only say the id is malformed."""
    text = os.fspath(model_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{text}: not a directory (a model is a folder with config.json)")
    if path.is_absolute() or text.startswith((".", "~")) or text.endswith("/") or text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such model directory")


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name if it has none): a CLI's one-line reason."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


# ----- prompts -----------------------------------------------------------------------------------
def build_conversation(
    question: str, history: Sequence[tuple[str, str]] = (), num_videos: int = 1, num_images: int = 0
) -> list[dict[str, Any]]:
    """Chat-template messages: the earlier (question, answer) turns of `history`, then `question`.

    The first question carries the visual parts (`num_videos` videos, then `num_images` images) in
    front of its text, as in the reference prompts.
    """
    messages: list[dict[str, Any]] = []
    for i, (asked, answered) in enumerate([*history, (question, None)]):
        visuals = [{"type": "video"}] * num_videos + [{"type": "image"}] * num_images if i == 0 else []
        messages.append({"role": "user", "content": [*visuals, {"type": "text", "text": asked}]})
        if answered is not None:
            messages.append({"role": "assistant", "content": answered})
    return messages


def chat_prompt(processor: SlowFastProcessor, question: str, num_videos: int = 1, num_images: int = 0) -> str:
    """The chat-formatted prompt: visual placeholders first (unless `question` has its own), then the question."""
    if processor.video_token in question or processor.image_token in question:
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    else:
        messages = build_conversation(question, num_videos=num_videos, num_images=num_images)
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def to_device(inputs, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Move processor outputs to `device`; floating tensors (pixels) also to `dtype`. Lists stay lists."""

    def move(x):
        if isinstance(x, list):
            return [move(item) for item in x]
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return x

    return {key: move(value) for key, value in inputs.items()}


class PromptTooLongError(ValueError):
    """A prompt that, with the new tokens asked for, does not fit the model's positions."""


def max_positions(model) -> int | None:
    """The LLM's position limit (`max_position_embeddings`), or None when it has no transformers config."""
    config = getattr(model, "config", None)
    return None if config is None else getattr(config.get_text_config(), "max_position_embeddings", None)


def prompt_length(processor: SlowFastProcessor, conversation: list[dict], num_frames: int | None) -> int:
    """Tokens of `conversation`'s generation prompt, its video (`num_frames` frames, None: none)
    expanded to its fast tokens: what `reply` would feed the model, without processing any pixels."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    tokens = len(processor.tokenizer(prompt)["input_ids"])
    if num_frames:
        tokens += (processor.num_fast_tokens(num_frames) - 1) * prompt.count(processor.video_token)
    return tokens


def check_prompt_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise `PromptTooLongError`, with the numbers, when `prompt_tokens + max_new_tokens` exceed the
    model's positions: past them the answer would be generated from positions it never learned."""
    limit = max_positions(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise PromptTooLongError(
            f"the prompt is {prompt_tokens} tokens and up to {max_new_tokens} new tokens were asked for: "
            f"{prompt_tokens + max_new_tokens} > the model's {limit} positions; shorten the question, use "
            "fewer frames or ask for fewer new tokens"
        )


# ----- generation --------------------------------------------------------------------------------
@dataclass
class Reply:
    """A finished generation for one conversation.

    Attributes:
        text: the answer, stripped.
        finish_reason: "stop" (end of turn or a stop string) or "length" (`max_new_tokens` reached).
        prompt_tokens, completion_tokens: lengths of the prompt and of the generated ids.
        output: `(1, L)` prompt + generated ids.
        video: `(T, 3, H, W)` pixels the model saw, or None for a text-only chat.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    output: torch.Tensor
    video: torch.Tensor | None


@torch.inference_mode()
def _generate(
    model, processor: SlowFastProcessor, prompts: list[str], videos=None, images=None, **generation
) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """`model.generate` on chat `prompts` batched with left padding: (each prompt's new text,
    prompt + generated ids `(B, L)`, the model inputs)."""
    inputs = processor(
        text=prompts,
        videos=videos or None,
        images=images or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    check_prompt_length(model, inputs["input_ids"].shape[1], generation.get("max_new_tokens") or 0)
    inputs = to_device(inputs, model.device, model.dtype)
    output = model.generate(**inputs, **generation)
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts, output, inputs


def reply(
    model,
    processor: SlowFastProcessor,
    conversation: list[dict],
    frames: np.ndarray | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
    **generate_kwargs,
) -> Reply:
    """Generate the assistant's next turn of a (multi-turn) chat-template `conversation`.

    `frames` `(T, H, W, 3)` uint8 fill its one `{"type": "video"}` part (None: a text-only chat);
    the text streams to `streamer` (a transformers streamer) as it is generated; temperature 0 is
    greedy decoding. `generate_kwargs` go to `model.generate`.
    """
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    texts, output, inputs = _generate(
        model,
        processor,
        [prompt],
        None if frames is None else [frames],
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        **sampling,
        **generate_kwargs,
    )
    prompt_tokens = inputs["input_ids"].shape[1]
    completion_tokens = output.shape[1] - prompt_tokens
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    at_length = completion_tokens >= max_new_tokens and output[0, -1].item() not in eos
    video = inputs.get("pixel_values_videos")
    return Reply(
        text=texts[0].strip(),
        finish_reason="length" if at_length else "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        output=output,
        video=None if video is None else video[0],
    )


def answer(
    model,
    processor: SlowFastProcessor,
    frames: np.ndarray,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
) -> Reply:
    """Answer `question` about `frames` `(T, H, W, 3)` uint8: one user turn, the video then the question."""
    return reply(
        model, processor, build_conversation(question), frames, max_new_tokens, temperature, streamer
    )


def generate_responses(
    model,
    processor: SlowFastProcessor,
    prompts: list[str],
    videos: list[np.ndarray] | None = None,
    images: list | None = None,
    stop_strings: Sequence[str] | None = None,
    **generation,
) -> list[str]:
    """Generate one answer per prompt (chat-formatted, with placeholders), batched with left padding.

    `generation` goes to `model.generate` (`max_new_tokens`, `do_sample`, ...). Each answer is cut
    at the first of `stop_strings`.
    """
    if stop_strings:
        generation.update(stop_strings=list(stop_strings), tokenizer=processor.tokenizer)
    texts, _, _ = _generate(model, processor, prompts, videos, images, **generation)
    for stop in stop_strings or ():
        texts = [text.split(stop, 1)[0] for text in texts]
    return [text.strip() for text in texts]


# ----- attention ---------------------------------------------------------------------------------
@torch.no_grad()
def compute_attention_map(model, input_ids: torch.Tensor, video: torch.Tensor) -> AttentionMap:
    """Run `model` once on one sample (`input_ids` `(1, L)`, e.g. a `Reply`'s prompt + answer, and its
    `video` `(T, 3, H, W)`) and return the map of what its text tokens read from the slow tokens.

    With `generated_tokens_see_slow=True` this is exactly what a cached generation read, since the
    cached decoding equals recomputing the sequence.
    """
    outputs = model(
        input_ids=input_ids, pixel_values_videos=[video], record_slow_attention=True, use_cache=False
    )
    num_frames = video.shape[0]
    h, w = model.model.visual_grid(num_frames)
    return video_attention_map(outputs.slow_cache, 0, (num_frames, h, w))
