"""Update parameters of an updatable spec: defaults, overrides and their allowed values.

Like ``MLModelConfiguration.parameters``: a value outside the model's allowed range or set
raises, as Core ML throws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

OVERRIDE_KEYS = ("learning_rate", "momentum", "beta1", "beta2", "eps", "mini_batch_size",
                 "epochs", "shuffle", "seed")


def runs(values: Sequence[int]) -> str:
    """An allowed set written compactly as runs, e.g. ``1..100, 150``."""
    vals = sorted(set(int(v) for v in values))
    parts: list[str] = []
    start = prev = vals[0] if vals else 0
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts) if vals else ""


def optimizer_fields(nn: Any) -> tuple[str, Any, dict[str, str]]:
    """(sgd|adam, optimizer message, {override key: proto field})."""
    opt = nn.updateParams.optimizer
    kind = opt.WhichOneof("OptimizerType")
    if kind == "sgdOptimizer":
        return "sgd", opt.sgdOptimizer, {"learning_rate": "learningRate",
                                         "mini_batch_size": "miniBatchSize",
                                         "momentum": "momentum"}
    if kind == "adamOptimizer":
        return "adam", opt.adamOptimizer, {"learning_rate": "learningRate",
                                           "mini_batch_size": "miniBatchSize",
                                           "beta1": "beta1", "beta2": "beta2", "eps": "eps"}
    raise ValueError(f"unsupported optimizer '{kind}' (supported: SGD, Adam)")


def fields(nn: Any) -> tuple[str, dict[str, Any]]:
    """Optimiser name and {override key: proto parameter message (or None if absent)}."""
    name, opt, keys = optimizer_fields(nn)
    up = nn.updateParams
    out: dict[str, Any] = {k: (getattr(opt, f) if opt.HasField(f) else None)
                           for k, f in keys.items()}
    for key in ("epochs", "shuffle", "seed"):
        out[key] = getattr(up, key) if up.HasField(key) else None
    return name, out


def defaults(name: str, flds: dict[str, Any]) -> dict[str, Any]:
    """The model's default update parameters."""
    hp: dict[str, Any] = {"optimizer": name}
    for key, msg in flds.items():
        if msg is not None:
            hp[key] = msg.defaultValue
    if name == "sgd":
        hp.setdefault("momentum", 0.0)
    if "epochs" not in hp:
        raise ValueError("the spec's update parameters have no epochs (Core ML requires them)")
    hp.setdefault("shuffle", False)
    hp.setdefault("seed", None)
    return hp


def check_allowed(key: str, value: Any, msg: Any) -> Any:
    """``value`` converted, and checked against the message's allowed range or set."""
    if key == "shuffle":
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"shuffle must be a bool, got {value!r}")
        return bool(value)
    if key in ("mini_batch_size", "epochs", "seed"):
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        value = int(value)
        if key != "seed" and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")
    if msg is None:
        return value
    which = msg.WhichOneof("AllowedValues")
    if which == "range" and not msg.range.minValue <= value <= msg.range.maxValue:
        raise ValueError(f"{key}={value} is outside the model's allowed range "
                         f"[{msg.range.minValue}, {msg.range.maxValue}] (Core ML throws)")
    if which == "set" and value not in set(msg.set.values):
        raise ValueError(f"{key}={value} is not in the model's allowed set "
                         f"{{{runs(msg.set.values)}}} (Core ML throws)")
    return value


def resolve(base: dict[str, Any], name: str, flds: dict[str, Any],
            overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``overrides`` applied and validated."""
    hp = dict(base)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in OVERRIDE_KEYS:
            raise ValueError(f"unknown update parameter {key!r}; use one of "
                             f"{', '.join(OVERRIDE_KEYS)}")
        if key not in flds or (flds[key] is None and key not in ("shuffle", "seed")):
            raise ValueError(f"update parameter {key!r} does not exist in this model's "
                             f"{name} optimizer")
        hp[key] = check_allowed(key, value, flds[key])
    return hp
