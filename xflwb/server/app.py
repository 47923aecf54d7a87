"""The HTTP API: FedKit's device routes (kept together as the compatibility surface) and the
admin API under ``/api/v1`` (bearer token). Request and response bodies are typed models, so
``/openapi.json`` documents exactly what phones and tools may send.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from xflwb.server import registry as reg
from xflwb.server.config import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
from xflwb.server.registry import NotFound, Registry, RegistryError, SessionConflict
from xflwb.server.security import MAX_DEVICE_NAME, TokenStore, token_from_headers
from xflwb.server.session import (
    SessionManager,
    history_frame,
    resumes,
    started_from,
)

log = logging.getLogger(__name__)

#: SQLite (and PostgreSQL's BIGINT) stores signed 64-bit integers: anything larger is bad input
MAX_INT = 2**63 - 1
#: a database id or epoch-milliseconds field: 422 outside [0, 2^63 - 1], never an overflow
Id = Annotated[int, Field(ge=0, le=MAX_INT)]
PathId = Annotated[int, Path(ge=0, le=MAX_INT)]
#: bodies up to this size are always read; a larger one is measured against ``body_limit``
BODY_FLOOR = 1024 * 1024
#: telemetry per device: a burst, then a sustained rate (a phone posts two per round)
TELEMETRY_BURST = 60
TELEMETRY_RATE = 10.0
#: telemetry values a phone can honestly report (accuracy is checked in [0, 1])
MAX_TELEMETRY_LOSS = 1e12
MAX_TEST_SIZE = 10**9
MAX_TELEMETRY_SPAN_MS = 7 * 24 * 3600 * 1000
#: how long a phone asking ``train/server`` waits for a session that is still starting
START_WAIT = 120.0


class RateLimiter:
    """A token bucket per key (a device id): ``burst`` posts at once, ``rate`` per second
    sustained. Thread-safe; remembers at most ``max_keys`` keys (the least recently used
    are forgotten, i.e. start with a full bucket again)."""

    def __init__(self, rate: float = TELEMETRY_RATE, burst: float = TELEMETRY_BURST,
                 max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max_keys
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """Spend one token for ``key``: 0.0 when allowed, else the seconds until one is."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if not wait else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


@dataclass
class AppState:
    registry: Registry
    sessions: SessionManager
    admin_token: str
    auto_start: bool = False
    session_defaults: dict[str, Any] = field(default_factory=dict)
    #: largest HTTP request body; None derives it from the largest published model
    max_body_bytes: int | None = None
    #: honour ``start_fresh`` from a phone's ``train/server`` (otherwise it is ignored and
    #: logged: a phone must not throw away the operator's checkpointed progress)
    allow_phone_start_fresh: bool = False
    #: None: the device API is open (FedKit); "token": phones present an issued token
    device_auth: str | None = None
    #: the device token store (``xflwb.server.security.TokenStore``), made by create_app
    tokens: Any = field(default=None, repr=False)
    telemetry_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(),
                                           repr=False)
    _start_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _locks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def body_limit(self) -> int:
        """``max_body_bytes``, else twice the largest published model file plus 1 MiB (at
        least 1 MiB): no route takes a body near a model's size, so this is generous."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(BODY_FLOOR, 2 * self.registry.largest_artifact_bytes() + BODY_FLOOR)

    def start_lock(self, model_name: str) -> threading.Lock:
        """Serialises this process's auto-starts of one model (the registry's unique index
        settles races with other processes)."""
        with self._locks_lock:
            return self._start_locks.setdefault(model_name, threading.Lock())


def _check_value(value: Any, where: str = "body") -> None:
    """Refuse what cannot be stored or rendered back: strings that are not encodable as
    UTF-8 (lone surrogates from ``\\ud800`` escapes) and NaN/Infinity (JSON has neither)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: a string that cannot be encoded as UTF-8 (a lone "
                             "surrogate escape such as \\ud800); send valid Unicode") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number; send a finite one")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(k, f"{where} key")
            _check_value(v, f"{where}.{k}" if isinstance(k, str) and k.isprintable()
                         else where)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")


class _In(BaseModel):
    """Every request body: strings must be valid Unicode and numbers finite, so nothing
    accepted can fail to be stored or rendered later (a 5xx from bad input)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        _check_value(data)
        return data


def _renderable(value: Any) -> Any:
    """``value`` made JSON-safe for an error response: non-finite floats and strings that
    cannot be encoded are echoed as text (the default 422 cannot render them: a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(_renderable(k)): _renderable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_renderable(v) for v in value]
    return value


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(413, f"request body larger than {limit} bytes (the server's "
                              "max_body_bytes)")


class BodyLimit:
    """Refuse request bodies over ``limit()`` bytes with 413 before reading them: by the
    declared Content-Length, and by counting a streamed (chunked) body as it arrives.

    Pure ASGI (no per-request task or buffering); the limit is only looked up for bodies
    over ``floor`` bytes, so small requests pay one header scan."""

    def __init__(self, app: Any, limit: Callable[[], int], floor: int = BODY_FLOOR) -> None:
        self.app = app
        self.limit = limit
        self.floor = floor  # bodies up to this size pass without looking the limit up

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = int(value) if value.isdigit() else 0  # bad values: the server's
                if declared > self.floor and declared > (limit := self.limit()):
                    await self._refuse(send, limit)
                    return
                break
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.floor and seen > (limit := self.limit()):
                    raise _TooLarge(limit)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as exc:
            if started:
                raise
            await self._refuse(send, exc.limit)

    @staticmethod
    async def _refuse(send: Callable[[dict], Awaitable[None]], limit: int) -> None:
        body = JSONResponse({"detail": _TooLarge(limit).detail}, status_code=413).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# -- FedKit bodies (snake_case, exactly FEDKIT_PROTOCOL.md) -------------------------------------
class AdvertisedIn(_In):
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


class ServerIn(_In):
    id: Id
    start_fresh: bool = Field(False, description="FedKit's flag: an auto-started session "
                              "resumes from the model's latest checkpoint unless it is true; "
                              "ignored (logged) unless the operator allowed it "
                              "(allow_phone_start_fresh)")


class ServerOut(BaseModel):
    status: str = Field(description="new | started | started_non_fresh | occupied | no_session")
    session_id: int | None
    port: int | None


class FitInsTelemetry(_In):
    device_id: Id
    session_id: Id
    start: Id = Field(description="epoch milliseconds")
    end: Id = Field(description="epoch milliseconds")


class EvaluateInsTelemetry(FitInsTelemetry):
    loss: float = Field(ge=-MAX_TELEMETRY_LOSS, le=MAX_TELEMETRY_LOSS)
    accuracy: float = Field(ge=0, le=1, description="a fraction in [0, 1]")
    test_size: int = Field(ge=0, le=MAX_TEST_SIZE)


# -- admin bodies -------------------------------------------------------------------------------
class PublishIn(_In):
    path: str = Field(max_length=4096,
                      description="export directory or manifest.json on the server's disk")


class SessionIn(_In):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(max_length=64)
    rounds: int = Field(10, ge=1, le=1_000_000)
    strategy: str = Field("fedavg", max_length=64)
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    min_clients: int = Field(2, ge=1, le=1_000_000)
    fraction_fit: float = Field(1.0, ge=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    local_epochs: int = Field(1, ge=1, le=100_000)
    round_timeout: float = Field(600.0, gt=0, le=30 * 86400)
    max_message_bytes: int | None = Field(
        None, ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES,
        description="largest gRPC message (FitRes) accepted; default: from the model's size")
    max_examples: int | None = Field(
        1_000_000, ge=1, le=2**63 - 1,
        description="a client's num_examples is capped here (recorded); null: no cap")
    max_update_norm: float | None = Field(
        None, gt=0, description="reject updates farther than this (L2, canonical space) from "
        "the global model; default: no bound")
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which may hold NaN or a lone surrogate
        return JSONResponse({"detail": _renderable(jsonable_encoder(exc.errors()))},
                            status_code=422)

    app.add_middleware(BodyLimit, limit=state.body_limit,
                       floor=min(BODY_FLOOR, state.max_body_bytes or BODY_FLOOR))

    if state.tokens is None:
        state.tokens = TokenStore(state.registry.engine)
    phone = [Depends(device_guard(state))]  # a no-op unless device_auth == "token"
    app.include_router(fedkit_router(state), dependencies=phone)
    app.include_router(telemetry_router(state), dependencies=phone)
    app.include_router(admin_router(state), prefix="/api/v1")
    return app


def device_guard(state: AppState) -> Callable[[Request], None]:
    """The phone routes' check: with ``device_auth == "token"`` a request must carry an
    issued, unrevoked token (``Authorization: Bearer`` or ``X-Device-Token``), else 401."""

    def guard(request: Request) -> None:
        if state.device_auth != "token":
            return
        if state.tokens.verify(token_from_headers(request.headers)) is None:
            raise HTTPException(401, "unknown device: this backend enrolls devices; send the "
                                     "token the operator issued (wb.issue_device_token, "
                                     "%xfl_server token, xflwb token issue) as "
                                     "'Authorization: Bearer <token>' or 'X-Device-Token'",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


class DeviceTokenIn(_In):
    model_config = ConfigDict(extra="forbid")
    device: str = Field(min_length=1, max_length=MAX_DEVICE_NAME,
                        description="a label for the phone (shown in lists, used to revoke)")


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
    def manifest(model_id: PathId) -> dict[str, Any]:
        """The manifest of a platform model id (an xflwb addition for virtual devices and
        tools: layouts, shapes and the sha256 of every file; FedKit apps never call it)."""
        try:
            art = registry.get_artifact(model_id)
        except NotFound:
            raise HTTPException(404, f"no model with id {model_id}") from None
        m = registry.get_model(art["model_id"])["manifest"]
        return {k: v for k, v in m.items() if not k.startswith("_")}

    @r.get("/static/{filename}", response_class=FileResponse)
    def download(filename: Annotated[str, Path(max_length=1024)]) -> FileResponse:
        found = registry.model_file(filename)
        if found is None:
            raise HTTPException(404, f"no model file {filename!r}")
        directory, file = found
        path = FsPath(directory) / file
        if not path.is_file():
            raise HTTPException(404, f"model file {filename!r} is registered but missing from "
                                     f"{directory}; publish the export again")
        # never a symlink, never anything outside the registry's copy under data_dir
        if path.is_symlink() or not path.resolve().is_relative_to(registry.artifact_dir):
            log.warning("refused to serve %s: a symlink or outside %s", path,
                        registry.artifact_dir)
            raise HTTPException(404, f"model file {filename!r} is not a regular file inside "
                                     "the registry; publish the export again")
        return FileResponse(path, filename=file, media_type="application/octet-stream")

    @r.post("/train/server", response_model=ServerOut)
    def server(body: ServerIn) -> ServerOut:
        try:
            art = registry.get_artifact(body.id)
        except NotFound:
            raise HTTPException(404, f"no model with id {body.id}") from None
        model = registry.get_model(art["model_id"])
        platform = art["platform"]
        # only the operator decides whether checkpointed progress is thrown away
        fresh = body.start_fresh and state.allow_phone_start_fresh
        if body.start_fresh and not fresh:
            log.warning("ignored start_fresh from a phone (model %s): the operator did not "
                        "allow it (allow_phone_start_fresh / --allow-phone-start-fresh)",
                        model["name"])
        state.sessions.refresh()
        active = registry.active_session_for(model["name"])
        if active is None and state.auto_start:
            # phones of one model asking at once: the first starts the session ("new"),
            # the others wait for it here and join it ("started"), as FedKit's apps expect
            with state.start_lock(model["name"]):
                active = registry.active_session_for(model["name"])
                if active is None:
                    # FedKit's semantics: resume unless a phone asks for fresh (and the
                    # operator allowed phones to ask)
                    opts = {**state.session_defaults,
                            "resume": state.session_defaults.get("resume", True) and not fresh}
                    try:
                        session = state.sessions.start(model["name"], **opts)
                    except SessionConflict:  # another process started it meanwhile
                        active = registry.active_session_for(model["name"])
                    except (RuntimeError, TimeoutError) as exc:
                        raise HTTPException(503, f"could not start a session for "
                                                 f"{model['name']}: {exc}") from None
                    else:
                        info = registry.get_session(session.id)
                        return ServerOut(status="new", session_id=session.id,
                                         port=info["ports"].get(platform))
        if active is None:
            return ServerOut(status="no_session", session_id=None, port=None)
        if active["model_id"] != model["id"]:
            return ServerOut(status="occupied", session_id=None, port=None)
        if fresh and resumes(active["config"]):
            return ServerOut(status="started_non_fresh", session_id=active["id"], port=None)
        active = _listening(active)
        if active["status"] not in reg.ACTIVE:  # it failed while starting
            return ServerOut(status="no_session", session_id=None, port=None)
        return ServerOut(status="started", session_id=active["id"],
                         port=active["ports"].get(platform))

    def _listening(info: dict[str, Any]) -> dict[str, Any]:
        """``info`` once its process listens (ports known) or ended; a session started by
        a notebook or another phone a moment ago is still ``starting``."""
        deadline = time.monotonic() + START_WAIT
        while info["status"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
            state.sessions.refresh()
            info = registry.get_session(info["id"])
        return info

    return r


def telemetry_router(state: AppState) -> APIRouter:
    r = APIRouter(prefix="/telemetry", tags=["fedkit"])
    registry = state.registry

    def _store(kind: str, body: FitInsTelemetry) -> dict[str, str]:
        """Range checks (422), the device's rate limit (429), then the registry's: the
        session must be running and the device id in it and on its bound platform (409)."""
        if body.end < body.start:
            raise HTTPException(422, f"end ({body.end}) is before start ({body.start})")
        if body.end - body.start > MAX_TELEMETRY_SPAN_MS:
            raise HTTPException(422, f"start..end spans {body.end - body.start} ms, more than "
                                     f"{MAX_TELEMETRY_SPAN_MS} (7 days); send epoch ms")
        wait = state.telemetry_limiter.take(body.device_id)
        if wait:
            raise HTTPException(
                429, f"device {body.device_id} posts telemetry faster than "
                     f"{state.telemetry_limiter.rate:g}/s; retry in {wait:.1f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            registry.add_telemetry(kind, body.model_dump())
        except NotFound:
            raise HTTPException(404, f"no session with id {body.session_id}") from None
        except reg.TelemetryRefused as exc:
            raise HTTPException(409, str(exc)) from None
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
    def get_model(model_id: PathId) -> dict[str, Any]:
        return _model_out(registry.get_model(model_id))

    @r.post("/models", status_code=201)
    def publish(body: PublishIn) -> dict[str, Any]:
        try:
            return _model_out(registry.publish(body.path))
        except FileNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except (ValueError, OSError) as exc:  # not a manifest, unreadable, a bad path
            raise HTTPException(400, f"cannot publish {body.path!r}: {exc}") from None

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
            raise  # NotFound → 404, SessionConflict → 409 (handlers above)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except (RuntimeError, TimeoutError) as exc:  # its process failed to start
            raise HTTPException(503, str(exc)) from None
        return _session_out(registry.get_session(session.id))

    @r.get("/sessions/{session_id}")
    def get_session(session_id: PathId) -> dict[str, Any]:
        state.sessions.refresh()
        return _session_out(registry.get_session(session_id))

    @r.post("/sessions/{session_id}/stop")
    def stop_session(session_id: PathId) -> dict[str, Any]:
        state.sessions.stop(session_id)
        return _session_out(registry.get_session(session_id))

    @r.get("/sessions/{session_id}/metrics")
    def session_metrics(session_id: PathId) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        df = history_frame(registry, session_id)
        return [{"round": int(x.round), "platform": x.platform, "metric": x.metric,
                 "value": None if x.value != x.value else x.value}
                for x in df.itertuples()]

    @r.get("/sessions/{session_id}/rejections")
    def session_rejections(session_id: PathId) -> list[dict[str, Any]]:
        registry.get_session(session_id)
        return registry.get_rejections(session_id)

    @r.get("/devices")
    def list_devices() -> list[dict[str, Any]]:
        return registry.list_devices()

    @r.post("/devices/tokens", status_code=201)
    def issue_device_token(body: DeviceTokenIn) -> dict[str, Any]:
        """A new device token; the token is in this answer only (stored as a digest)."""
        try:
            return state.tokens.issue(body.device)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @r.get("/devices/tokens")
    def list_device_tokens() -> list[dict[str, Any]]:
        return state.tokens.list()

    @r.delete("/devices/tokens/{token_id}")
    def revoke_device_token(token_id: PathId) -> dict[str, Any]:
        if not state.tokens.revoke(token_id):
            raise HTTPException(404, f"no active device token with id {token_id}")
        return {"id": token_id, "revoked": True}

    @r.get("/telemetry")
    def list_telemetry(session_id: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
                       ) -> list[dict[str, Any]]:
        return registry.get_telemetry(session_id)

    return r
