"""The request body limit: a pure ASGI middleware that answers 413 before a large body is
read (by its Content-Length, or by counting a chunked body as it arrives)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

#: bodies up to this size are always read; a larger one is measured against ``body_limit``
BODY_FLOOR = 1024 * 1024


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(413, f"request body larger than {limit} bytes (the server's "
                              "max_body_bytes)")


class BodyLimit:
    """Refuse request bodies over ``limit()`` bytes with 413 before reading them: by the
    declared Content-Length, and by counting a streamed (chunked) body as it arrives.

    Pure ASGI (no per-request task or buffering); the limit is only looked up for bodies
    over ``floor`` bytes, so small requests pay one header scan."""

    def __init__(self, app: Any, limit: Callable[[], int], floor: int = BODY_FLOOR) -> None:
        self.app = app
        self.limit = limit
        self.floor = floor  # bodies up to this size pass without looking the limit up

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = int(value) if value.isdigit() else 0  # bad values: the server's
                if declared > self.floor and declared > (limit := self.limit()):
                    await self._refuse(send, limit)
                    return
                break
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.floor and seen > (limit := self.limit()):
                    raise _TooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as exc:
            if started:
                raise
            await self._refuse(send, exc.limit)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        body = JSONResponse({"detail": _TooLarge(limit).detail}, status_code=413).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
