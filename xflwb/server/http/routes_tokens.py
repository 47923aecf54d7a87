"""Admin: device tokens (``/api/v1/devices/tokens``): issue, list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from xflwb.server.http.inputs import PathId, _In
from xflwb.server.http.state import AppState
from xflwb.server.security import MAX_DEVICE_NAME


class DeviceTokenIn(_In):
    model_config = ConfigDict(extra="forbid")
    device: str = Field(min_length=1, max_length=MAX_DEVICE_NAME,
                        description="a label for the phone (shown in lists, used to revoke)")


class IssuedTokenOut(BaseModel):
    id: int
    device: str
    token: str = Field(description="shown only in this answer (the server keeps a digest)")
    created: float = Field(description="epoch seconds")


class TokenOut(BaseModel):
    id: int
    device: str
    created: float = Field(description="epoch seconds")
    revoked: float | None = Field(description="epoch seconds; null while valid")


class RevokedOut(BaseModel):
    id: int
    revoked: bool


def tokens_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["tokens"])

    @r.post("/devices/tokens", status_code=201, response_model=IssuedTokenOut)
    def issue_device_token(body: DeviceTokenIn) -> dict[str, Any]:
        """A new device token; the token is in this answer only (stored as a digest)."""
        try:
            return state.tokens.issue(body.device)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @r.get("/devices/tokens", response_model=list[TokenOut])
    def list_device_tokens() -> list[dict[str, Any]]:
        return state.tokens.list()

    @r.delete("/devices/tokens/{token_id}", response_model=RevokedOut)
    def revoke_device_token(token_id: PathId) -> dict[str, Any]:
        if not state.tokens.revoke(token_id):
            raise HTTPException(404, f"no active device token with id {token_id}")
        return {"id": token_id, "revoked": True}

    return r
