"""Deadlines on slow HTTP clients: the request head must arrive within ``header_timeout``
of the connection (or of the previous response), and the body within ``body_timeout`` of
the head; a connection that misses one is closed.

Why by hand: uvicorn times out only an idle keep-alive connection *after* a response
(``timeout_keep_alive``); neither of its HTTP protocols (httptools, h11) bounds the time a
client takes to send a request, so a client that connects and says nothing, or sends one
header byte a second (slowloris), holds its connection for ever. ``timed_protocol`` wraps
whichever protocol class uvicorn would pick (``http="auto"``: httptools if installed, else
h11) and follows the request through the state both keep (``cycle``, ``cycle.more_body``,
``cycle.response_complete``), so no parser callback of either is replaced.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

#: defaults of the backend options ``http_header_timeout`` / ``http_body_timeout`` /
#: ``http_idle_timeout`` (the last is uvicorn's own ``timeout_keep_alive``)
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
IDLE_TIMEOUT = 5.0


def _auto_protocol() -> type[asyncio.Protocol]:
    """The class uvicorn's ``http="auto"`` uses."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


def timed_protocol(header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                   base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` (default: what ``http="auto"`` picks)
    that closes a connection whose request head is not complete ``header_timeout`` seconds
    after the connection opened (or the previous response ended), or whose body is not
    complete ``body_timeout`` seconds after its head. Pass it as ``uvicorn.Config(http=...)``.
    """
    parent: Any = base or _auto_protocol()

    class TimedProtocol(parent):  # type: ignore[misc]  # parent is chosen at run time
        _xfl_timer: asyncio.TimerHandle | None = None
        _xfl_cycle: Any = None  # the request whose head was seen last
        _xfl_phase = "head"  # head | body | app (the app has the whole request)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._xfl_wait("head", header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._xfl_follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._xfl_follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._xfl_cancel()
            super().connection_lost(exc)

        def _xfl_follow(self) -> None:
            """Move the deadline along with the request: a new head ends the head phase, a
            complete body the body phase; a finished response starts waiting for the next
            head (the head deadline is never restarted by the bytes of a slow head)."""
            cycle: Any = getattr(self, "cycle", None)  # uvicorn's RequestResponseCycle
            if self.transport is None or self.transport.is_closing():
                self._xfl_cancel()
            elif cycle is not None and cycle is not self._xfl_cycle \
                    and not cycle.response_complete:
                self._xfl_cycle = cycle  # a new request's head is complete
                if cycle.more_body:
                    self._xfl_wait("body", body_timeout)
                else:
                    self._xfl_cancel("app")
            elif self._xfl_phase == "body" and (not cycle.more_body or cycle.response_complete):
                self._xfl_cancel("app")
            elif self._xfl_phase == "app" and (cycle is None or cycle.response_complete):
                self._xfl_wait("head", header_timeout)

        def _xfl_wait(self, phase: str, seconds: float) -> None:
            self._xfl_cancel(phase)
            self._xfl_timer = self.loop.call_later(seconds, self._xfl_expired, phase, seconds)

        def _xfl_cancel(self, phase: str | None = None) -> None:
            if self._xfl_timer is not None:
                self._xfl_timer.cancel()
                self._xfl_timer = None
            if phase is not None:
                self._xfl_phase = phase

        def _xfl_expired(self, phase: str, seconds: float) -> None:
            self._xfl_timer = None
            if self.transport is not None and not self.transport.is_closing():
                log.info("closed an HTTP connection from %s: its request %s took more than "
                         "%g s", self.client, phase, seconds)
                self.transport.close()

    TimedProtocol.__name__ = TimedProtocol.__qualname__ = f"Timed{parent.__name__}"
    return TimedProtocol
