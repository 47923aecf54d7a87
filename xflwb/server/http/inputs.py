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
    UTF-8 (lone surrogates from ``\\ud800`` escapes) and NaN/Infinity (JSON has neither).

    Walks the value with an explicit stack, never by recursion: a body is untrusted, and
    its depth must not decide whether this raises ``RecursionError`` (a 500)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: a string that cannot be encoded as UTF-8 (a lone "
                                 "surrogate escape such as \\ud800); send valid Unicode"
                                 ) from None
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{where}: {value!r} is not a finite number; send a finite "
                                 "one")
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):  # reversed: report the first bad one
                stack.append((v, f"{where}.{k}" if isinstance(k, str) and k.isprintable()
                              else where))
                stack.append((k, f"{where} key"))
        elif isinstance(value, list | tuple):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))


class _In(BaseModel):
    """Every request body: strings must be valid Unicode and numbers finite, so nothing
    accepted can fail to be stored or rendered later (a 5xx from bad input)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        _check_value(data)
        return data


#: how much of a refused input a 422 echoes back: deeper levels, longer strings and
#: further items are cut (a refused body may be wide or deep; the answer stays short)
ECHO_DEPTH = 6
ECHO_ITEMS = 10
ECHO_CHARS = 200


def _renderable(value: Any, depth: int = 0) -> Any:
    """``value`` made JSON-safe and short for an error response: non-finite floats,
    strings that cannot be encoded and other objects are echoed as text (the default 422
    cannot render them: a 500), and the echo is cut at ``ECHO_DEPTH`` levels,
    ``ECHO_ITEMS`` items and ``ECHO_CHARS`` characters, so its recursion is bounded
    whatever the input's depth and the answer stays small whatever its width."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        value = value[:ECHO_CHARS * 4].decode("utf-8", "backslashreplace")
    if not isinstance(value, str | dict | list | tuple):
        value = str(value)
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"
    if depth >= ECHO_DEPTH:
        return "…"
    if isinstance(value, dict):
        out = {str(_renderable(k, depth + 1)): _renderable(v, depth + 1)
               for k, v in list(value.items())[:ECHO_ITEMS]}
        if len(value) > ECHO_ITEMS:
            out["…"] = f"{len(value) - ECHO_ITEMS} more keys"
        return out
    items = [_renderable(v, depth + 1) for v in value[:ECHO_ITEMS]]
    if len(value) > ECHO_ITEMS:
        items.append(f"… {len(value) - ECHO_ITEMS} more items")
    return items
