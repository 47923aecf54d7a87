"""``xflwb.Workbench``: the bundled backend, run in the background of a notebook kernel.

The HTTP API runs in a uvicorn server on a daemon thread (the kernel stays responsive);
each training session runs in its own process. ``stop()`` ends both and leaves nothing
behind.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from xflwb.server.registry import Registry
from xflwb.server.session import DONE as DONE  # public: statuses a session ends in
from xflwb.server.session import Session, SessionManager, started_from


def reachable_host(host: str) -> str:
    """A wildcard bind address is not something a phone can dial: use this machine's
    outward-facing address instead (no packet is sent by connecting a UDP socket)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _refuse_start_fresh(options: dict[str, Any], where: str) -> None:
    """``start_fresh`` was the notebook's option until sessions started fresh by default."""
    if "start_fresh" in options:
        raise TypeError(f"{where}: start_fresh was replaced by resume: notebook sessions start "
                        "fresh unless resume=True (phones' auto-started sessions still resume "
                        "unless the phone sends start_fresh)")


class Workbench:
    """Registry + FedKit-compatible HTTP API + Flower sessions, in one object."""

    def __init__(self, data_dir: str | os.PathLike[str] = "xfl-data", host: str = "127.0.0.1",
                 port: int = 8000, db_url: str | None = None, admin_token: str | None = None,
                 auto_start: bool = False,
                 session_defaults: dict[str, Any] | None = None,
                 max_body_bytes: int | None = None,
                 allow_phone_start_fresh: bool = False, tls: Any = None,
                 device_auth: str | None = None) -> None:
        """``max_body_bytes``: largest HTTP request body (413 above it); None derives it from
        the largest published model (twice its size plus 1 MiB, at least 1 MiB).

        ``tls``: ``(cert, key)``, ``(cert, key, ca)`` or
        ``xflwb.server.security.make_dev_ca(dir)``: HTTPS and gRPC over TLS.
        ``device_auth="token"``: phones present a token issued with
        ``wb.issue_device_token`` (HTTP header, gRPC metadata); None (default) stays open, as
        FedKit's backend was."""
        from xflwb.server.security import check_device_auth, tls_config

        self.tls = tls_config(tls)
        self.device_auth = check_device_auth(device_auth)
        if max_body_bytes is not None and (isinstance(max_body_bytes, bool)
                                           or not isinstance(max_body_bytes, int)
                                           or max_body_bytes < 1024):
            raise ValueError(f"max_body_bytes must be None or an integer >= 1024, got "
                             f"{max_body_bytes!r}")
        self.max_body_bytes = max_body_bytes
        #: phones' ``start_fresh`` is ignored (logged) unless the operator allows it here
        self.allow_phone_start_fresh = bool(allow_phone_start_fresh)
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = int(port)
        self.db_url = db_url
        self.admin_token = (admin_token or os.environ.get("XFLWB_ADMIN_TOKEN")
                            or secrets.token_urlsafe(24))
        self.auto_start = auto_start
        self.session_defaults = dict(session_defaults or {})
        _refuse_start_fresh(self.session_defaults, "session_defaults")
        self.registry: Registry | None = None
        self.sessions: SessionManager | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._fleets: list[Any] = []
        self._fleet_count = 0

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        """The base URL phones use."""
        if not self.running:
            raise RuntimeError("the workbench is not running: call wb.start()")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{reachable_host(self.host)}:{self.port}"

    def start(self, timeout: float = 30.0) -> Workbench:
        import uvicorn

        from xflwb.server.app import AppState, create_app

        if self.running:
            return self
        self.registry = Registry(self.data_dir, self.db_url)
        self.sessions = SessionManager(self.registry, host=self.host, security={
            "tls": self.tls.as_list() if self.tls else None, "device_auth": self.device_auth})
        self.sessions.refresh()  # sessions of a previous kernel are not running any more
        app = create_app(AppState(self.registry, self.sessions, self.admin_token,
                                  self.auto_start, self.session_defaults,
                                  max_body_bytes=self.max_body_bytes,
                                  allow_phone_start_fresh=self.allow_phone_start_fresh,
                                  device_auth=self.device_auth))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                          "pass port=0 to pick a free port") from exc
        self.port = sock.getsockname()[1]
        self._sock = sock
        # log_config=None: never reconfigure the kernel's logging (dictConfig would close
        # other libraries' handlers, e.g. absl's, and with them sys.stderr)
        tls = ({"ssl_certfile": str(self.tls.cert), "ssl_keyfile": str(self.tls.key)}
               if self.tls is not None else {})
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off",
                                **tls)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="xflwb-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop every session process and the HTTP server."""
        for fleet in self._fleets:
            fleet.stop()
        if self.sessions is not None:
            self.sessions.stop_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        if self.registry is not None:
            self.registry.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> Workbench:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"Workbench({where}, data_dir='{self.data_dir}')"

    # -- models and sessions -----------------------------------------------------------------
    def _reg(self) -> Registry:
        if self.registry is None:
            self.start()
        assert self.registry is not None
        return self.registry

    def publish(self, res: Any) -> dict[str, Any]:
        """Register an export (``ExportResult`` or export directory); versions are immutable."""
        return self._reg().publish(res)

    @property
    def models(self) -> pd.DataFrame:
        rows = [{"id": m["id"], "name": m["name"], "version": m["version"],
                 "data_type": m["data_type"],
                 "platforms": ",".join(m["manifest"]["platforms"])}
                for m in self._reg().list_models()]
        return pd.DataFrame(rows, columns=["id", "name", "version", "data_type", "platforms"])

    def train(self, name: str, rounds: int = 10, strategy: str = "fedavg",
              min_clients: int = 2, fraction_fit: float = 1.0, local_epochs: int = 1,
              round_timeout: float = 600.0, resume: bool = False, **options: Any) -> Session:
        """Start a Flower session serving the latest version of model ``name``.

        It starts from the exported weights unless ``resume=True`` (then from the model's
        latest phone-session checkpoint); ``session.started_from`` says which. Before any
        process starts, the model is checked against the data of this workbench's running
        fleets that will train it (shape, dtype, classes)."""
        from xflwb.devices.datasets import check_compatible

        _refuse_start_fresh(options, "wb.train")
        reg = self._reg()
        assert self.sessions is not None
        model = reg.latest_model(name)
        for fleet in self._fleets:
            if fleet.data_type == model["data_type"] and fleet.alive():
                check_compatible(model["manifest"], fleet.dataset)
        return self.sessions.start(name, rounds=rounds, strategy=strategy,
                                   min_clients=min_clients, fraction_fit=fraction_fit,
                                   local_epochs=local_epochs, round_timeout=round_timeout,
                                   resume=resume, **options)

    def simulate(self, name_or_export: Any, android: int = 0, ios: int = 0,
                 wait: bool = False, timeout: float | None = None, **options: Any) -> Session:
        """``xflwb.simulate`` recorded in this workbench's registry (so ``session_table``,
        dashboards and the admin API see it); does not block unless ``wait=True``."""
        from xflwb import simulation

        def manager() -> Any:
            self._reg()
            return self.sessions

        return simulation.start(manager, name_or_export, wait=wait, timeout=timeout,
                                android=android, ios=ios, **options)

    def session(self, session_id: int) -> Session:
        self._reg()
        assert self.sessions is not None
        return self.sessions.get(session_id)

    def spawn_devices(self, android: int = 0, ios: int = 0, dataset: str = "digits",
                      partition: str = "iid", seed: int = 0, data_type: str | None = None,
                      **knobs: Any) -> Any:
        """Start virtual phones (a process each) against this backend; returns the Fleet.

        ``knobs``: slowdown, join_delay, drop_prob, network_delay (a value or one per
        device), encoding ("raw" | "npy"), max_wait.

        Names are checked here, and the dataset against the model the devices will be
        served (the latest published for ``data_type``, default ``dataset``), before any
        process starts; ``train`` checks a model published later.
        """
        from xflwb.devices.datasets import check_compatible
        from xflwb.devices.fleet import Fleet, new_run_id

        url = self.url
        check_compatible(None, dataset, partition)
        reg = self._reg()
        for platform, count in (("android", android), ("ios", ios)):
            found = reg.advertised(data_type or dataset, platform) if count else None
            if found is not None:
                check_compatible(found[0]["manifest"], dataset)
        self._fleet_count += 1
        first = 1000 * self._fleet_count + 1
        # a fresh directory per spawn: a new kernel's fleet never reads an older one's files
        run_id = new_run_id()
        if self.tls is not None:
            knobs.setdefault("ca_file", self.tls.ca_file)
        if self.device_auth == "token" and "tokens" not in knobs:
            # the workbench enrolls its own virtual devices, one token each
            knobs["tokens"] = [self.issue_device_token(f"virtual-{first + k}")
                               for k in range(int(android) + int(ios))]
        fleet = Fleet(url, self.data_dir / "fleets" / f"{run_id}-fleet-{self._fleet_count}",
                      android=android, ios=ios, dataset=dataset, partition=partition,
                      data_type=data_type, seed=seed, first_device_id=first, run_id=run_id,
                      **knobs)
        self._fleets.append(fleet)
        fleet.start()
        # when every device dies, the phone sessions they were for fail with their errors
        assert self.sessions is not None
        self.sessions.watch_fleet(fleet, f"fleet {self._fleet_count}")
        return fleet

    @property
    def session_table(self) -> pd.DataFrame:
        reg = self._reg()
        assert self.sessions is not None
        self.sessions.refresh()
        rows = [{"id": s["id"], "model": s["model_name"], "status": s["status"],
                 "round": s["round"], "rounds": s["config"]["rounds"],
                 "started_from": started_from(reg, s), "ports": s["ports"]}
                for s in reg.list_sessions()]
        return pd.DataFrame(rows, columns=["id", "model", "status", "round", "rounds",
                                           "started_from", "ports"])

    # -- security ------------------------------------------------------------------------
    def _tokens(self) -> Any:
        from xflwb.server.security import TokenStore

        return TokenStore(self._reg().engine)

    def issue_device_token(self, device: str) -> str:
        """A new token for the phone labelled ``device``: give it to the phone (it is shown
        only now; the registry keeps its digest). Phones present it as ``Authorization:
        Bearer <token>`` on HTTP and in the gRPC metadata when ``device_auth="token"``."""
        return str(self._tokens().issue(device)["token"])

    def revoke_device_token(self, device_or_id: str | int) -> int:
        """Revoke a token by id, or every token of a device by name; returns how many.
        Revoked phones are refused at their next request or join."""
        return self._tokens().revoke(device_or_id)

    @property
    def device_tokens(self) -> pd.DataFrame:
        """Every token issued (id, device, created, revoked); never the tokens themselves."""
        return pd.DataFrame(self._tokens().list(),
                            columns=["id", "device", "created", "revoked"])

    @property
    def tls_fingerprint(self) -> str | None:
        """SHA-256 of the certificate phones trust (the CA's, for ``make_dev_ca``)."""
        return self.tls.fingerprint if self.tls is not None else None

    @property
    def security_warnings(self) -> list[str]:
        """What is open to the network: a non-loopback bind without TLS or device auth."""
        from xflwb.server.security import warnings_for

        return warnings_for(self.host, self.tls, self.device_auth)
