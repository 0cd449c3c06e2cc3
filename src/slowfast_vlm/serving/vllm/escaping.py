"""What users type stays text on vLLM's OpenAI server, as on the project's own (`serving/server.py`).

vLLM renders chat messages with the tokenizer's template and then parses special-token strings, so a
typed `<|im_end|>` would close the turn. `EscapeControlTokens` (an ASGI middleware that
`slowfast-vlm serve --engine vllm` passes as `--middleware`) rewrites each chat request's message text
with the processor's `escape_conversation` before vLLM reads it: the same tokens the library's
`apply_chat_template` gives. Media arrive as content parts, so no typed text is a placeholder either.
"""

from __future__ import annotations

import json
import os

from ...processing.processor import SlowFastProcessor

MODEL_ENV = "SLOWFAST_VLM_ESCAPE_MODEL"
"""The environment entry naming the checkpoint whose tokenizer lists the control tokens."""

CHAT_PATHS = ("/v1/chat/completions", "/tokenize")
"""The routes whose requests carry chat `messages`."""


class EscapeControlTokens:
    """ASGI middleware: the JSON body of a chat request (`CHAT_PATHS`) with escaped message text.

    A body that is not a JSON object with a `messages` list passes unchanged: vLLM answers it with its
    own 400."""

    def __init__(self, app):
        self.app = app
        self.processor = SlowFastProcessor.from_pretrained(os.environ[MODEL_ENV])

    def escaped_body(self, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except ValueError:
            return body
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            return body
        if not all(isinstance(message, dict) for message in request["messages"]):
            return body
        request["messages"] = self.processor.escape_conversation(request["messages"], keep_placeholders=False)
        return json.dumps(request).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in CHAT_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        body = self.escaped_body(body)
        headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # the body is read; what follows is the client's disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
