"""The two guards: phones (open as FedKit's backend, or an issued device token) and the
admin API (the operator's bearer token)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from xflwb.server.http.state import AppState
from xflwb.server.security import TokenRefused, token_from_headers

_BEARER = HTTPBearer(auto_error=False)


def device_guard(state: AppState) -> Callable[[Request], None]:
    """The phone routes' check: with ``device_auth == "token"`` a request must carry an
    issued token, not revoked and not expired (``Authorization: Bearer`` or
    ``X-Device-Token``), else 401 with the reason. Checked on every request, so a
    revocation or an expiry takes effect at the phone's next request. The token's row is
    left in ``request.state.device_token`` (``check_session_scope`` and telemetry, which
    acts for the device, read it)."""

    def guard(request: Request) -> None:
        request.state.device_token = None
        if state.device_auth != "token":
            return
        try:
            request.state.device_token = state.tokens.check(
                token_from_headers(request.headers))
        except TokenRefused as exc:
            raise HTTPException(401, f"{exc} (this backend enrolls devices)",
                                headers={"WWW-Authenticate": "Bearer"}) from None

    return guard


def check_session_scope(request: Request, session_id: int | None) -> None:
    """403 when the request's device token is valid for one session only and
    ``session_id`` (the session the phone would join; None: none running) is not it."""
    token: dict[str, Any] | None = getattr(request.state, "device_token", None)
    scope = token.get("session") if token else None
    if token is not None and scope is not None and scope != session_id:
        where = f"session {session_id}" if session_id is not None else "a new session"
        raise HTTPException(403, f"device token {token['id']} of {token['device']!r} is "
                                 f"valid only for session {scope}, not {where}; ask the "
                                 "operator for a token for this session")


def admin_guard(state: AppState) -> Callable[..., None]:
    """The admin routes' check: ``Authorization: Bearer <admin token>``, else 401."""

    def auth(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials, state.admin_token):
            raise HTTPException(401, "missing or wrong bearer token (see wb.admin_token or "
                                     "XFLWB_ADMIN_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    return auth
