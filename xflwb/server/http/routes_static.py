"""``GET /static/{filename}``: the published model files phones download (FedKit's path)."""

from __future__ import annotations

import logging
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from fastapi.responses import FileResponse

from xflwb.server.http.state import AppState

log = logging.getLogger(__name__)


def file_path(name: str, file: str) -> str:
    """FedKit's relative download path; the file name carries the version (clients cache)."""
    return f"static/{name}--{file}"


def static_router(state: AppState) -> APIRouter:
    r = APIRouter(tags=["static"])
    registry = state.registry

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

    return r
