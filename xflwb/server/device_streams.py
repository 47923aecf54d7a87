"""Which device token each live gRPC stream of a session process joined with, and what follows.

Why: a token is checked when ``Join`` opens, but a stream lives for the whole session. A
session process is separate from the backend that revokes tokens (they share only the
registry database), so each session process keeps the token of every stream it serves
(bound at ``Join``) and

* polls the token table (one cheap row, ``TokenStore.revocation_mark``, every ``poll``
  seconds) and cuts the streams of tokens revoked since, and those whose ``ttl`` ran out;
* keeps one live stream per token: a second ``Join`` with the same token replaces the first
  (a phone whose connection dropped reconnects at once; a token never counts as two
  clients);
* answers ``refused(cid)`` for the strategy and FedBuff right before an update is used:
  the results of a cut stream are refused with the reason, and a result that arrives
  before the next poll is checked against the database itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from xflwb.server.security import TokenStore, token_from_headers

log = logging.getLogger("xflwb.device_streams")

#: how many past streams' tokens and refusals are remembered (a result can come back after
#: its stream ended; older ones are long past any round)
MEMORY = 100_000
REPLACED = ("replaced: the same device token {token} of {device!r} opened a newer stream "
            "(one live stream per token); results of the older stream are refused")


class DeviceStreams:
    """The live streams of one session process, by device token (``device_auth="token"``)."""

    def __init__(self, store: TokenStore, session_id: int, poll: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.session_id = int(session_id)
        self.poll = float(poll)
        self.clock = clock
        self._lock = threading.Lock()
        #: token id → (cid, cancel) of its live stream
        self._live: dict[int, tuple[str, Callable[[], Any]]] = {}
        #: cid → its token's row (id, device, expires); kept after the stream ends
        self._token_of: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: cid → why its results are refused
        self._refused: OrderedDict[str, str] = OrderedDict()
        self._mark: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- at Join ---------------------------------------------------------------------------
    def admit(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The token row of a joining stream's metadata (``TokenRefused`` otherwise: it was
        revoked or expired between the interceptor's check and now)."""
        headers = {k: v for k, v in metadata.items() if isinstance(v, str)}
        return self.store.check(token_from_headers(headers), self.session_id)

    def bind(self, token: dict[str, Any], cid: str, cancel: Callable[[], Any]) -> None:
        """Stream ``cid`` serves ``token``; an older live stream of the same token is cut
        (its results refused), and so is this one if the token went bad meanwhile."""
        tid = int(token["id"])
        with self._lock:
            self._remember(self._token_of, cid, token)
            old = self._live.get(tid)
            self._live[tid] = (cid, cancel)
            if old is not None:
                self._remember(self._refused, old[0], REPLACED.format(
                    token=tid, device=token["device"]))
        if old is not None:
            log.warning("device token %s (%s): a new stream %s replaces stream %s", tid,
                        token["device"], cid[:8], old[0][:8])
            _call(old[1])
        # revoked between the check at Join and now (the watcher's last look may predate
        # this stream): one look at the database closes that gap
        bad = self.store.invalid([tid])
        if bad:
            self._cut(bad)

    def release(self, cid: str) -> None:
        """Stream ``cid`` ended (its token and any refusal stay remembered)."""
        with self._lock:
            token = self._token_of.get(cid)
            if token is not None and self._live.get(int(token["id"]), ("",))[0] == cid:
                del self._live[int(token["id"])]

    # -- before a result is used -----------------------------------------------------------
    def refused(self, cid: str) -> str | None:
        """Why ``cid``'s results must not be used (its token was revoked, expired or
        opened a newer stream), else None. Asks the database when nothing is known yet, so
        a result arriving between two polls is refused too."""
        with self._lock:
            why = self._refused.get(cid)
            token = self._token_of.get(cid)
        if why is not None or token is None:  # None: not a token stream (open backend)
            return why
        bad = self.store.invalid([int(token["id"])])
        if bad:
            self._cut(bad)
            with self._lock:
                self._remember(self._refused, cid, self._reason(bad[int(token["id"])]))
                return self._refused[cid]
        return None

    # -- the watcher -----------------------------------------------------------------------
    def start(self) -> DeviceStreams:
        """Poll in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._run, name="device-token-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.check_now()
            except Exception as exc:  # a locked or lost database: try again next time
                log.warning("device token check failed (%s: %s); retrying",
                            type(exc).__name__, exc)

    def check_now(self) -> None:
        """One poll: cut streams whose token expired, or was revoked since the last poll."""
        # the mark before the snapshot: a stream bound after this snapshot checked the
        # database itself (``bind``), one bound before it is in the snapshot
        mark = self.store.revocation_mark()
        now = self.clock()
        with self._lock:
            live = {tid: self._token_of.get(cid) for tid, (cid, _) in self._live.items()}
        bad = {tid: f"device token {tid} of {t['device']!r} expired"
               for tid, t in live.items()
               if t is not None and t.get("expires") is not None and t["expires"] <= now}
        if mark != self._mark:
            self._mark = mark
            bad.update(self.store.invalid(live))
        if bad:
            self._cut(bad)

    def _reason(self, why: str) -> str:
        return f"{why}: its stream was cut and its results are refused"

    def _cut(self, bad: dict[int, str]) -> None:
        """Cut the live streams of the tokens in ``bad`` (token id → why) and refuse
        their results."""
        cancels = []
        with self._lock:
            for tid, why in bad.items():
                entry = self._live.pop(int(tid), None)
                if entry is not None:
                    self._remember(self._refused, entry[0], self._reason(why))
                    cancels.append((entry[0], entry[1], why))
        for cid, cancel, why in cancels:
            log.warning("stream %s cut: %s", cid[:8], why)
            _call(cancel)

    def live(self) -> dict[int, str]:
        """Token id → cid of its live stream (for tests and status)."""
        with self._lock:
            return {tid: cid for tid, (cid, _) in self._live.items()}

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MEMORY:
            table.popitem(last=False)


def _call(cancel: Callable[[], Any]) -> None:
    try:
        cancel()
    except Exception as exc:  # the stream ended by itself meanwhile
        log.debug("cancel failed: %s", exc)


__all__ = ["DeviceStreams"]
