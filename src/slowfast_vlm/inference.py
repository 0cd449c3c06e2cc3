"""Running a slow-fast model: loading it (one device and dtype rule), chat prompts, generation
(one conversation streamed to a `streamer`, or a batch of prompts), and recording which frames and
regions the answer read (attention maps).

Used by `slowfast-vlm ask`, `eval`, `demo` and `serve` and by the lmms-eval plugin. Given a
`VisualCache`, a video already encoded is not encoded again, and a follow-up turn of a conversation
continues from the KV cache and slow keys/values of the turn before (docs/serving.md, "Reuse").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import auto  # noqa: F401  (the Auto classes know our config: AutoTokenizer reads it while loading)
from .attention_maps import AttentionMap, span_attention_map, video_attention_map
from .model_options import DTYPES
from .modeling import SlowFastForConditionalGeneration
from .modeling.model import EncodedVisual
from .modeling.slow_tokens import build_slow_cache
from .processing.processor import SlowFastProcessor
from .transformers_compat import cache_field, cache_of
from .visual_cache import ConversationState, VisualCache, frames_key


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
    return expanded_length(
        processor, processor.apply_chat_template(conversation, add_generation_prompt=True), num_frames
    )


def expanded_length(processor: SlowFastProcessor, text: str, num_frames: int | None) -> int:
    """Tokens of `text` with each video placeholder expanded to the fast tokens of `num_frames` frames."""
    tokens = len(processor.tokenizer(text)["input_ids"])
    if num_frames:
        tokens += (processor.num_fast_tokens(num_frames) - 1) * text.count(processor.video_token)
    return tokens


def text_span(
    processor: SlowFastProcessor, prompt: str, text: str, num_frames: int | None
) -> tuple[int, int]:
    """Token positions `[start, end)` of the last occurrence of a user's `text` in the model input of chat
    `prompt` (its video placeholders expanded for `num_frames` frames): e.g. a question's own tokens.

    Raises `ValueError` when `text` is not in the prompt or does not tokenize apart from its neighbours.
    """
    shown = processor.escape_text(text)  # as the chat template wrote it
    at = prompt.rfind(shown) if shown else -1
    if at < 0:
        raise ValueError(f"{text!r} is not in the prompt")
    ids = processor.tokenizer(prompt)["input_ids"]
    bounds = []
    for cut in (prompt[:at], prompt[: at + len(shown)]):
        cut_ids = processor.tokenizer(cut)["input_ids"]
        if ids[: len(cut_ids)] != cut_ids:
            raise ValueError(f"{text!r} does not tokenize apart from the prompt around it")
        bounds.append(expanded_length(processor, cut, num_frames))
    return bounds[0], bounds[1]


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
        prompt: the chat-formatted prompt the model was given (before its placeholders were expanded).
        video: the video the model saw: its pixels `(T, 3, H, W)`, or its `EncodedVisual` when it went
            through a `VisualCache`; None for a text-only chat.
        reused_tokens: prompt tokens continued from an earlier turn's caches rather than computed (0: a full run).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    output: torch.Tensor
    prompt: str
    video: torch.Tensor | EncodedVisual | None
    reused_tokens: int = 0


def reuses_visuals(model) -> bool:
    """Whether `model` takes encoded videos (`encoded_videos=`): the native model does, host plug-ins do not."""
    return isinstance(model, SlowFastForConditionalGeneration)


def reuses_conversations(model) -> bool:
    """Whether a follow-up turn can continue `model`'s earlier caches exactly: the earlier answers must have
    read the slow tokens as they do when they are part of a prompt (`generated_tokens_see_slow`)."""
    return reuses_visuals(model) and bool(model.config.generated_tokens_see_slow)


@torch.inference_mode()
def encode_videos(
    model, processor: SlowFastProcessor, videos: Sequence[np.ndarray], cache: VisualCache | None = None
) -> tuple[list[EncodedVisual], list[str]]:
    """Each video `(T, H, W, 3)` uint8 encoded (`EncodedVisual`), taken from `cache` when it holds it (else
    kept there), and its content key. A video given twice is encoded once."""
    settings = f"{processor.image_processor.to_json_string()}|{model.dtype}|{model.device}"
    keys = [frames_key(np.asarray(frames), settings) for frames in videos]
    found = {key: cache.get(key) for key in dict.fromkeys(keys)} if cache is not None else dict.fromkeys(keys)
    missing = [key for key, encoded in found.items() if encoded is None]
    if missing:
        first = [videos[keys.index(key)] for key in missing]
        pixels = processor(text=[processor.video_token] * len(first), videos=first, return_tensors="pt")
        pixels = to_device(pixels, model.device, model.dtype)["pixel_values_videos"]
        for key, encoded in zip(missing, model.model.encode_visual(list(pixels))):
            found[key] = encoded
            if cache is not None:
                cache.put(key, encoded)
    return [found[key] for key in keys], keys


def model_inputs(
    model,
    processor: SlowFastProcessor,
    prompts: list[str],
    videos: Sequence[np.ndarray] | None = None,
    images: list | None = None,
    cache: VisualCache | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Model inputs for chat `prompts` (left-padded, on the model's device) and the videos' content keys.

    With a `cache` (and a model that takes encoded videos, and no images), videos come as `encoded_videos`
    (`encode_videos`) and the prompts are only tokenized; otherwise the processor makes pixels.
    """
    if cache is None or images or not videos or not reuses_visuals(model):
        inputs = processor(
            text=prompts,
            videos=videos or None,
            images=images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return to_device(inputs, model.device, model.dtype), []
    encoded, keys = encode_videos(model, processor, videos, cache)
    given = sum(prompt.count(processor.video_token) for prompt in prompts)
    if given != len(videos):
        raise ValueError(f"{len(videos)} video(s) given for {given} {processor.video_token} placeholder(s)")
    replacements = [processor.video_token * item.fast.shape[0] for item in encoded]
    expanded, _ = processor.get_text_with_replacements(  # it replaces in place: give it a copy
        list(prompts), images_replacements=[], videos_replacements=replacements
    )
    inputs = processor.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
    return {**to_device(inputs, model.device, model.dtype), "encoded_videos": encoded}, keys


@torch.inference_mode()
def _generate(
    model,
    processor: SlowFastProcessor,
    prompts: list[str],
    videos=None,
    images=None,
    visual_cache: VisualCache | None = None,
    **generation,
) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """`model.generate` on chat `prompts` batched with left padding: (each prompt's new text,
    prompt + generated ids `(B, L)`, the model inputs)."""
    inputs, _ = model_inputs(model, processor, prompts, videos, images, visual_cache)
    check_prompt_length(model, inputs["input_ids"].shape[1], generation.get("max_new_tokens") or 0)
    output = model.generate(**inputs, **generation)
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts, output, inputs


@torch.inference_mode()
def _converse(
    model,
    processor: SlowFastProcessor,
    prompt: str,
    frames: np.ndarray | None,
    cache: VisualCache,
    follow_up: bool,
    **generation,
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """`model.generate` on one chat `prompt`, continuing the conversation state in `cache` whose tokens
    it starts with (only the rest is computed), and keeping the new state there for the next turn.
    Returns (prompt + generated ids `(1, L)`, the model inputs, the prompt tokens continued)."""
    inputs, keys = model_inputs(model, processor, [prompt], None if frames is None else [frames], None, cache)
    ids = inputs["input_ids"]  # (1, L)
    check_prompt_length(model, ids.shape[1], generation.get("max_new_tokens") or 0)
    visual = model.model.placeholder_mask(ids)[0].nonzero()
    video_key = keys[0] if keys else None
    taken = cache.take_conversation(ids[0], video_key, int(visual[-1]) + 1 if len(visual) else 0, follow_up)
    if taken is not None:  # continue: no visual inputs, the caches carry the video
        state, reused = taken
        if (extra := state.kv_cache.get_seq_length() - reused) > 0:
            state.kv_cache.crop(-extra)  # a negative count removes tokens in every supported release
        carried = {"slow_cache": state.slow_cache, **cache_field(state.kv_cache)}
        carried["encoded_videos"] = None  # the slow cache carries the video, the KV cache its fast tokens
    else:
        reused, encoded = 0, inputs.get("encoded_videos")
        slow = None if not encoded else torch.cat([item.slow.flatten(0, 1) for item in encoded])  # (N, D)
        carried = {"slow_cache": None if slow is None else build_slow_cache([slow], like=slow)}
    result = model.generate(**{**inputs, **carried}, return_dict_in_generate=True, **generation)
    kv_cache = cache_of(result)
    state_ids = result.sequences[0, : kv_cache.get_seq_length()].cpu()
    cache.put_conversation(ConversationState(state_ids, kv_cache, carried["slow_cache"], video_key))
    return result.sequences, inputs, reused


def reply(
    model,
    processor: SlowFastProcessor,
    conversation: list[dict],
    frames: np.ndarray | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
    visual_cache: VisualCache | None = None,
    **generate_kwargs,
) -> Reply:
    """Generate the assistant's next turn of a (multi-turn) chat-template `conversation`.

    `frames` `(T, H, W, 3)` uint8 fill its one `{"type": "video"}` part (None: a text-only chat);
    the text streams to `streamer` (a transformers streamer) as it is generated; temperature 0 is
    greedy decoding. With a `visual_cache` the video is encoded at most once while the cache keeps it,
    and a conversation that starts with the tokens of an earlier reply continues from that reply's
    caches (when `reuses_conversations(model)`): the same tokens as a full run, for the cost of the new
    ones. `generate_kwargs` go to `model.generate`.
    """
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    generation = dict(max_new_tokens=max_new_tokens, streamer=streamer, **sampling, **generate_kwargs)
    videos = None if frames is None else [frames]
    reused = 0
    config = model.generation_config  # a kept conversation is one sequence: beams run in full
    one_sequence = all(
        generation.get(k, getattr(config, k, 1) or 1) == 1 for k in ("num_beams", "num_return_sequences")
    )
    if visual_cache is not None and reuses_conversations(model) and one_sequence:
        follow_up = any(message.get("role") == "assistant" for message in conversation)
        output, inputs, reused = _converse(
            model, processor, prompt, frames, visual_cache, follow_up, **generation
        )
    else:
        _, output, inputs = _generate(
            model, processor, [prompt], videos, visual_cache=visual_cache, **generation
        )
    prompt_tokens = inputs["input_ids"].shape[1]
    completion_tokens = output.shape[1] - prompt_tokens
    text = processor.decode(output[0, prompt_tokens:], skip_special_tokens=True)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    at_length = completion_tokens >= max_new_tokens and output[0, -1].item() not in eos
    video = inputs.get("encoded_videos", inputs.get("pixel_values_videos"))
    video = None if video is None else video[0]
    return Reply(
        text=text.strip(),
        finish_reason="length" if at_length else "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        output=output,
        prompt=prompt,
        video=video,
        reused_tokens=reused,
    )


def answer(
    model,
    processor: SlowFastProcessor,
    frames: np.ndarray,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
    visual_cache: VisualCache | None = None,
) -> Reply:
    """Answer `question` about `frames` `(T, H, W, 3)` uint8: one user turn, the video then the question."""
    return reply(
        model,
        processor,
        build_conversation(question),
        frames,
        max_new_tokens,
        temperature,
        streamer,
        visual_cache,
    )


def generate_responses(
    model,
    processor: SlowFastProcessor,
    prompts: list[str],
    videos: list[np.ndarray] | None = None,
    images: list | None = None,
    stop_strings: Sequence[str] | None = None,
    visual_cache: VisualCache | None = None,
    **generation,
) -> list[str]:
    """Generate one answer per prompt (chat-formatted, with placeholders), batched with left padding.

    `generation` goes to `model.generate` (`max_new_tokens`, `do_sample`, ...). Each answer is cut
    at the first of `stop_strings`. With a `visual_cache`, each distinct video is encoded at most once
    (once per batch, and not again while the cache keeps it).
    """
    if stop_strings:
        generation.update(stop_strings=list(stop_strings), tokenizer=processor.tokenizer)
    texts, _, _ = _generate(model, processor, prompts, videos, images, visual_cache, **generation)
    for stop in stop_strings or ():
        texts = [text.split(stop, 1)[0] for text in texts]
    return [text.strip() for text in texts]


# ----- attention ---------------------------------------------------------------------------------
@torch.no_grad()
def compute_attention_map(
    model,
    input_ids: torch.Tensor,
    video: torch.Tensor | EncodedVisual,
    span: tuple[int, int] | None = None,
) -> AttentionMap:
    """Run `model` on one sample (`input_ids` `(1, L)`, e.g. a `Reply`'s prompt + answer, and its `video`:
    pixels `(T, 3, H, W)` or already encoded) and return the map of what its text tokens read from the
    slow tokens: averaged over every query token, or over the positions `span` = `[start, end)` only
    (`text_span`: a question's own tokens, which must come after the video).

    With `generated_tokens_see_slow=True` this is exactly what a cached generation read, since the
    cached decoding equals recomputing the sequence.
    """
    if isinstance(video, torch.Tensor):
        video = model.model.encode_visual([video])[0]  # encoded once, even when read by two rows below
    num_frames = video.slow.shape[0]
    shape = (num_frames, *model.model.visual_grid(num_frames))
    if span is None:
        outputs = model(
            input_ids=input_ids, encoded_videos=[video], record_slow_attention=True, use_cache=False
        )
        return video_attention_map(outputs.slow_cache, 0, shape)
    start, end = span
    video_end = int(torch.nonzero(input_ids[0] == model.config.video_token_id).max()) + 1
    if not video_end <= start < end <= input_ids.shape[1]:
        raise ValueError(f"span {span}: must lie within the {input_ids.shape[1]} tokens, after the video's")
    # Row 0: the sequence through the span; row 1: the same before it (right-padded, so positions agree).
    rows = input_ids[:, :end].repeat(2, 1)
    attention_mask = torch.ones_like(rows)
    attention_mask[1, start:] = 0
    outputs = model(
        input_ids=rows,
        attention_mask=attention_mask,
        encoded_videos=[video, video],
        record_slow_attention=True,
        use_cache=False,
    )
    return span_attention_map(outputs.slow_cache, 0, 1, shape)
