"""Optimizer descriptions shared by every artifact.

They are plain value objects rather than Keras optimizers because one description has to be
rendered three ways (a Keras optimizer inside the TFLite ``train`` signature, Core ML's
``SgdParams``/``AdamParams``, and the numpy executor), and the manifest has to carry it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the manifest's optimizer entry is what to_dict writes
    from xflwb.bridge.manifest import Optimizer as OptimizerSpec

from xflwb.errors import InputError


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """"; did you mean 'x'?" for the choice closest to ``word`` (difflib), or "". The
    bridge's own one-liner: it imports nothing else of xflwb (the option sets use
    ``xflwb._options`` for the same)."""
    import difflib

    close = difflib.get_close_matches(str(word).lower(), [str(c) for c in choices], n=1,
                                      cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_number(owner: str, name: str, value: float, low: float, high: float,
                  low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{owner}: {name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise InputError(f"{owner}: {name}={value} is outside {lb}{low}, {high}{hb}")
    return value


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional (heavy-ball, non-Nesterov) momentum."""

    learning_rate: float = 0.01
    momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rate", _check_number(
            "SGD", "learning_rate", self.learning_rate, 0.0, 1.0, low_open=True))
        object.__setattr__(self, "momentum", _check_number(
            "SGD", "momentum", self.momentum, 0.0, 1.0, high_open=True))

    @property
    def type(self) -> str:
        return "sgd"

    def to_dict(self) -> OptimizerSpec:
        return {"type": "sgd", "learning_rate": self.learning_rate, "momentum": self.momentum}


@dataclass(frozen=True)
class Adam:
    """Adam with bias correction (Kingma & Ba), Keras parameter names and defaults."""

    learning_rate: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        for name, low, high, lo_open, hi_open in (
            ("learning_rate", 0.0, 1.0, True, False),
            ("beta_1", 0.0, 1.0, False, True),
            ("beta_2", 0.0, 1.0, False, True),
            ("epsilon", 0.0, 1.0, True, False),
        ):
            object.__setattr__(self, name, _check_number(
                "Adam", name, getattr(self, name), low, high, lo_open, hi_open))

    @property
    def type(self) -> str:
        return "adam"

    def to_dict(self) -> OptimizerSpec:
        return {"type": "adam", "learning_rate": self.learning_rate, "beta_1": self.beta_1,
                "beta_2": self.beta_2, "epsilon": self.epsilon}


Optimizer = SGD | Adam


def resolve_optimizer(optimizer: object, learning_rate: float | None = None) -> Optimizer:
    """Accept an ``xflwb.SGD``/``xflwb.Adam``, a name (``"sgd"``/``"adam"``) or a manifest dict."""
    if optimizer is None:
        optimizer = "sgd"
    if isinstance(optimizer, SGD | Adam):
        if learning_rate is not None:
            return type(optimizer)(**{**asdict(optimizer), "learning_rate": learning_rate})
        return optimizer
    if isinstance(optimizer, str):
        kind = optimizer.lower()
        kw = {} if learning_rate is None else {"learning_rate": learning_rate}
        if kind == "sgd":
            return SGD(**kw)
        if kind == "adam":
            return Adam(**kw)
        raise InputError(f"unknown optimizer {optimizer!r}{did_you_mean(kind, ('sgd', 'adam'))}"
                         " (use 'sgd', 'adam', xflwb.SGD(...) or xflwb.Adam(...))")
    if isinstance(optimizer, dict):
        data = dict(optimizer)
        kind = data.pop("type", None)
        classes: dict[str, type[SGD] | type[Adam]] = {"sgd": SGD, "adam": Adam}
        cls = classes.get(str(kind).lower())
        if cls is None:
            raise InputError(f"unknown optimizer type {kind!r} in {optimizer!r}"
                             f"{did_you_mean(kind, ('sgd', 'adam'))}")
        return cls(**data)
    raise TypeError(
        f"optimizer must be xflwb.SGD(...), xflwb.Adam(...) or 'sgd'/'adam', got "
        f"{type(optimizer).__module__}.{type(optimizer).__name__}; Keras optimizers are not "
        "accepted because the same settings must also drive Core ML")
