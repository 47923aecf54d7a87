"""Protocol violations reported against a session's client manager, drained into rounds.

The transport that detects them (``xflwb.server.protocol.StrictFlowerServicer``: duplicated
or out-of-order messages) appends here; the round adapter (``flower_strategy``) and
FedBuff's loop drain them into each round's rejections. Keyed by the shared client manager
(one per session), weakly, so a finished session's log goes with it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any

__all__ = ["Violation", "drain_violations", "violation_log"]

Violation = tuple[str, str, str]  # platform, client id, reason

_LOGS: weakref.WeakKeyDictionary[Any, deque[Violation]] = weakref.WeakKeyDictionary()
_LOGS_LOCK = threading.Lock()


def violation_log(manager: Any) -> deque[Violation]:
    """The violations reported for clients of ``manager`` (the session's shared client
    manager), oldest first; the strategy drains it into each round's rejections."""
    with _LOGS_LOCK:
        try:
            found = _LOGS.get(manager)
            if found is None:
                found = _LOGS[manager] = deque(maxlen=10_000)
        except TypeError:  # a manager that cannot be weakly referenced has no stream anyway
            return deque()
        return found


def drain_violations(manager: Any) -> list[Violation]:
    out = []
    dq = violation_log(manager)
    while True:
        try:
            out.append(dq.popleft())
        except IndexError:
            return out
