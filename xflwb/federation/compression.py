"""``xflwb.Compression``: which codec carries updates up and models down, and what each client
gets after negotiation.

The session chooses (``Compression(up="int8", down="fp16")``); each client declares what it
can do (``xflwb.federation.codecs.capabilities``: FedKit phones and stock Flower clients
declare nothing). A client gets the session's codec in a direction only if it declared that
codec's name, else float32 in its own encoding, so compression never breaks a phone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from xflwb import _options
from xflwb._options import option
from xflwb.errors import InputError
from xflwb.federation.codecs import FLOAT32, Codec, parse

__all__ = ["Compression", "Negotiated", "compression_dict", "negotiate"]

#: a spec string of the "key=codec,…" form: a word (no ":"), then "=" (typos such as
#: "upp=int8" are refused by name by ``Compression``)
_DIRECTIONS = re.compile(r"^\s*\w*\s*=")


@_options.declared  # unknown keywords: did you mean
@dataclass
class Compression:
    """Codecs of the two directions (``"float32"``: none): ``up`` carries each client's
    update ("fp16", "int8", "topk:0.01", "rotate+int8"), ``down`` the global model sent to it
    ("fp16", "int8", "rotate+int8"). Clients that did not declare a codec keep float32
    (docs/compression.md)."""

    up: str = option(FLOAT32, 'codec of client updates: "float32" (none), "fp16", "int8", '
                     '"int8:block=N", "topk:F" (keep a fraction F, with error feedback) or '
                     '"rotate+int8"')
    down: str = option(FLOAT32, 'codec of the model sent to clients: "float32" (none), '
                       '"fp16", "int8", "int8:block=N" or "rotate+int8" (a model is sent '
                       'whole: no topk)')

    def __post_init__(self) -> None:
        _options.check(self)
        try:  # one line naming the spec, raised from the caller's line (declared)
            up, down = parse(self.up, "up"), parse(self.down, "down")
        except InputError as exc:
            raise _options.OptionError(str(exc)) from None
        self.up = up.spec if up is not None else FLOAT32
        self.down = down.spec if down is not None else FLOAT32

    @property
    def enabled(self) -> bool:
        return (self.up, self.down) != (FLOAT32, FLOAT32)


def compression_dict(value: Any) -> dict[str, str] | None:
    """``RoundOptions.compression`` normalised: a ``Compression``, its dict or a spec string
    (``"int8"``: up only; ``"up=int8,down=fp16"``) → ``{"up": spec, "down": spec}`` with
    canonical specs, ``None`` when nothing is compressed; ``OptionError`` naming it."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        # "up=…,down=…" (a direction before the first "="), else one codec spec for the
        # up-link, whose own argument may hold "=" ("int8:block=64")
        if _DIRECTIONS.match(text):
            parts = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(p) != 2 for p in parts):
                raise _options.OptionError(
                    f"compression {text!r}: write 'up=int8,down=fp16'")
            value = {}
            for key, spec in parts:
                if key.strip() in value:
                    raise _options.OptionError(
                        f"compression {text!r} gives {key.strip()!r} twice")
                value[key.strip()] = spec.strip()
        else:
            value = {"up": text}
    if isinstance(value, dict):
        try:
            value = Compression(**value)
        except (TypeError, ValueError) as exc:
            raise _options.OptionError(f"compression: {exc}") from None
    if not isinstance(value, Compression):
        raise _options.OptionError(
            f"compression must be xflwb.Compression(up=..., down=...), its dict, a spec "
            f"string such as 'up=int8,down=fp16', or None; got {value!r}")
    return dataclasses.asdict(value) if value.enabled else None


@dataclass(frozen=True)
class Negotiated:
    """What one client gets: ``up`` / ``down`` codecs, ``None`` for float32."""

    up: Codec | None = None
    down: Codec | None = None


FLOAT32_ONLY = Negotiated()


def negotiate(compression: dict[str, str] | None, capabilities: Iterable[str]) -> Negotiated:
    """The session's codecs restricted to what the client declared (names, e.g. {"int8"})."""
    if not compression:
        return FLOAT32_ONLY
    can = frozenset(capabilities)
    up, down = parse(compression.get("up", FLOAT32), "up"), parse(
        compression.get("down", FLOAT32), "down")
    return Negotiated(up=up if up is not None and up.name in can else None,
                      down=down if down is not None and down.name in can else None)
