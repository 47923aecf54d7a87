"""The states a session row goes through, in one place.

A ``StrEnum``: members are the very strings stored in the registry, so rows written by any
xflwb version, JSON, and comparisons with plain strings (``status == "running"``) all keep
working. ``starting`` → ``running`` → one of ``DONE``; a row still ``ACTIVE`` whose
process is gone becomes ``crashed`` (``SessionManager.refresh``).
"""

from __future__ import annotations

from enum import StrEnum


class SessionStatus(StrEnum):
    STARTING = "starting"  # row inserted, its process not yet serving
    RUNNING = "running"
    FINISHED = "finished"  # every round done
    FAILED = "failed"  # the session's own error, or failed from outside (dead fleet)
    STOPPED = "stopped"  # ``stop()`` / SIGTERM
    CRASHED = "crashed"  # its process died without saying so


#: a session in one of these states may still have a live process
ACTIVE: tuple[SessionStatus, ...] = (SessionStatus.STARTING, SessionStatus.RUNNING)
#: the states a session ends in
DONE: tuple[SessionStatus, ...] = tuple(s for s in SessionStatus if s not in ACTIVE)
