"""ASGI middleware of the server: a request body limit, and a last line of defence for errors.

- `BodySizeLimit` reads the whole body (at most `max_bytes`) before the app sees it, so a body over
  the limit is a 413 whether it declares its length or arrives chunked.
- `ErrorShield` turns an exception that nothing else handled into an OpenAI-style 500 and logs its
  traceback. Starlette's own last handler re-raises after answering, which makes uvicorn drop a
  keep-alive connection, so the client's next request would fail too; the shield answers and keeps
  the connection usable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from moeinfer.serve.errors import error_body

log = logging.getLogger(__name__)


async def send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class BodySizeLimit:
    """413 for bodies over `max_bytes`, declared or streamed; the app then reads the buffered body."""

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[str, int], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big(scope, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return await self._too_big(scope, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        return await self.app(scope, replay, send)

    async def _too_big(self, scope: dict, send: Any) -> None:
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), 413)
        await send_json(send, 413, error_body(413, f"request body exceeds {self.max_bytes} bytes"),
                        headers=[(b"connection", b"close")])


class ErrorShield:
    """An unhandled exception becomes an OpenAI-style 500 (traceback logged), not a dropped connection."""

    def __init__(self, app: Any, on_error: Callable[[str, int], None] | None = None) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if self.on_error is not None:
                self.on_error(scope.get("path", ""), 500)
            if not started:
                await send_json(send, 500, error_body(500, f"internal error: {type(e).__name__}"))
