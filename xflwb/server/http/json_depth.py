"""The nesting bound on JSON bodies: a pure ASGI middleware that refuses a body nested
deeper than ``MAX_JSON_DEPTH`` with 400 before anything parses it.

Why by hand: Python's ``json`` parser, pydantic's error rendering and FastAPI's
``jsonable_encoder`` all recurse, so a body 900 levels deep used to end in
``RecursionError`` (a 500) and one 100,000 deep in a generic 400. No route takes bodies
nested more than a few levels, so the bound is checked once, on the raw bytes, by an
iterative scan (regular expressions over the structural characters, strings skipped),
linear in the body's size; the body size itself is bounded by ``BodyLimit`` outside."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

#: the deepest nesting of arrays and objects a request body may have (routes use ≤ 4)
MAX_JSON_DEPTH = 32

_STRUCTURE = re.compile(rb'[\[\]{}"]')
#: the rest of a string after its opening quote; possessive, so it never backtracks
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.DOTALL)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` (JSON text) opens more than ``limit`` nested arrays/objects.

    Iterative and linear: only structural bytes are visited and each string is skipped in
    one possessive match. Malformed JSON (an unterminated string, stray closers) is left to
    the parser, which refuses it with 422."""
    depth, pos = 0, 0
    while (m := _STRUCTURE.search(body, pos)) is not None:
        char = body[m.start()]
        if char == 0x22:  # '"': skip the string
            rest = _STRING_REST.match(body, m.end())
            if rest is None:
                return False
            pos = rest.end()
            continue
        if char in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth = max(0, depth - 1)
        pos = m.end()
    return False


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """FastAPI parses a body as JSON when it has no content type or a JSON one."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json"))
    return True


class JsonDepthLimit:
    """Refuse JSON request bodies nested deeper than ``limit`` with 400 (a short detail),
    on every route. The body is read here (as FastAPI would read it anyway) and handed on
    unchanged."""

    def __init__(self, app: Any, limit: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in _BODY_METHODS
                or not _is_json(scope.get("headers", []))):
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: pass that on
                replay: list[Message] = [message]
                break
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(parts),
                           "more_body": False}]
                break
        body = replay[0].get("body", b"")
        if body and json_depth_exceeds(body, self.limit):
            response = JSONResponse(
                {"detail": f"JSON body nested deeper than {self.limit} levels of arrays/"
                           "objects; no route takes such bodies: send a flatter one"},
                status_code=400)
            await response(scope, receive, send)
            return

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)
