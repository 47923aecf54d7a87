"""The HTTP API: FedKit's device routes (kept together as the compatibility surface) and the
admin API under ``/api/v1`` (bearer token). Request and response bodies are typed models, so
``/openapi.json`` documents exactly what phones and tools may send.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from xflwb.server import registry as reg
from xflwb.server.registry import NotFound, Registry, RegistryError
from xflwb.server.session import SessionManager, history_frame, resumes, started_from

PLATFORM_OF_FLAG = {"tflite": "android", "coreml": "ios"}


@dataclass
class AppState:
    registry: Registry
    sessions: SessionManager
    admin_token: str
    auto_start: bool = False
    session_defaults: dict[str, Any] = field(default_factory=dict)


# -- FedKit bodies (snake_case, exactly FEDKIT_PROTOCOL.md) -------------------------------------
class AdvertisedIn(BaseModel):
    data_type: str = Field(min_length=1, max_length=128)
    tflite: bool = True
    coreml: bool = False


class CoreMLLayer(BaseModel):
    name: str
    type: Literal["weights", "bias"]
    updatable: bool


class MLModelOut(BaseModel):
    id: int = Field(description="platform-specific model id (pass it to train/server)")
    name: str
    tflite_path: str | None
    coreml_path: str | None
    tflite_layers: list[int] | None
    coreml_layers: list[CoreMLLayer] | None
    tflite: bool
    coreml: bool


class ServerIn(BaseModel):
    id: int
    start_fresh: bool = Field(False, description="FedKit's flag: an auto-started session "
                              "resumes from the model's latest checkpoint unless it is true")


class ServerOut(BaseModel):
    status: str = Field(description="new | started | started_non_fresh | occupied | no_session")
    session_id: int | None
    port: int | None


class FitInsTelemetry(BaseModel):
    device_id: int
    session_id: int
    start: int = Field(description="epoch milliseconds")
    end: int = Field(description="epoch milliseconds")


class EvaluateInsTelemetry(FitInsTelemetry):
    loss: float
    accuracy: float
    test_size: int = Field(ge=0)


# -- admin bodies -------------------------------------------------------------------------------
class PublishIn(BaseModel):
    path: str = Field(description="export directory or manifest.json on the server's disk")


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    rounds: int = Field(10, ge=1)
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    min_clients: int = Field(2, ge=1)
    fraction_fit: float = Field(1.0, ge=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    local_epochs: int = Field(1, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    start_fresh: bool = Field(False, description="as FedKit's train/server: resume from the "
                              "model's latest checkpoint unless true")


def file_path(name: str, file: str) -> str:
    """FedKit's relative download path; the file name carries the version (clients cache)."""
    return f"static/{name}--{file}"


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="xflwb backend", version="1",
                  description="FedKit-compatible device API and the xflwb admin API.")
    app.state.xfl = state

    @app.exception_handler(NotFound)
    async def _not_found(_r: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RegistryError)
    async def _conflict(_r: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    app.include_router(fedkit_router(state))
    app.include_router(telemetry_router(state))
    app.include_router(admin_router(state), prefix="/api/v1")
    return app


def fedkit_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["fedkit"])
    registry = state.registry

    @r.post("/train/advertised", response_model=MLModelOut)
    def advertised(body: AdvertisedIn) -> MLModelOut:
        if body.tflite == body.coreml:
            raise HTTPException(400, "set exactly one of tflite (Android) or coreml (iOS) "
                                     "to true: the model id returned is platform-specific")
        platform = "android" if body.tflite else "ios"
        found = registry.advertised(body.data_type, platform)
        if found is None:
            raise HTTPException(404, f"no {platform} model for data_type {body.data_type!r}")
        model, art = found
        entry = model["manifest"]["platforms"][platform]
        path = file_path(model["name"], art["file"])
        layers = [CoreMLLayer(name=e["name"], type=e["type"], updatable=e["updatable"])
                  for e in entry["coreml_layers"]] if platform == "ios" else None
        return MLModelOut(
            id=art["id"], name=model["name"],
            tflite_path=path if platform == "android" else None,
            coreml_path=path if platform == "ios" else None,
            tflite_layers=entry["tflite_layers"] if platform == "android" else None,
            coreml_layers=layers, tflite=platform == "android", coreml=platform == "ios")

    @r.get("/train/manifest/{model_id}")
    def manifest(model_id: int) -> dict[str, Any]:
        """The manifest of a platform model id (an xflwb addition for virtual devices and
        tools: layouts, shapes and the sha256 of every file; FedKit apps never call it)."""
        try:
            art = registry.get_artifact(model_id)
        except NotFound:
            raise HTTPException(404, f"no model with id {model_id}") from None
        m = registry.get_model(art["model_id"])["manifest"]
        return {k: v for k, v in m.items() if not k.startswith("_")}

    @r.get("/static/{filename}", response_class=FileResponse)
    def download(filename: str) -> FileResponse:
        q = (sa.select(reg.models.c.directory, reg.artifacts.c.file)
             .join(reg.artifacts, reg.artifacts.c.model_id == reg.models.c.id)
             .where((reg.models.c.name + "--" + reg.artifacts.c.file) == filename))
        with registry.engine.connect() as c:
            row = c.execute(q).first()
        if row is None:
            raise HTTPException(404, f"no model file {filename!r}")
        return FileResponse(f"{row.directory}/{row.file}", filename=row.file,
                            media_type="application/octet-stream")

    @r.post("/train/server", response_model=ServerOut)
    def server(body: ServerIn) -> ServerOut:
        try:
            art = registry.get_artifact(body.id)
        except NotFound:
            raise HTTPException(404, f"no model with id {body.id}") from None
        model = registry.get_model(art["model_id"])
        state.sessions.refresh()
        active = registry.active_session_for(model["name"])
        if active is not None:
            if active["model_id"] != model["id"]:
                return ServerOut(status="occupied", session_id=None, port=None)
            if body.start_fresh and resumes(active["config"]):
                return ServerOut(status="started_non_fresh", session_id=active["id"],
                                 port=None)
            return ServerOut(status="started", session_id=active["id"],
                             port=active["ports"].get(art["platform"]))
        if not state.auto_start:
            return ServerOut(status="no_session", session_id=None, port=None)
        # phones keep FedKit's semantics: resume unless they ask for a fresh start
        opts = {**state.session_defaults, "resume": not body.start_fresh}
        session = state.sessions.start(model["name"], **opts)
        return ServerOut(status="new", session_id=session.id,
                         port=session.ports.get(art["platform"]))

    return r


def telemetry_router(state: AppState) -> APIRouter:
    r = APIRouter(prefix="/telemetry", tags=["fedkit"])
    registry = state.registry

    def _store(kind: str, body: FitInsTelemetry) -> dict[str, str]:
        if body.end < body.start:
            raise HTTPException(400, f"end ({body.end}) is before start ({body.start})")
        try:
            registry.add_telemetry(kind, body.model_dump())
        except NotFound:
            raise HTTPException(404, f"no session with id {body.session_id}") from None
        if kind == "evaluate":
            registry.match_telemetry(body.session_id)
        return {"status": "ok"}

    @r.post("/fit_ins")
    def fit_ins(body: FitInsTelemetry) -> dict[str, str]:
        return _store("fit", body)

    @r.post("/evaluate_ins")
    def evaluate_ins(body: EvaluateInsTelemetry) -> dict[str, str]:
        return _store("evaluate", body)

    return r


_BEARER = HTTPBearer(auto_error=False)


def admin_router(state: AppState) -> APIRouter:
    def auth(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials, state.admin_token):
            raise HTTPException(401, "missing or wrong bearer token (see wb.admin_token or "
                                     "XFLWB_ADMIN_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    r = APIRouter(dependencies=[Depends(auth)], tags=["admin"])
    registry = state.registry

    def _model_out(m: dict[str, Any]) -> dict[str, Any]:
        arts = registry.artifacts_of(m["id"])
        return {"id": m["id"], "name": m["name"], "version": m["version"],
                "data_type": m["data_type"], "created": m["created"],
                "artifacts": {p: {"id": a["id"], "file": a["file"], "sha256": a["sha256"],
                                  "bytes": a["bytes"],
                                  "path": file_path(m["name"], a["file"])}
                              for p, a in arts.items()},
                "manifest": {k: v for k, v in m["manifest"].items() if not k.startswith("_")}}

    @r.get("/models")
    def list_models() -> list[dict[str, Any]]:
        return [_model_out(m) for m in registry.list_models()]

    @r.get("/models/{model_id}")
    def get_model(model_id: int) -> dict[str, Any]:
        return _model_out(registry.get_model(model_id))

    @r.post("/models", status_code=201)
    def publish(body: PublishIn) -> dict[str, Any]:
        try:
            return _model_out(registry.publish(body.path))
        except FileNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def _session_out(s: dict[str, Any]) -> dict[str, Any]:
        return {**{k: s[k] for k in ("id", "model_id", "model_name", "status", "config",
                                     "ports", "round", "error", "started", "ended",
                                     "resumed_from")},
                "started_from": started_from(registry, s)}

    @r.get("/sessions")
    def list_sessions() -> list[dict[str, Any]]:
        state.sessions.refresh()
        return [_session_out(s) for s in registry.list_sessions()]

    @r.post("/sessions", status_code=201)
    def start_session(body: SessionIn) -> dict[str, Any]:
        opts = body.model_dump()
        name = opts.pop("model")
        opts["resume"] = not opts.pop("start_fresh")
        try:
            session = state.sessions.start(name, **opts)
        except RegistryError:
            raise  # NotFound → 404, conflicts → 409 (handlers above)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return _session_out(registry.get_session(session.id))

    @r.get("/sessions/{session_id}")
    def get_session(session_id: int) -> dict[str, Any]:
        state.sessions.refresh()
        return _session_out(registry.get_session(session_id))

    @r.post("/sessions/{session_id}/stop")
    def stop_session(session_id: int) -> dict[str, Any]:
        state.sessions.stop(session_id)
        return _session_out(registry.get_session(session_id))

    @r.get("/sessions/{session_id}/metrics")
    def session_metrics(session_id: int) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        df = history_frame(registry, session_id)
        return [{"round": int(x.round), "platform": x.platform, "metric": x.metric,
                 "value": None if x.value != x.value else x.value}
                for x in df.itertuples()]

    @r.get("/sessions/{session_id}/rejections")
    def session_rejections(session_id: int) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        return registry.get_rejections(session_id)

    @r.get("/devices")
    def list_devices() -> list[dict[str, Any]]:
        return registry.list_devices()

    @r.get("/telemetry")
    def list_telemetry(session_id: int | None = None) -> list[dict[str, Any]]:
        return registry.get_telemetry(session_id)

    return r
