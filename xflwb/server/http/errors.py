"""Exception handlers: registry errors become 404/409, and a 422 never echoes input that
cannot be rendered (NaN, lone surrogates), which would turn it into a 500, nor more of it
than a short excerpt (a refused body may be 100k items wide)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from xflwb.server.http.inputs import _renderable
from xflwb.sessions.registry import NotFound, RegistryError


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (more specific first, as FastAPI looks them up by
    the exception's class hierarchy)."""

    @app.exception_handler(NotFound)
    async def _not_found(_r: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RegistryError)
    async def _conflict(_r: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which may hold NaN or a lone surrogate,
        # and its jsonable_encoder recurses through all of it: _renderable echoes an excerpt
        return JSONResponse({"detail": _renderable(exc.errors())}, status_code=422)
