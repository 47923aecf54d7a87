"""What one phone session needs, validated up front and stored as JSON in the registry.

The one declaration of the session options: ``Workbench.train``, ``%xfl_train``, ``xflwb
train`` and the admin API's body are generated from ``SessionConfig`` (``xflwb._options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xflwb.server.aggregate import DEFAULT_MAX_EXAMPLES


@dataclass
class SessionConfig:
    """Everything a session needs; stored as JSON in the registry."""

    rounds: int = 10
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    min_clients: int = 2
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    local_epochs: int = 1
    round_timeout: float = 600.0
    #: start from the model's latest phone-session checkpoint; notebooks start fresh unless
    #: asked, the phone-driven auto-start of ``xflwb server`` resumes (FedKit's backend did)
    resume: bool = False
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)  # fixed ports; empty = free ports
    #: clients trained in parallel and gRPC streams per port (Flower's defaults, 6 threads
    #: on 2 cores and 1000 streams, would serialise a large fleet's fits)
    max_workers: int = 1024
    #: largest gRPC message a session accepts from a phone (and sends); None derives it from
    #: the model (``message_limit``), so an oversized FitRes is refused before it is read
    max_message_bytes: int | None = None
    #: one update counts for at most this many examples (a larger ``num_examples`` is
    #: capped and counted in the round's ``capped`` metric); None: no cap
    max_examples: int | None = DEFAULT_MAX_EXAMPLES
    #: reject updates farther than this (L2, canonical space, over the tensors the client's
    #: platform trains) from the global model; None: no bound
    max_update_norm: float | None = None
    #: the workbench's TLS files ``[cert, key, ca]`` (gRPC over TLS) and device
    #: enrollment (None: open; "token": every Join presents an issued token); set by the
    #: SessionManager from the workbench, not per session
    tls: list[str] | None = None
    device_auth: str | None = None

    def __post_init__(self) -> None:
        from xflwb.server.flower_legacy import SERVER_STRATEGIES

        for name in ("rounds", "min_clients", "local_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("fraction_fit", "fraction_evaluate"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        v = self.max_message_bytes
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                              or not MIN_MESSAGE_BYTES <= v <= MAX_MESSAGE_BYTES):
            raise ValueError(f"max_message_bytes must be None (derived from the model) or an "
                             f"integer in [{MIN_MESSAGE_BYTES}, {MAX_MESSAGE_BYTES}], got {v!r}")
        if not isinstance(self.round_timeout, int | float) or self.round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive seconds, got {self.round_timeout!r}")
        if str(self.strategy).lower() not in SERVER_STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of "
                             f"{sorted(SERVER_STRATEGIES)}")
        self.strategy = str(self.strategy).lower()
        check_robustness_options(self.max_examples, self.max_update_norm)
        check_strategy_options(self.strategy, self.strategy_options)
        from xflwb.server.security import check_device_auth, tls_config

        self.device_auth = check_device_auth(self.device_auth)
        if self.tls is not None:
            self.tls = tls_config(self.tls).as_list()  # type: ignore[union-attr]


def check_robustness_options(max_examples: Any, max_update_norm: Any) -> None:
    """``max_examples``: None or an integer in [1, 2^63 − 1]; ``max_update_norm``: None or a
    positive finite number."""
    v = max_examples
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                          or not 1 <= v <= 2**63 - 1):
        raise ValueError(f"max_examples must be None (no cap) or a positive integer, got {v!r}")
    v = max_update_norm
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                          or not 0 < float(v) < float("inf")):
        raise ValueError(f"max_update_norm must be None (no bound) or a positive finite "
                         f"number, got {v!r}")


def check_strategy_options(strategy: str, options: Any) -> None:
    """Flower's own constructor for ``strategy`` checks ``options`` before any process
    starts (FedTrimmedAvg's ``beta`` in [0, 0.5), no option the class does not take)."""
    from xflwb.server.flower_legacy import SERVER_STRATEGIES, ndarrays_to_parameters

    if not isinstance(options, dict):
        raise ValueError(f"strategy_options must be a dict, got {type(options).__name__}")
    try:
        SERVER_STRATEGIES[strategy](
            initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]), **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"strategy_options {options!r} do not fit strategy {strategy!r}: "
                         f"{exc}") from exc


#: bounds of ``SessionConfig.max_message_bytes`` (gRPC's own ceiling is 2 GiB - 1)
MIN_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1
#: the derived limit is never below this (config and metrics travel in the same messages)
FLOOR_MESSAGE_BYTES = 4 * 1024 * 1024


def message_limit(manifest: dict[str, Any], configured: int | None = None) -> int:
    """The gRPC message limit of a session: ``configured``, else twice the model's float32
    size plus 1 MiB (a FitRes of P parameters is about 4P bytes; ``.npy`` headers, metrics
    and framing are far below the headroom), at least 4 MiB."""
    if configured is not None:
        return int(configured)
    params = sum(int(np.prod(p["shape"], dtype=np.int64)) for p in manifest["parameters"])
    return int(min(MAX_MESSAGE_BYTES, max(FLOOR_MESSAGE_BYTES, 2 * 4 * params + 2**20)))
