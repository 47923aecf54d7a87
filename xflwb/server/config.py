"""What one phone session needs, validated up front and stored as JSON in the registry.

The one declaration of the session options: ``Workbench.train``, ``%xfl_train``, ``xflwb
train`` and the admin API's body are generated from ``SessionConfig`` (``xflwb._options``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.errors import InputError
from xflwb.server.http.timeouts import BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT
from xflwb.sessions.options import RoundOptions

#: bounds of ``SessionConfig.max_message_bytes`` (gRPC's own ceiling is 2 GiB - 1)
MIN_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1
#: the derived limit is never below this (config and metrics travel in the same messages)
FLOOR_MESSAGE_BYTES = 4 * 1024 * 1024


@_options.declared  # unknown keywords: did you mean
@dataclass
class SessionConfig(RoundOptions):
    """A phone session: everything it needs, stored as JSON in the registry."""

    #: notebooks start fresh unless asked; the phone-driven auto-start of ``xflwb server``
    #: resumes (FedKit's backend did)
    resume: bool = option(False, "start from the model's latest phone-session checkpoint "
                          "(default: the exported weights)")
    #: a resumed session's ε is its model lineage's (``xflwb.sessions.lineage``)
    allow_privacy_gap: bool = option(
        False, "resume a model lineage across a change of differential privacy (a DP "
        "lineage without DP, or DP after rounds without it) instead of refusing; the "
        "history records privacy_gap")
    max_message_bytes: int | None = option(
        None, "largest gRPC message (FitRes) a session accepts; none: from the model's size",
        ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES)
    host: str = option("127.0.0.1", "address the gRPC ports bind", front=False)
    #: fixed ports; empty = free ports
    ports: dict[str, int] = option(default_factory=dict, help="fixed gRPC port per platform",
                                   front=False)
    #: clients trained in parallel and gRPC streams per port (Flower's defaults, 6 threads
    #: on 2 cores and 1000 streams, would serialise a large fleet's fits)
    max_workers: int = option(1024, "server threads", ge=1, front=False)
    #: the workbench's TLS files ``[cert, key, ca]`` (gRPC over TLS) and device
    #: enrollment (None: open; "token": every Join presents an issued token); set by the
    #: SessionManager from the workbench, not per session
    tls: list[str] | None = option(None, "TLS files", front=False)
    device_auth: str | None = option(None, "device enrollment", front=False)

    def __post_init__(self) -> None:
        if self.min_clients is None:
            self.min_clients = 2
        self._check_rounds()
        from xflwb.server.security import check_device_auth, tls_config

        self.device_auth = check_device_auth(self.device_auth)
        if self.tls is not None:
            self.tls = tls_config(self.tls).as_list()  # type: ignore[union-attr]


def message_limit(manifest: dict[str, Any], configured: int | None = None) -> int:
    """The gRPC message limit of a session: ``configured``, else twice the model's float32
    size plus 1 MiB (a FitRes of P parameters is about 4P bytes; ``.npy`` headers, metrics
    and framing are far below the headroom), at least 4 MiB."""
    if configured is not None:
        return int(configured)
    params = sum(int(np.prod(p["shape"], dtype=np.int64)) for p in manifest["parameters"])
    return int(min(MAX_MESSAGE_BYTES, max(FLOOR_MESSAGE_BYTES, 2 * 4 * params + 2**20)))


@_options.declared  # unknown keywords: did you mean
@dataclass
class BackendOptions:
    """The backend (HTTP API + session manager): ``xflwb.Workbench``, ``xflwb server`` and
    ``%xfl_server start`` take these."""

    data_dir: str = option("xfl-data", "registry, artifacts, checkpoints and logs live here",
                           path=True, metavar="DIR")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; then "
                       "use TLS and device tokens)")
    port: int = option(8000, "HTTP port phones dial (0: a free port)", ge=0, le=65535)
    db_url: str | None = option(None, "SQLAlchemy URL of the registry (default: SQLite in "
                                "data_dir)", metavar="URL")
    admin_token: str | None = option(None, "bearer token of the admin API (default: "
                                     "$XFLWB_ADMIN_TOKEN or a random one)", repr=False,
                                     metavar="TOKEN")
    auto_start: bool = option(False, "start a session when a phone asks for a server "
                              "(FedKit's flow; it resumes from the latest checkpoint)")
    allow_phone_start_fresh: bool = option(
        False, "honour a phone's start_fresh (default: ignored and logged, so a phone cannot "
        "throw away checkpointed progress)")
    max_body_bytes: int | None = option(
        None, "largest HTTP request body, 413 above (default: twice the largest published "
        "model plus 1 MiB)", ge=1024, metavar="N")
    device_auth: str | None = option(None, "token: phones present a token issued with "
                                     "issue_device_token / xflwb token issue (default: open, "
                                     "as FedKit's backend)", choices=("token",))
    #: slow and idle HTTP clients (``xflwb.server.http.timeouts``); gRPC is unaffected
    http_header_timeout: float = option(
        HEADER_TIMEOUT, "seconds a client has to send a request's head (from connecting or the "
        "previous response); slower connections are closed", gt=0, le=3600, metavar="S")
    http_body_timeout: float = option(
        BODY_TIMEOUT, "seconds a client has to send a request's body after its head", gt=0, le=3600,
        metavar="S")
    http_idle_timeout: float = option(
        IDLE_TIMEOUT, "seconds an idle keep-alive connection stays open after a response", gt=0,
        le=3600, metavar="S")

    def __post_init__(self) -> None:
        _options.check(self)


@_options.declared  # unknown keywords: did you mean
@dataclass
class TLSOptions:
    """TLS for the backend as the command line and ``%xfl_server start`` spell it; the
    Python API takes ``Workbench(tls=(cert, key[, ca]) | make_dev_ca(dir))``."""

    tls_cert: str | None = option(None, "serve HTTPS and gRPC over TLS with this certificate "
                                  "(chain)", path=True, metavar="PEM")
    tls_key: str | None = option(None, "the certificate's private key", path=True,
                                 metavar="PEM")
    tls_ca: str | None = option(None, "the CA that signed it (default: the certificate "
                                "itself)", path=True, metavar="PEM")
    dev_tls: str | None = option(None, "make (or reuse) a development CA and certificate in "
                                 "DIR and serve TLS with them (phones trust DIR/ca.pem)",
                                 path=True, metavar="DIR")
    tls_host: list[str] | None = option(None, "with dev_tls: another name or address phones "
                                        "dial", repeat=True, metavar="HOST")

    def __post_init__(self) -> None:
        _options.check(self)
        if self.dev_tls and (self.tls_cert or self.tls_key):
            raise InputError("pass either --dev-tls DIR or --tls-cert/--tls-key, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InputError("--tls-cert and --tls-key go together (the PEM certificate chain "
                             "and its private key)")
