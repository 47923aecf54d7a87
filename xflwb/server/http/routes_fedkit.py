"""FedKit's phone routes, kept together as the compatibility surface: ``train/advertised``,
``train/manifest``, ``train/server`` and the ``telemetry`` posts. Bodies are snake_case,
exactly as FEDKIT_PROTOCOL.md."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from xflwb.server.http.auth import check_session_scope
from xflwb.server.http.inputs import Id, PathId, _In
from xflwb.server.http.routes_static import file_path
from xflwb.server.http.state import (
    NEW_DEVICES_BURST,
    NEW_DEVICES_PER_HOUR,
    AppState,
    client_key,
)
from xflwb.sessions import registry as reg
from xflwb.sessions.handle import resumes
from xflwb.sessions.registry import NotFound, SessionConflict

log = logging.getLogger(__name__)

#: telemetry values a phone can honestly report (accuracy is checked in [0, 1])
MAX_TELEMETRY_LOSS = 1e12
MAX_TEST_SIZE = 10**9
MAX_TELEMETRY_SPAN_MS = 7 * 24 * 3600 * 1000
#: how long a phone asking ``train/server`` waits for a session that is still starting
START_WAIT = 120.0


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


class TelemetryAck(BaseModel):
    status: Literal["ok"] = Field(description="the post was recorded")


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

    @r.post("/train/server", response_model=ServerOut)
    def server(body: ServerIn, request: Request) -> ServerOut:
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
        # a session-scoped device token joins its session only (and never starts one)
        check_session_scope(request, active["id"] if active else None)
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
                        session = state.sessions.start_phone(model["name"], **opts)
                    except SessionConflict:  # another process started it meanwhile
                        active = registry.active_session_for(model["name"])
                    except NotFound:  # removed meanwhile (a RegistryError, not a failure)
                        raise HTTPException(404, f"no model named {model['name']!r}") from None
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

    def _store(kind: str, body: FitInsTelemetry, request: Request) -> TelemetryAck:
        """Range checks (422), the poster's rate limit (429), then the registry's: the
        session must be running and the device id in it and on its bound platform (409).

        Who posts: with device tokens, the token (its device is the first device_id it
        posted; another is 403); without, the client address, which may also create only
        so many device rows (429). The body's device_id never keys a limit: it is the
        client's own claim."""
        if body.end < body.start:
            raise HTTPException(422, f"end ({body.end}) is before start ({body.start})")
        if body.end - body.start > MAX_TELEMETRY_SPAN_MS:
            raise HTTPException(422, f"start..end spans {body.end - body.start} ms, more than "
                                     f"{MAX_TELEMETRY_SPAN_MS} (7 days); send epoch ms")
        token = getattr(request.state, "device_token", None)
        check_session_scope(request, body.session_id)  # a scoped token posts for its own
        address = client_key(request.client.host if request.client else None)
        if token is not None:
            limiter, who = state.telemetry_limiter, f"device token {token['id']}"
            wait = limiter.take(("token", token["id"]))
        else:
            limiter, who = state.address_limiter, f"address {address}"
            wait = limiter.take(("address", address))
        if wait:
            raise HTTPException(
                429, f"{who} posts telemetry faster than {limiter.rate:g}/s; retry in "
                     f"{wait:.1f} s", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if token is None and not registry.device_known(body.device_id):
            wait = state.new_device_limiter.take(("address", address))
            if wait:
                raise HTTPException(
                    429, f"address {address} has introduced more new device ids than "
                         f"{NEW_DEVICES_PER_HOUR} an hour (after a burst of "
                         f"{NEW_DEVICES_BURST}); retry in {wait:.0f} s, reuse a device_id "
                         "or enroll phones with device tokens",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            registry.add_telemetry(kind, body.model_dump(),
                                   token_id=token["id"] if token is not None else None)
        except NotFound:
            raise HTTPException(404, f"no session with id {body.session_id}") from None
        except reg.DeviceNotYours as exc:
            raise HTTPException(403, str(exc)) from None
        except reg.TelemetryRefused as exc:
            raise HTTPException(409, str(exc)) from None
        return TelemetryAck(status="ok")

    @r.post("/telemetry/fit_ins", response_model=TelemetryAck)
    def fit_ins(body: FitInsTelemetry, request: Request) -> TelemetryAck:
        return _store("fit", body, request)

    @r.post("/telemetry/evaluate_ins", response_model=TelemetryAck)
    def evaluate_ins(body: EvaluateInsTelemetry, request: Request) -> TelemetryAck:
        return _store("evaluate", body, request)

    return r
