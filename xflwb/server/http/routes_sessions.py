"""Admin: training sessions (``/api/v1/sessions``): list, start, one, stop, and a
session's metric history, refused updates and (FedBuff) update arrivals."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from xflwb.server.http.inputs import PathId
from xflwb.server.http.session_in import SessionIn
from xflwb.server.http.state import AppState
from xflwb.sessions.handle import history_frame, started_from
from xflwb.sessions.registry import RegistryError


class SessionOut(BaseModel):
    id: int
    model_id: int
    model_name: str
    status: str = Field(description="starting | running | finished | failed | stopped | "
                                    "crashed")
    config: dict[str, Any] = Field(description="the options it was started with")
    ports: dict[str, int] = Field(description="gRPC port by platform (android, ios)")
    round: int = Field(description="rounds done in this session")
    error: str | None
    started: float = Field(description="epoch seconds")
    ended: float | None = Field(description="epoch seconds; null while active")
    resumed_from: int | None = Field(description="the checkpoint id it resumed from")
    started_from: str = Field(description='e.g. "started fresh" or "resumed from session 1, '
                                          'round 5"')


class MetricOut(BaseModel):
    round: int
    platform: str = Field(description="android, ios or all")
    metric: str
    value: float | None


class RejectionOut(BaseModel):
    round: int
    platform: str
    client: str
    reason: str


class ArrivalOut(BaseModel):
    """One update that reached a FedBuff session's server (``Session.arrivals``' row)."""

    version: int = Field(description="the model version it went (or would have gone) into")
    platform: str = Field(description="android or ios")
    client: str
    base_version: int = Field(description="the version the device trained from")
    staleness: int = Field(description="version at arrival minus base_version")
    weight: float = Field(description="its staleness weight; 0 when rejected")
    examples: int
    fit_seconds: float | None
    seconds: float = Field(description="wall seconds since the session started, at arrival")
    status: str = Field(description="applied | rejected")
    reason: str = Field(description='why it was rejected; "" when applied')


#: the session row's fields the API shows (SessionOut, but for started_from)
_SESSION_FIELDS = ("id", "model_id", "model_name", "status", "config", "ports", "round",
                   "error", "started", "ended", "resumed_from")


def sessions_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["sessions"])
    registry = state.registry

    def _session_out(s: dict[str, Any]) -> dict[str, Any]:
        return {**{k: s[k] for k in _SESSION_FIELDS},
                "started_from": started_from(registry, s)}

    @r.get("/sessions", response_model=list[SessionOut])
    def list_sessions() -> list[dict[str, Any]]:
        state.sessions.refresh()
        return [_session_out(s) for s in registry.list_sessions()]

    @r.post("/sessions", status_code=201, response_model=SessionOut)
    def start_session(body: SessionIn) -> dict[str, Any]:
        opts = body.model_dump()
        name = opts.pop("model")
        try:
            session = state.sessions.start_phone(name, **opts)
        except RegistryError:
            raise  # NotFound → 404, SessionConflict → 409 (the app's handlers)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except (RuntimeError, TimeoutError) as exc:  # its process failed to start
            raise HTTPException(503, str(exc)) from None
        return _session_out(registry.get_session(session.id))

    @r.get("/sessions/{session_id}", response_model=SessionOut)
    def get_session(session_id: PathId) -> dict[str, Any]:
        state.sessions.refresh()
        return _session_out(registry.get_session(session_id))

    @r.post("/sessions/{session_id}/stop", response_model=SessionOut)
    def stop_session(session_id: PathId) -> dict[str, Any]:
        state.sessions.stop(session_id)
        return _session_out(registry.get_session(session_id))

    @r.get("/sessions/{session_id}/metrics", response_model=list[MetricOut])
    def session_metrics(session_id: PathId) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        df = history_frame(registry, session_id)
        return [{"round": int(x.round), "platform": x.platform, "metric": x.metric,
                 "value": None if x.value != x.value else x.value}
                for x in df.itertuples()]

    @r.get("/sessions/{session_id}/rejections", response_model=list[RejectionOut])
    def session_rejections(session_id: PathId) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        return registry.get_rejections(session_id)

    @r.get("/sessions/{session_id}/arrivals", response_model=list[ArrivalOut])
    def session_arrivals(session_id: PathId) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        return registry.get_arrivals(session_id)

    return r
