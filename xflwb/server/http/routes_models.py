"""Admin: published models (``/api/v1/models``): list, one, publish an export."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from xflwb.server.http.inputs import PathId, _In
from xflwb.server.http.routes_static import file_path
from xflwb.server.http.state import AppState


class PublishIn(_In):
    path: str = Field(max_length=4096,
                      description="export directory or manifest.json on the server's disk")


class ArtifactOut(BaseModel):
    id: int = Field(description="the platform model id phones use (train/server)")
    file: str
    sha256: str
    bytes: int
    path: str = Field(description="FedKit's download path, static/<name>--<file>")


class ModelOut(BaseModel):
    id: int
    name: str
    version: int
    data_type: str
    created: float = Field(description="publish time, epoch seconds")
    artifacts: dict[str, ArtifactOut] = Field(description="by platform: android, ios")
    manifest: dict[str, Any] = Field(description="the export's manifest.json")


def models_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["models"])
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

    @r.get("/models", response_model=list[ModelOut])
    def list_models() -> list[dict[str, Any]]:
        return [_model_out(m) for m in registry.list_models()]

    @r.get("/models/{model_id}", response_model=ModelOut)
    def get_model(model_id: PathId) -> dict[str, Any]:
        return _model_out(registry.get_model(model_id))

    @r.post("/models", status_code=201, response_model=ModelOut)
    def publish(body: PublishIn) -> dict[str, Any]:
        try:
            return _model_out(registry.publish(body.path))
        except FileNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except (ValueError, OSError) as exc:  # not a manifest, unreadable, a bad path
            raise HTTPException(400, f"cannot publish {body.path!r}: {exc}") from None

    return r
