"""The HTTP API: FedKit's device routes (kept together as the compatibility surface) and the
admin API under ``/api/v1`` (bearer token). Request and response bodies are typed models, so
``/openapi.json`` documents exactly what phones and tools may send and get back.

``create_app`` assembles one router per resource from ``xflwb.server.http``; the names
others import from here (``AppState``, ``create_app``, ``file_path``, the bodies) are
re-exported.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from xflwb.server.http.auth import admin_guard, device_guard
from xflwb.server.http.errors import install_error_handlers
from xflwb.server.http.inputs import MAX_INT, Id, PathId, _In
from xflwb.server.http.json_depth import MAX_JSON_DEPTH, JsonDepthLimit
from xflwb.server.http.limits import BODY_FLOOR, BodyLimit
from xflwb.server.http.routes_devices import DeviceOut, TelemetryOut, devices_router
from xflwb.server.http.routes_fedkit import (
    MAX_TELEMETRY_LOSS,
    MAX_TELEMETRY_SPAN_MS,
    MAX_TEST_SIZE,
    START_WAIT,
    AdvertisedIn,
    CoreMLLayer,
    EvaluateInsTelemetry,
    FitInsTelemetry,
    MLModelOut,
    ServerIn,
    ServerOut,
    TelemetryAck,
    fedkit_router,
)
from xflwb.server.http.routes_models import ArtifactOut, ModelOut, PublishIn, models_router
from xflwb.server.http.routes_sessions import (
    MetricOut,
    RejectionOut,
    SessionOut,
    sessions_router,
)
from xflwb.server.http.routes_static import file_path, static_router
from xflwb.server.http.routes_tokens import (
    DeviceTokenIn,
    IssuedTokenOut,
    RevokedOut,
    TokenOut,
    tokens_router,
)
from xflwb.server.http.session_in import SessionIn
from xflwb.server.http.state import TELEMETRY_BURST, TELEMETRY_RATE, AppState, RateLimiter
from xflwb.server.security import TokenStore

__all__ = [
    "BODY_FLOOR", "MAX_INT", "MAX_JSON_DEPTH", "MAX_TELEMETRY_LOSS", "MAX_TELEMETRY_SPAN_MS",
    "MAX_TEST_SIZE", "START_WAIT", "TELEMETRY_BURST", "TELEMETRY_RATE",
    "AdvertisedIn", "AppState", "ArtifactOut", "BodyLimit", "CoreMLLayer", "DeviceOut",
    "DeviceTokenIn", "EvaluateInsTelemetry", "FitInsTelemetry", "Id", "IssuedTokenOut",
    "MLModelOut", "MetricOut", "ModelOut", "PathId", "PublishIn", "RateLimiter",
    "RejectionOut", "RevokedOut", "ServerIn", "ServerOut", "SessionIn", "SessionOut",
    "TelemetryAck", "TelemetryOut", "TokenOut", "_In", "create_app", "device_guard",
    "file_path",
]

#: the admin API's path prefix
ADMIN_PREFIX = "/api/v1"


def create_app(state: AppState) -> FastAPI:
    """The app over ``state``: phone routes (guarded by ``device_guard``, a no-op unless
    ``device_auth == "token"``) and admin routes under ``/api/v1`` (admin bearer token)."""
    app = FastAPI(title="xflwb backend", version="1",
                  description="FedKit-compatible device API and the xflwb admin API.")
    app.state.xfl = state
    install_error_handlers(app)
    # the last added runs first: the size limit, then the nesting bound on what it let in
    app.add_middleware(JsonDepthLimit, limit=MAX_JSON_DEPTH)
    app.add_middleware(BodyLimit, limit=state.body_limit,
                       floor=min(BODY_FLOOR, state.max_body_bytes or BODY_FLOOR))

    if state.tokens is None:
        state.tokens = TokenStore(state.registry)
    phone = [Depends(device_guard(state))]
    for router in (fedkit_router(state), static_router(state)):
        app.include_router(router, dependencies=phone)
    admin = [Depends(admin_guard(state))]
    for router in (models_router(state), sessions_router(state), devices_router(state),
                   tokens_router(state)):
        app.include_router(router, prefix=ADMIN_PREFIX, dependencies=admin)
    return app
