"""Admin: the phones seen (``/api/v1/devices``) and their telemetry (``/api/v1/telemetry``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from xflwb.server.http.inputs import MAX_INT
from xflwb.server.http.state import AppState


class DeviceOut(BaseModel):
    id: int = Field(description="FedKit's device_id")
    platform: str | None = Field(description="bound at its first telemetry matched with an "
                                             "EvaluateRes; null until then")
    first_seen: float = Field(description="epoch seconds")
    last_seen: float = Field(description="epoch seconds")
    last_session_id: int | None
    token_id: int | None = Field(description="with device tokens: the token whose telemetry "
                                             "carries this device_id (bound at its first)")


class TelemetryOut(BaseModel):
    id: int
    kind: str = Field(description="fit | evaluate")
    device_id: int
    session_id: int
    round: int | None
    platform: str | None = Field(description="set when matched with an EvaluateRes")
    start: int = Field(description="epoch milliseconds")
    end: int = Field(description="epoch milliseconds")
    loss: float | None
    accuracy: float | None
    test_size: int | None
    received: float = Field(description="epoch seconds")


def devices_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["devices"])
    registry = state.registry

    @r.get("/devices", response_model=list[DeviceOut])
    def list_devices() -> list[dict[str, Any]]:
        return registry.list_devices()

    @r.get("/telemetry", response_model=list[TelemetryOut])
    def list_telemetry(session_id: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
                       ) -> list[dict[str, Any]]:
        return registry.get_telemetry(session_id)

    return r
