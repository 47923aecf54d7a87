"""The admin session-start body (``POST /api/v1/sessions``), generated from
``xflwb.server.config.SessionConfig``: the one declaration of the session options that
``wb.train``, ``%xfl_train`` and ``xflwb train`` take too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, model_validator

from xflwb import _options
from xflwb.server.config import SessionConfig
from xflwb.server.http.inputs import _In


class _SessionBody(_In):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "start_fresh" in data:
            raise ValueError("start_fresh was replaced by resume (sessions start fresh unless "
                             "resume is true, as wb.train and %xfl_train do)")
        return data


if TYPE_CHECKING:  # the model is generated at run time; its static face is the base
    class SessionIn(_SessionBody):
        model: str
else:
    SessionIn = _options.request_model(
        SessionConfig, "SessionIn", _SessionBody,
        extra={"model": (str, Field(max_length=64, description="a published model name"))})
