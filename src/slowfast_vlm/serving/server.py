"""Serve a model over an OpenAI-compatible HTTP API: `/v1/chat/completions` (streaming or not),
`/v1/models`, `/health`.

Videos go in a user message as `{"type": "video_url", "video_url": {"url": ...}}` (vLLM / SGLang
style) with a `data:video/mp4;base64,...` URL, a `file:///abs/path` URL, or a path relative to
`--media-root`; local files are read only under `--media-root`. Extra body fields `num_frames` and
`fps` set the frame sampling. One generation runs at a time; up to `--max-queue` requests wait.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference import Reply, first_line
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


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions fields this server honours, plus `num_frames` and `fps`; other
    fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)


def to_conversation(messages: list[Message], reserved: Sequence[str] = ()) -> tuple[list[dict], str | None]:
    """OpenAI messages -> (chat-template conversation, the one video URL or None).

    Text may not contain the `reserved` strings (the processor's placeholders: they would stand for
    videos that are not there).
    """

    def text(i: int, value: str) -> str:
        for token in reserved:
            if token in value:
                raise APIError(
                    400, f"messages.{i}: the text contains {token!r}, which is reserved", "invalid_content"
                )
        return value

    conversation, videos = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            conversation.append({"role": role, "content": text(i, message.content)})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": text(i, part.text)})
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
    runner: ModelRunner, source: Path | bytes, url: str, num_frames: int | None, fps: float | None
):
    """Decoded frames of `source`; a bad video is a 400 naming the URL (not the server's paths)."""
    shown = "the base64 video" if isinstance(source, bytes) else repr(url)
    path = source
    if isinstance(source, bytes):
        with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as file:
            file.write(source)
        path = Path(file.name)
    try:
        frames, _ = runner.load_video(path, num_frames, fps)
    except (OSError, ValueError) as error:
        reason = str(error).replace(str(path), shown)
        code = "video_not_found" if isinstance(error, FileNotFoundError) else "invalid_video"
        raise APIError(400, f"video_url: {reason}", code) from error
    finally:
        if isinstance(source, bytes):
            os.unlink(path)
    return frames


# ----- the app -----------------------------------------------------------------------------------


class ChatService:
    """Admission (a bounded queue), one generation at a time, and OpenAI response shapes."""

    def __init__(
        self,
        runner: ModelRunner,
        media_root: Path | None = None,
        max_queue: int = 64,
        max_frames: int = 256,
        default_max_tokens: int = 256,
    ):
        self.runner, self.media_root = runner, media_root
        self.max_queue, self.max_frames, self.default_max_tokens = max_queue, max_frames, default_max_tokens
        self.pending = 0  # requests admitted and not yet finished (waiting or generating)
        self.turn = asyncio.Semaphore(1)  # whose turn it is on the model

    async def complete(self, request: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        if request.model is not None and request.model != self.runner.name:
            raise APIError(
                404,
                f"model {request.model!r} does not exist; this server has {self.runner.name!r}",
                "model_not_found",
            )
        if request.num_frames is not None and request.num_frames > self.max_frames:
            raise APIError(
                400,
                f"num_frames: {request.num_frames} is above this server's limit of {self.max_frames}",
                "invalid_value",
            )
        stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stop)}", "invalid_value")
        stop = [sequence for sequence in stop if sequence]
        processor = self.runner.processor
        conversation, url = to_conversation(request.messages, (processor.video_token, processor.image_token))
        source = None if url is None else resolve_video_url(url, self.media_root)
        if self.pending >= self.max_queue:
            raise APIError(
                503,
                f"the server is busy ({self.pending} requests queued); retry later",
                "queue_full",
                {"Retry-After": "1"},
            )
        self.pending += 1
        try:
            frames = None
            if source is not None:
                frames = await asyncio.to_thread(
                    decode_video, self.runner, source, url, request.num_frames, request.fps
                )
        except BaseException:
            self.pending -= 1
            raise
        generation = dict(
            conversation=conversation,
            frames=frames,
            max_new_tokens=request.max_completion_tokens or request.max_tokens or self.default_max_tokens,
            temperature=request.temperature or 0.0,
            stop=stop,
            cancel=threading.Event(),
        )
        pieces: asyncio.Queue[str | None] | None = asyncio.Queue() if request.stream else None
        job = asyncio.create_task(self._generate(generation, pieces))
        if pieces is None:
            return JSONResponse(self._completion(await asyncio.shield(job)))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(
            self._events(job, pieces, generation["cancel"], include_usage), media_type="text/event-stream"
        )

    async def _generate(self, generation: dict, pieces: asyncio.Queue | None) -> Reply:
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
            self.pending -= 1
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
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(413, f"request body exceeds {limit / MiB:g} MiB", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
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
) -> FastAPI:
    """The FastAPI app serving `runner` (run it with uvicorn)."""
    service = ChatService(
        runner, None if media_root is None else Path(media_root), max_queue, max_frames, default_max_tokens
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
        body = await _read_body(request, max_body_bytes)
        try:
            parsed = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as error:
            raise APIError(400, _validation_message(error), "invalid_request") from error
        return await service.complete(parsed)

    return app


def main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.media_root is not None and not args.media_root.is_dir():
        print(f"slowfast-vlm serve: --media-root {args.media_root}: not a directory", file=sys.stderr)
        return 2
    try:
        runner = ModelRunner.from_args(args)
    except (OSError, ValueError) as error:
        print(f"slowfast-vlm serve: cannot load model: {first_line(error)}", file=sys.stderr)
        return 2
    if args.served_model_name:
        runner.name = args.served_model_name
    app = create_app(
        runner,
        media_root=args.media_root,
        max_body_bytes=int(args.max_body_mb * MiB),
        max_queue=args.max_queue,
        max_frames=args.max_frames,
        default_max_tokens=args.default_max_tokens,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0
