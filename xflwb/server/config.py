"""What one phone session needs, validated up front and stored as JSON in the registry.

The one declaration of the session options: ``Workbench.train``, ``%xfl_train``, ``xflwb
train`` and the admin API's body are generated from ``SessionConfig`` (``xflwb._options``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.federation.aggregate import DEFAULT_MAX_EXAMPLES, ROBUST_RULE_NAMES
from xflwb.federation.influence import DEFAULT_MAX_NORM_RATIO, DEFAULT_MAX_WEIGHT_RATIO
from xflwb.federation.policies import SYNCHRONOUS
from xflwb.server.http.timeouts import BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT

#: bounds of ``SessionConfig.max_message_bytes`` (gRPC's own ceiling is 2 GiB - 1)
MIN_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1
#: the derived limit is never below this (config and metrics travel in the same messages)
FLOOR_MESSAGE_BYTES = 4 * 1024 * 1024
#: checkpoints a session keeps by default (``keep_checkpoints``): enough to fall back past
#: a few corrupt files, few enough that FedBuff's thousands of versions cannot fill a disk
DEFAULT_KEEP_CHECKPOINTS = 5


#: the strategies a session or simulation can run: every synchronous policy registered in
#: ``xflwb.federation.policies.POLICIES`` (one module each; importing them imports no
#: Flower, so building a parser stays light), and FedBuff's asynchronous rounds
#: (``xflwb.server.fedbuff``, phone sessions only)
#: the strategies without rounds: phones train asynchronously, versions replace rounds
ASYNC_STRATEGIES = ("fedbuff",)
STRATEGIES = (*SYNCHRONOUS, *ASYNC_STRATEGIES)


def is_asynchronous(config: dict[str, Any]) -> bool:
    """Whether a stored session config ran without rounds (its rounds are model versions)."""
    return str(config.get("strategy", "")).lower() in ASYNC_STRATEGIES


@dataclass
class RoundOptions:
    """How rounds run: the options phone sessions and simulations share, declared once."""

    rounds: int = option(10, "federated rounds to run", ge=1, le=1_000_000)
    strategy: str = option("fedavg", "Flower strategy aggregating the canonical updates",
                           choices=STRATEGIES)
    strategy_options: dict[str, Any] = option(
        default_factory=dict, help="keyword arguments of the Flower strategy (e.g. "
        '{"beta": 0.2} for fedtrimmedavg), or xflwb.FedBuff(...) / its dict for fedbuff')
    min_clients: int | None = option(
        None, "clients a round needs before it starts (none: 2, or the whole simulated fleet "
        "if smaller)", ge=1, le=1_000_000)
    fraction_fit: float = option(1.0, "fraction of the connected clients sampled to train "
                                 "each round", gt=0, le=1)
    fraction_evaluate: float | None = option(
        None, "fraction sampled to evaluate each round (none: as fraction_fit)", ge=0, le=1)
    local_epochs: int = option(1, "epochs each client trains per round", ge=1, le=100_000)
    round_timeout: float = option(600.0, "seconds a round waits for its clients", gt=0,
                                  le=30 * 86400)
    max_examples: int | None = option(
        DEFAULT_MAX_EXAMPLES, "one update counts for at most this many examples (larger "
        "num_examples are capped and counted in the round's capped metric); none: no cap",
        ge=1, le=2**63 - 1)
    max_update_norm: float | None = option(
        None, "reject updates farther than this (L2, canonical space, over the tensors the "
        "client's platform trains) from the global model; none: no bound", gt=0)
    #: relative bounds on by default (xflwb.federation.influence, docs/security.md): one phone
    #: must not steer the model by lying about its examples or sending a huge update
    max_weight_ratio: float | None = option(
        DEFAULT_MAX_WEIGHT_RATIO, "one update counts for at most this multiple of the "
        "(lower) median num_examples of its round (FedBuff: of the recent phones); capped "
        "updates are counted in the capped metric; none: off", ge=1, le=1e9)
    max_norm_ratio: float | None = option(
        DEFAULT_MAX_NORM_RATIO, "reject updates farther (L2) from the model they trained "
        "from than this multiple of the (lower) median of recent updates of the same "
        "platform; applies to "
        "fedavg, the server optimisers and fedbuff, not to robust rules, DP (which clips) "
        "or secagg (which hides single updates); none: off", ge=1, le=1e9)
    #: stored as the dict of all ``xflwb.DP`` fields (``xflwb.federation.dp``)
    privacy: dict[str, Any] | None = option(
        None, "differential privacy: xflwb.DP(...) or its dict; none: off")
    #: checkpoint retention (``xflwb.server.checkpoints.prune_checkpoints``)
    keep_checkpoints: int | None = option(
        DEFAULT_KEEP_CHECKPOINTS, "checkpoints a session keeps on disk: the last N written, "
        "plus every keep_every-th round, its start and any a resume needs; none: keep all",
        ge=1, le=1_000_000)
    keep_every: int | None = option(
        None, "also keep the checkpoint of every round (FedBuff: version) divisible by this; "
        "none: no extra ones", ge=1, le=1_000_000)
    #: ``xflwb.server.tracking``: written by the session process as rounds land
    tracking: list[str] | str | None = option(
        None, "also log per-round metrics and the options to 'tensorboard', 'mlflow' or "
        "both (a list, or comma-separated); none: off", repeat=True, metavar="NAME")
    tracking_dir: str | None = option(
        None, "where tracked runs go (none: DATA_DIR/tracking): TensorBoard event files "
        "in tensorboard/, the MLflow store in mlruns/", path=True, metavar="DIR")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (an http:// server, sqlite:///...); none: the local "
        "store in tracking_dir", metavar="URI")

    def _check_rounds(self) -> None:
        """The shared checks (``__post_init__`` of each subclass calls this)."""
        for name in ("keep_checkpoints", "keep_every"):
            if getattr(self, name) == 0 and not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{name}=0 is not allowed: " + (
                        "a session must keep at least its latest checkpoint to resume from; "
                        "pass None to keep every checkpoint, or N >= 1 to keep the last N"
                        if name == "keep_checkpoints" else
                        "pass None for no extra checkpoints, or k >= 1 to keep every k-th "
                        "round's"))
        if isinstance(self.strategy, str):
            self.strategy = self.strategy.lower()
        from xflwb.federation.dp import privacy_dict
        from xflwb.server.fedbuff import FedBuff

        if isinstance(self.strategy_options, FedBuff):
            self.strategy_options = dataclasses.asdict(self.strategy_options)

        if self.privacy is not None and not isinstance(self.privacy, dict):
            self.privacy = privacy_dict(self.privacy)  # a DP → its dict (checked below)
        from xflwb.server.tracking import normalize

        self.tracking = normalize(self.tracking)  # did you mean …; pip install … when missing
        _options.check(self)
        if self.tracking_dir is not None:  # the session process may run elsewhere (cwd)
            self.tracking_dir = os.path.abspath(os.fspath(self.tracking_dir))
        self.privacy = privacy_dict(self.privacy)
        if self.privacy is not None and self.strategy in ROBUST_RULE_NAMES:
            raise ValueError(f"privacy (central DP) cannot be combined with strategy "
                             f"{self.strategy!r}: it noises a mean; use fedavg or a server "
                             "optimiser (fedadam, ...)")
        if self.privacy is not None and self.strategy in ASYNC_STRATEGIES:
            raise ValueError(f"privacy (central DP) cannot be combined with strategy "
                             f"{self.strategy!r}: its ε ledger composes rounds of sampled "
                             "clients, which asynchronous training does not have; use "
                             "fedavg or a server optimiser")
        if self.strategy in ASYNC_STRATEGIES and self.fraction_fit != 1.0:
            raise ValueError(f"fraction_fit={self.fraction_fit:g} does not apply to strategy "
                             f"{self.strategy!r}: every idle phone trains; bound the phones "
                             "training at once with strategy_options max_concurrency")
        if self.fraction_evaluate is None:
            self.fraction_evaluate = self.fraction_fit
        self.strategy_options = check_strategy_options(self.strategy, self.strategy_options)


@_options.declared  # unknown keywords: did you mean
@dataclass
class SessionConfig(RoundOptions):
    """A phone session: everything it needs, stored as JSON in the registry."""

    #: notebooks start fresh unless asked; the phone-driven auto-start of ``xflwb server``
    #: resumes (FedKit's backend did)
    resume: bool = option(False, "start from the model's latest phone-session checkpoint "
                          "(default: the exported weights)")
    #: a resumed session's ε is its model lineage's (``xflwb.server.lineage``)
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


def check_strategy_options(strategy: str, options: Any) -> dict[str, Any]:
    """Flower's own constructor for ``strategy`` checks ``options`` before any process
    starts (FedTrimmedAvg's ``beta`` in [0, 0.5), no option the class does not take); for
    FedBuff, ``xflwb.FedBuff`` does. Returns the options to store (FedBuff's: every field,
    defaults filled in)."""
    from xflwb.federation.policies import build

    if not isinstance(options, dict):
        raise ValueError(f"strategy_options must be a dict, got {type(options).__name__}")
    if strategy in ASYNC_STRATEGIES:
        from xflwb.server.fedbuff import fedbuff_options

        return dataclasses.asdict(fedbuff_options(options))  # ValueError: did you mean …
    try:  # the policy's Flower class checks them as its constructor does
        build(strategy, [np.zeros(1, np.float32)], options)
    except (TypeError, ValueError) as exc:  # one line naming the option (OptionError)
        raise _options.OptionError(f"strategy_options {options!r} do not fit strategy "
                                   f"{strategy!r}: {exc}") from None
    return options


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
            raise ValueError("pass either --dev-tls DIR or --tls-cert/--tls-key, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (the PEM certificate chain "
                             "and its private key)")
