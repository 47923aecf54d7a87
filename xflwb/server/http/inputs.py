"""What every request body and id must satisfy, so bad input earns a 4xx and never a 5xx:
integers that fit a signed 64-bit column, finite numbers and strings encodable as UTF-8."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: SQLite (and PostgreSQL's BIGINT) stores signed 64-bit integers: anything larger is bad input
MAX_INT = 2**63 - 1
#: a database id or epoch-milliseconds field: 422 outside [0, 2^63 - 1], never an overflow
Id = Annotated[int, Field(ge=0, le=MAX_INT)]
PathId = Annotated[int, Path(ge=0, le=MAX_INT)]


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
