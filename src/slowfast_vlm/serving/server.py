"""Serve a model over an OpenAI-compatible HTTP API: `/v1/chat/completions` (streaming or not),
`/v1/models`, `/health`.

Videos go in a user message as `{"type": "video_url", "video_url": {"url": ...}}` (vLLM / SGLang
style) with a `data:video/mp4;base64,...` URL, a `file:///abs/path` URL, or a path relative to
`--media-root`; local files are read only under `--media-root`. Extra body fields `num_frames` and
`fps` (or vLLM's `media_io_kwargs.video` / `mm_processor_kwargs`) set the frame sampling.

Memory is bounded before any work: a request is admitted (or refused with 503 and Retry-After)
before its body is read, from the queue limit and the operator's memory budget; at most
`--max-decoding` requests decode at once, each at the model's input size; one generation runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference import PromptTooLongError, Reply, check_prompt_length, first_line, prompt_length
from ..processing.video import MAX_DURATION, MAX_SOURCE_PIXELS
from .model_runner import ModelRunner

MiB = 1 << 20


# ----- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    """Answered as `{"error": {"message", "type", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(error: ValidationError | RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part != "body")
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "invalid request: " + "; ".join(parts)


# ----- request schema ----------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | VideoPart, Field(discriminator="type")]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class VideoOptions(BaseModel):
    """Frame sampling a request may set (vLLM names its frame count `num_frames` too)."""

    model_config = ConfigDict(extra="ignore")

    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions fields this server honours, plus `num_frames` and `fps`; other
    fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)
    # vLLM's per-request media options: {"video": {"num_frames": N, "fps": F}} and {"num_frames": N, "fps": F}
    media_io_kwargs: dict[Literal["video"], VideoOptions] | None = None
    mm_processor_kwargs: VideoOptions | None = None

    def sampling(self) -> tuple[int | None, float | None]:
        """`(num_frames, fps)` asked for: the plain fields over vLLM's `media_io_kwargs.video` over its
        `mm_processor_kwargs`; None where none sets it."""
        sources = [self.mm_processor_kwargs, (self.media_io_kwargs or {}).get("video"), self]
        num_frames = fps = None
        for source in sources:
            if source is not None:
                num_frames = source.num_frames if source.num_frames is not None else num_frames
                fps = source.fps if source.fps is not None else fps
        return num_frames, fps


def to_conversation(messages: list[Message]) -> tuple[list[dict], str | None]:
    """OpenAI messages -> (chat-template conversation, the one video URL or None).

    All text becomes text parts, which the processor tokenizes as text: a `<video>` or `<|im_end|>`
    typed in a message is text, never a placeholder or a control token.
    """
    conversation, videos = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": message.content}]})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif role != "user":
                raise APIError(
                    400, f"messages.{i}: videos go in user messages, not {role} ones", "invalid_content"
                )
            else:
                parts.append({"type": "video"})
                videos.append(part.video_url.url)
        conversation.append({"role": role, "content": parts})
    if len(videos) > 1:
        raise APIError(
            400, f"{len(videos)} videos given; this server takes one video per request", "too_many_videos"
        )
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be from the user", "invalid_messages")
    return conversation, (videos[0] if videos else None)


# ----- video sources -----------------------------------------------------------------------------


def resolve_video_url(url: str, media_root: Path | None) -> Path | bytes:
    """A `video_url` -> the bytes of a base64 data URL, or a file under `media_root`.

    Raises `APIError`: 400 for a malformed or remote URL, 403 for a path outside `media_root`
    (symlinks and `..` resolved) or any path when there is no media root.
    """
    if "\x00" in url:
        raise APIError(400, "video_url: the URL contains a NUL character", "invalid_url")
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(
                400, "video_url: a data URL must look like data:video/mp4;base64,<data>", "invalid_url"
            )
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as error:
            raise APIError(400, f"video_url: invalid base64 data ({error})", "invalid_url") from error
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise APIError(
            400,
            "video_url: remote URLs are not fetched by this server; send the video as a base64 data URL "
            "or as a path under its media root",
            "unsupported_url",
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise APIError(
                400, f"video_url: file URLs must name a local path, got host {parsed.netloc!r}", "invalid_url"
            )
        relative = unquote(parsed.path)  # absolute: replaces the root when joined below
    elif len(parsed.scheme) > 1:  # one letter is a Windows drive, i.e. a path
        raise APIError(400, f"video_url: unsupported URL scheme {parsed.scheme!r}", "unsupported_url")
    else:
        relative = url.lstrip("/")  # a bare path is relative to the media root
    if media_root is None:
        raise APIError(
            403,
            "video_url: local files are disabled; start the server with --media-root DIR",
            "forbidden_path",
        )
    root = media_root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise APIError(403, f"video_url: {url!r} is outside the server's media root", "forbidden_path")
    return path


def decode_video(
    runner: ModelRunner, source: Path | bytes, url: str, num_frames: int | None, fps: float | None, **caps
):
    """Decoded frames of `source` (`caps` as in `load_video`); a bad video is a 400 naming the URL
    (not the server's paths)."""
    shown = "the base64 video" if isinstance(source, bytes) else repr(url)
    path = source
    if isinstance(source, bytes):
        with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as file:
            file.write(source)
        path = Path(file.name)
    try:
        frames, _ = runner.load_video(path, num_frames, fps, **caps)
    except (OSError, ValueError) as error:
        reason = str(error).replace(str(path), shown)
        code = "video_not_found" if isinstance(error, FileNotFoundError) else "invalid_video"
        raise APIError(400, f"video_url: {reason}", code) from error
    finally:
        if isinstance(source, bytes):
            os.unlink(path)
    return frames


# ----- the app -----------------------------------------------------------------------------------


BODY_COPIES = 3
"""A body is held about three times while a request lives: the bytes read, the parsed JSON text, and
the video the base64 decodes to (3/4 of its text)."""


def decode_bytes(max_source_pixels: int) -> int:
    """What one decode may hold, in bytes: yuv420 source frames (1.5 bytes a pixel) for every decoder
    thread (one per core) and the reference frames h264 keeps (up to 6 at such sizes); the converted
    frames are at the model's size and small beside them."""
    return int(max_source_pixels * 1.5 * ((os.cpu_count() or 1) + 6))


class MemoryBudget:
    """Bytes that admitted requests may hold at once (None: no limit). Used from the event loop only."""

    def __init__(self, total: int | None):
        self.total, self.used = total, 0

    def reserve(self, size: int) -> bool:
        """Take `size` bytes if they fit; False (nothing taken) if they do not."""
        if self.total is not None and self.used + size > self.total:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


class ChatService:
    """Admission (a bounded queue and a memory budget, before a body is read), a bounded number of
    decodes at once, one generation at a time, and OpenAI response shapes.

    Args:
        memory_budget: bytes for request bodies and decoding together (None: no budget); `max_decoding`
            decodes are set aside from it first (`decode_bytes(max_source_pixels)` each), and the rest
            holds admitted bodies (`BODY_COPIES` x their length).
    """

    def __init__(
        self,
        runner: ModelRunner,
        media_root: Path | None = None,
        max_queue: int = 64,
        max_frames: int = 256,
        default_max_tokens: int = 256,
        max_decoding: int = 2,
        memory_budget: int | None = None,
        max_source_pixels: int = MAX_SOURCE_PIXELS,
        max_duration: float = MAX_DURATION,
    ):
        self.runner, self.media_root = runner, media_root
        self.max_queue, self.max_frames, self.default_max_tokens = max_queue, max_frames, default_max_tokens
        self.caps = {"max_source_pixels": max_source_pixels, "max_duration": max_duration}
        decoding = max_decoding * decode_bytes(max_source_pixels)
        if memory_budget is not None and memory_budget <= decoding:
            raise ValueError(
                f"a memory budget of {memory_budget / MiB:.0f} MiB leaves nothing for requests once "
                f"{max_decoding} decodes of up to {max_source_pixels:,}-pixel frames take "
                f"{decoding / MiB:.0f} MiB: raise it, or lower the decodes or the pixel limit"
            )
        self.budget = MemoryBudget(None if memory_budget is None else memory_budget - decoding)
        self.pending = 0  # requests admitted and not yet finished (reading, decoding, waiting or generating)
        self.decoding = asyncio.Semaphore(max_decoding)  # requests decoding a video at once
        self.turn = asyncio.Semaphore(1)  # whose turn it is on the model

    def admit(self, body_bytes: int) -> int:
        """Admit a request whose body is at most `body_bytes` long, before reading it: the bytes it
        reserves (give them back with `leave`), or 503 with Retry-After when the queue or the memory
        budget is full."""
        reserved = BODY_COPIES * body_bytes
        if self.pending >= self.max_queue:
            reason, code = f"{self.pending} requests queued", "queue_full"
        elif not self.budget.reserve(reserved):
            reason, code = "its memory budget is taken by the requests in progress", "memory_budget_full"
        else:
            self.pending += 1
            return reserved
        raise APIError(503, f"the server is busy ({reason}); retry later", code, {"Retry-After": "1"})

    def leave(self, reserved: int) -> None:
        """A request admitted with `admit` is finished (answered, refused or gone)."""
        self.pending -= 1
        self.budget.release(reserved)

    async def complete(self, request: ChatCompletionRequest, done) -> JSONResponse | StreamingResponse:
        """Answer an admitted request; `done()` is called once when it is finished (here on an error,
        else when its generation ends)."""
        try:
            return await self._complete(request, done)
        except BaseException:
            done()
            raise

    async def _complete(self, request: ChatCompletionRequest, done) -> JSONResponse | StreamingResponse:
        if request.model is not None and request.model != self.runner.name:
            raise APIError(
                404,
                f"model {request.model!r} does not exist; this server has {self.runner.name!r}",
                "model_not_found",
            )
        num_frames, fps = request.sampling()
        if num_frames is not None and num_frames > self.max_frames:
            raise APIError(
                400,
                f"num_frames: {num_frames} is above this server's limit of {self.max_frames}",
                "invalid_value",
            )
        stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stop)}", "invalid_value")
        stop = [sequence for sequence in stop if sequence]
        conversation, url = to_conversation(request.messages)
        source = None if url is None else resolve_video_url(url, self.media_root)
        frames = None
        if source is not None:
            async with self.decoding:
                frames = await asyncio.to_thread(
                    decode_video, self.runner, source, url, num_frames, fps, **self.caps
                )
            del source  # the video's bytes are not needed any more
        max_new_tokens = request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        try:
            length = prompt_length(
                self.runner.processor, conversation, None if frames is None else len(frames)
            )
            check_prompt_length(self.runner.model, length, max_new_tokens)
        except PromptTooLongError as error:
            raise APIError(400, f"messages: {error}", "context_length_exceeded") from error
        generation = dict(
            conversation=conversation,
            frames=frames,
            max_new_tokens=max_new_tokens,
            temperature=request.temperature or 0.0,
            stop=stop,
            cancel=threading.Event(),
        )
        pieces: asyncio.Queue[str | None] | None = asyncio.Queue() if request.stream else None
        job = asyncio.create_task(self._generate(generation, pieces, done))
        if pieces is None:
            return JSONResponse(self._completion(await asyncio.shield(job)))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(
            self._events(job, pieces, generation["cancel"], include_usage), media_type="text/event-stream"
        )

    async def _generate(self, generation: dict, pieces: asyncio.Queue | None, done) -> Reply:
        """Wait for the model's turn, then generate in a worker thread (pieces go to `pieces`)."""
        try:
            async with self.turn:
                running = self.runner.start(**generation)
                if pieces is not None:
                    stream = iter(running)
                    while (piece := await asyncio.to_thread(next, stream, None)) is not None:
                        pieces.put_nowait(piece)
                return await asyncio.to_thread(running.result)
        finally:
            done()
            if pieces is not None:
                pieces.put_nowait(None)

    async def _events(
        self, job: asyncio.Task, pieces: asyncio.Queue, cancel: threading.Event, include_usage: bool
    ):
        """Server-sent events: `data: {chunk}` per piece, a final chunk, then `data: [DONE]`."""
        head = self._head("chat.completion.chunk")
        try:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            while (piece := await pieces.get()) is not None:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": piece}}]})
            try:
                reply = await job
            except Exception as error:  # headers are sent: report it in the stream
                yield _sse(APIError(500, f"generation failed: {error}", "generation_failed").body())
            else:
                choice = {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}
                yield _sse({**head, "choices": [choice]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(reply)})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client may have gone: stop generating for nobody

    def _head(self, kind: str) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.runner.name,
        }

    def _completion(self, reply: Reply) -> dict:
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(reply)}


def _usage(reply: Reply) -> dict:
    total = reply.prompt_tokens + reply.completion_tokens
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": total,
        # OpenAI's name for prompt tokens served from a cache: here, continued from an earlier turn
        "prompt_tokens_details": {"cached_tokens": reply.reused_tokens},
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def declared_length(request: Request, limit: int) -> int | None:
    """The body length the request declares (None: none, e.g. chunked); 413 above `limit`, 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise APIError(400, f"Content-Length {declared!r} is not a number of bytes", "invalid_request")
    if int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit / MiB:g} MiB", "request_too_large")
    return int(declared)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes (read as it streams)."""
    too_large = APIError(413, f"request body exceeds {limit / MiB:g} MiB", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(
    runner: ModelRunner,
    media_root: str | Path | None = None,
    max_body_bytes: int = 64 * MiB,
    max_queue: int = 64,
    max_frames: int = 256,
    default_max_tokens: int = 256,
    **limits,
) -> FastAPI:
    """The FastAPI app serving `runner` (run it with uvicorn); `limits` go to `ChatService`
    (`max_decoding`, `memory_budget`, `max_source_pixels`, `max_duration`)."""
    service = ChatService(
        runner,
        None if media_root is None else Path(media_root),
        max_queue,
        max_frames,
        default_max_tokens,
        **limits,
    )
    app = FastAPI(title="slowfast-vlm", summary="OpenAI-compatible video chat API")
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), "http_error", error.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return APIError(400, _validation_message(error), "invalid_request").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "internal_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": runner.name, "pending": service.pending}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": runner.name, "object": "model", "created": 0, "owned_by": "slowfast-vlm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        declared = declared_length(request, max_body_bytes)
        reserved = service.admit(max_body_bytes if declared is None else declared)
        finished = False

        def done() -> None:
            nonlocal finished
            if not finished:
                finished = True
                service.leave(reserved)

        try:
            body = await _read_body(request, max_body_bytes)
            parsed = ChatCompletionRequest.model_validate_json(body)
            del body
        except ValidationError as error:
            done()
            raise APIError(400, _validation_message(error), "invalid_request") from error
        except BaseException:
            done()
            raise
        return await service.complete(parsed, done)

    return app


def main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.media_root is not None and not args.media_root.is_dir():
        print(f"slowfast-vlm serve: --media-root {args.media_root}: not a directory", file=sys.stderr)
        return 2
    limits = dict(
        max_decoding=args.max_decoding,
        memory_budget=None if args.memory_budget_mb is None else int(args.memory_budget_mb * MiB),
        max_source_pixels=args.max_video_pixels,
        max_duration=args.max_video_seconds,
    )
    try:
        runner = ModelRunner.from_args(args)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm serve: cannot load model: {first_line(error)}", file=sys.stderr)
        return 2
    if args.served_model_name:
        runner.name = args.served_model_name
    try:
        app = create_app(
            runner,
            media_root=args.media_root,
            max_body_bytes=int(args.max_body_mb * MiB),
            max_queue=args.max_queue,
            max_frames=args.max_frames,
            default_max_tokens=args.default_max_tokens,
            **limits,
        )
    except ValueError as error:
        print(f"slowfast-vlm serve: --memory-budget-mb: {error}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port)
    return 0
