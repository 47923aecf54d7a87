"""Admin: device tokens (``/api/v1/devices/tokens``): issue, list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from xflwb.server.http.inputs import MAX_INT, PathId, _In
from xflwb.server.http.state import AppState
from xflwb.server.security import MAX_TTL
from xflwb.sessions.registry import MAX_DEVICE_NAME, NotFound


class DeviceTokenIn(_In):
    model_config = ConfigDict(extra="forbid")
    device: str = Field(min_length=1, max_length=MAX_DEVICE_NAME,
                        description="a label for the phone (shown in lists, used to revoke)")
    ttl: float | None = Field(None, gt=0, le=MAX_TTL, allow_inf_nan=False, strict=True,
                              description="seconds until the token expires (null: never)")
    session: int | None = Field(None, ge=1, le=MAX_INT, strict=True,
                                description="the one session id the token is valid for "
                                            "(null: every session)")


class IssuedTokenOut(BaseModel):
    id: int
    device: str
    token: str = Field(description="shown only in this answer (the server keeps a digest)")
    created: float = Field(description="epoch seconds")
    expires: float | None = Field(description="epoch seconds; null: never")
    session: int | None = Field(description="the one session it is valid for; null: all")


class TokenOut(BaseModel):
    id: int
    device: str
    created: float = Field(description="epoch seconds")
    expires: float | None = Field(description="epoch seconds; null: never")
    session: int | None = Field(description="the one session it is valid for; null: all")
    revoked: float | None = Field(description="epoch seconds; null while valid")


class RevokedOut(BaseModel):
    id: int
    revoked: bool


def tokens_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["tokens"])

    @r.post("/devices/tokens", status_code=201, response_model=IssuedTokenOut)
    def issue_device_token(body: DeviceTokenIn) -> dict[str, Any]:
        """A new device token; the token is in this answer only (stored as a digest).
        ``ttl``: it expires that many seconds from now; ``session``: valid for that
        session only (which must exist)."""
        if body.session is not None:
            try:
                state.registry.get_session(body.session)
            except NotFound:
                raise HTTPException(404, f"no session with id {body.session} (a "
                                         "session-scoped token names an existing "
                                         "session)") from None
        try:
            issued: dict[str, Any] = state.tokens.issue(body.device, ttl=body.ttl,
                                                        session=body.session)
            return issued
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @r.get("/devices/tokens", response_model=list[TokenOut])
    def list_device_tokens() -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = state.tokens.list()
        return listed

    @r.delete("/devices/tokens/{token_id}", response_model=RevokedOut)
    def revoke_device_token(token_id: PathId) -> dict[str, Any]:
        """Revoke a token: refused at the phone's next request, its live gRPC streams cut
        within about a second and their results in flight refused."""
        if not state.tokens.revoke(token_id):
            raise HTTPException(404, f"no active device token with id {token_id}")
        return {"id": token_id, "revoked": True}

    return r
