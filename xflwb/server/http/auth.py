"""The two guards: phones (open as FedKit's backend, or an issued device token) and the
admin API (the operator's bearer token)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from xflwb.server.http.state import AppState
from xflwb.server.security import token_from_headers

_BEARER = HTTPBearer(auto_error=False)


def device_guard(state: AppState) -> Callable[[Request], None]:
    """The phone routes' check: with ``device_auth == "token"`` a request must carry an
    issued, unrevoked token (``Authorization: Bearer`` or ``X-Device-Token``), else 401.
    The token's row (``TokenStore.verify``: its id and device label) is left on
    ``request.state.device_token`` for the routes that act for the device (telemetry)."""

    def guard(request: Request) -> None:
        request.state.device_token = None
        if state.device_auth != "token":
            return
        request.state.device_token = state.tokens.verify(token_from_headers(request.headers))
        if request.state.device_token is None:
            raise HTTPException(401, "unknown device: this backend enrolls devices; send the "
                                     "token the operator issued (wb.issue_device_token, "
                                     "%xfl_server token, xflwb token issue) as "
                                     "'Authorization: Bearer <token>' or 'X-Device-Token'",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


def admin_guard(state: AppState) -> Callable[..., None]:
    """The admin routes' check: ``Authorization: Bearer <admin token>``, else 401."""

    def auth(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials, state.admin_token):
            raise HTTPException(401, "missing or wrong bearer token (see wb.admin_token or "
                                     "XFLWB_ADMIN_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    return auth
