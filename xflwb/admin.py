"""``xflwb.AdminClient``: a running backend's admin API from another process.

``xflwb train`` uses it to start a session on a backend that runs elsewhere (``xflwb
server`` in a terminal, a notebook's ``Workbench``): the request body is the same
``SessionConfig`` options the notebook's ``wb.train`` takes, checked here before anything
is sent. The returned ``RemoteSession`` follows the session over HTTP.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from xflwb import _options
from xflwb.errors import BackendError
from xflwb.server.config import SessionConfig

#: the statuses a session ends in (``xflwb.sessions.status.DONE``, as the API spells them)
_DONE = ("finished", "failed", "stopped", "crashed")


class AdminError(BackendError):
    """The backend refused a request; the message is its ``detail``."""


class AdminClient:
    """The admin API at ``url`` (``/api/v1``), authorised by the backend's admin token."""

    def __init__(self, url: str, admin_token: str, *, ca_file: str | None = None,
                 timeout: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url + "/api/v1", timeout=timeout,
                                  headers={"Authorization": f"Bearer {admin_token}"},
                                  verify=ca_file or True)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            res = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise OSError(f"cannot reach the backend at {self.url}: {exc}") from exc
        if res.status_code >= 400:
            try:
                detail = res.json().get("detail")
            except ValueError:
                detail = res.text
            if res.status_code == 401:
                detail = f"{detail} (the admin token is wrong: xflwb server prints it)"
            raise AdminError(f"{method} {path}: HTTP {res.status_code}: {detail}")
        return res.json()

    def publish(self, export_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Publish an export directory (a path on the backend's machine)."""
        return dict(self.request("POST", "/models", json={"path": str(Path(export_dir)
                                                                          .resolve())}))

    @_options.generated(SessionConfig)
    def train(self, model: str | os.PathLike[str], **options: Any) -> RemoteSession:
        """Start a session of ``model`` (a published name, or an export directory, published
        first) with ``SessionConfig`` options; returns at once."""
        _options.unknown(SessionConfig, options, "train")
        cfg = SessionConfig(**options)  # refused here, before anything is sent
        name = str(model)
        if Path(name).exists():
            name = str(self.publish(name)["name"])
        # as the config normalised them (an xflwb.DP becomes its dict): JSON, the same values
        body = {k: getattr(cfg, k) for k in options}
        info = self.request("POST", "/sessions", json={"model": name, **body})
        return RemoteSession(self, info)

    def session(self, session_id: int) -> RemoteSession:
        return RemoteSession(self, self.request("GET", f"/sessions/{int(session_id)}"))

    # -- device tokens (as the notebook's wb.issue_device_token / revoke / device_tokens) --
    def issue_device_token(self, device: str, ttl: float | None = None,
                           session: int | None = None) -> str:
        """A new device token (shown only now); ``ttl`` seconds until it expires,
        ``session``: the one session id it is valid for."""
        body: dict[str, Any] = {"device": device}
        body.update({k: v for k, v in (("ttl", ttl), ("session", session)) if v is not None})
        return str(self.request("POST", "/devices/tokens", json=body)["token"])

    def revoke_device_token(self, token_id: int) -> None:
        """Revoke a token by id: its live streams are cut within about a second."""
        self.request("DELETE", f"/devices/tokens/{int(token_id)}")

    @property
    def device_tokens(self) -> pd.DataFrame:
        """Every token issued (id, device, created, expires, session, revoked)."""
        return pd.DataFrame(self.request("GET", "/devices/tokens"),
                            columns=["id", "device", "created", "expires", "session",
                                     "revoked"])


class RemoteSession:
    """A session of a backend, followed over its admin API (the attributes a ``Session``
    has that make sense from afar)."""

    def __init__(self, client: AdminClient, info: dict[str, Any]) -> None:
        self.client = client
        self.id = int(info["id"])
        self._info = info

    @property
    def info(self) -> dict[str, Any]:
        self._info = self.client.request("GET", f"/sessions/{self.id}")
        return self._info

    #: the session's options as the backend stored them (``SessionOut.config``)
    config = property(lambda self: self._info["config"])
    model = property(lambda self: self._info["model_name"])
    ports = property(lambda self: self._info["ports"])
    started_from = property(lambda self: self._info["started_from"])
    status = property(lambda self: self.info["status"])
    round = property(lambda self: int(self.info["round"]))

    @property
    def history(self) -> pd.DataFrame:
        """As ``Session.history``: a FedBuff session's also has ``version`` (= round)."""
        rows = self.client.request("GET", f"/sessions/{self.id}/metrics")
        df = pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])
        from xflwb.sessions.options import is_asynchronous

        if is_asynchronous(self._info.get("config") or {}):
            df["version"] = df["round"]
        return df

    @property
    def arrivals(self) -> pd.DataFrame:
        """As ``Session.arrivals``: a FedBuff session's updates (applied or rejected) with
        their version, staleness and weight; empty for synchronous sessions."""
        from xflwb.sessions.registry import ARRIVAL_COLUMNS

        rows = self.client.request("GET", f"/sessions/{self.id}/arrivals")
        return pd.DataFrame(rows, columns=list(ARRIVAL_COLUMNS))

    def stop(self) -> None:
        self.client.request("POST", f"/sessions/{self.id}/stop")

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> str:
        """Block until the session ends; its final status. ``TimeoutError`` after
        ``timeout`` seconds (the session keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = str(self.status)
            if status in _DONE:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} is still {status} after {timeout:g} s "
                                   f"(round {self._info['round']})")
            time.sleep(poll)

    @property
    def end_reason(self) -> str | None:
        """Why the session ended, in words (as ``Session.end_reason``); None while it
        runs."""
        return self._end_reason(self.info)

    def _end_reason(self, info: dict[str, Any]) -> str | None:
        from xflwb.sessions.ending import end_reason, needs_history

        return end_reason(info, self.history if needs_history(info) else None)

    def __repr__(self) -> str:
        why = self._end_reason(self._info)
        return (f"RemoteSession({self.id} of {self._info['model_name']} at "
                f"{self.client.url}: {self._info['status']}, round {self._info['round']}"
                + (f", {why}" if why else "") + ")")
