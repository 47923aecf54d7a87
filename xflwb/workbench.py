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
import weakref
from pathlib import Path
from typing import Any

import pandas as pd

from xflwb import _options
from xflwb.devices.device import DeviceOptions
from xflwb.devices.fleet import FleetOptions
from xflwb.errors import BackendError, InputError
from xflwb.server.backend_lock import BackendLock
from xflwb.server.backend_lock import BackendRunning as BackendRunning  # public: start raises
from xflwb.server.config import BackendOptions, SessionConfig, TLSOptions
from xflwb.server.phone_sessions import PhoneSessionManager, phone_config
from xflwb.sessions.handle import Session, started_from
from xflwb.sessions.registry import Registry
from xflwb.sessions.status import DONE as DONE  # public: statuses a session ends in
from xflwb.simulation.config import SimulationConfig

#: the running workbenches of this process by data directory (weak: a dropped one goes)
_LIVE: weakref.WeakValueDictionary[str, Workbench] = weakref.WeakValueDictionary()


def reachable_host(host: str) -> str:
    """A wildcard bind address is not something a phone can dial: use this machine's
    outward-facing address instead (no packet is sent by connecting a UDP socket)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address: str = s.getsockname()[0]
            return address
    except OSError:
        return "127.0.0.1"


def tls_from_options(opts: TLSOptions, host: str) -> Any:
    """``TLSOptions`` (``--tls-cert/--tls-key[/--tls-ca]`` or ``--dev-tls DIR``) as
    ``Workbench(tls=...)``; ``host`` is the bind address (a dev certificate names it)."""
    if opts.dev_tls:
        from xflwb.server.security import make_dev_ca

        # the address phones dial: the bind address, or this machine's for a wildcard
        hosts = ["127.0.0.1", "localhost", "::1", reachable_host(host)]
        return make_dev_ca(opts.dev_tls, hosts=hosts + list(opts.tls_host or []))
    if opts.tls_cert:
        return (opts.tls_cert, opts.tls_key, *([opts.tls_ca] if opts.tls_ca else []))
    return None


def _refuse_start_fresh(options: dict[str, Any], where: str) -> None:
    """``start_fresh`` was the notebook's option until sessions started fresh by default."""
    if "start_fresh" in options:
        raise _options.UnknownOptionError(
            f"{where}: start_fresh was replaced by resume: notebook sessions start fresh "
            "unless resume=True (phones' auto-started sessions still resume unless the phone "
            "sends start_fresh)")


class Workbench:
    """Registry + FedKit-compatible HTTP API + Flower sessions, in one object."""

    @_options.generated(BackendOptions)
    def __init__(self, *, tls: Any = None, session_defaults: dict[str, Any] | None = None,
                 **options: Any) -> None:
        """The backend's options are ``BackendOptions`` (listed below); also

        ``tls``: ``(cert, key)``, ``(cert, key, ca)`` or
        ``xflwb.server.security.make_dev_ca(dir)``: HTTPS and gRPC over TLS.
        ``session_defaults``: ``SessionConfig`` options of sessions phones start
        (``auto_start``)."""
        from xflwb.server.security import tls_config

        _options.unknown(BackendOptions, options, "Workbench()")
        opts = BackendOptions(**options)
        self.tls = tls_config(tls)
        self.device_auth = opts.device_auth
        self.max_body_bytes = opts.max_body_bytes
        #: deadlines on slow HTTP clients: (head, body, idle keep-alive) seconds
        self.http_timeouts = (opts.http_header_timeout, opts.http_body_timeout,
                              opts.http_idle_timeout)
        #: phones' ``start_fresh`` is ignored (logged) unless the operator allows it here
        self.allow_phone_start_fresh = opts.allow_phone_start_fresh
        self.data_dir = Path(opts.data_dir)
        self.host = opts.host
        self.port = opts.port
        self.db_url = opts.db_url
        admin_token, auto_start = opts.admin_token, opts.auto_start
        self.admin_token = (admin_token or os.environ.get("XFLWB_ADMIN_TOKEN")
                            or secrets.token_urlsafe(24))
        self.auto_start = auto_start
        self.session_defaults = dict(session_defaults or {})
        _refuse_start_fresh(self.session_defaults, "session_defaults")
        self.registry: Registry | None = None
        self.sessions: PhoneSessionManager | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._fleet_count = 0  # numbers fleets (device ids, directories); the fleets: .fleets
        self._lock = BackendLock(self.data_dir)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        """The base URL phones use."""
        if not self.running:
            raise BackendError("the workbench is not running: call wb.start()")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{reachable_host(self.host)}:{self.port}"

    def start(self, timeout: float = 30.0) -> Workbench:
        """Serve the data directory; raises ``BackendRunning`` (an ``OSError``) with the
        running backend's URL and pid when another workbench already serves it (in this
        process or another; ``Workbench.running_for(data_dir)`` finds one in this
        process)."""
        if self.running:
            return self
        # one backend per data directory: a second start is refused with the first's URL
        self._lock.acquire()
        try:
            return self._serve(timeout)
        except BaseException:
            self.stop()
            raise

    def _serve(self, timeout: float) -> Workbench:
        import uvicorn

        from xflwb.server.app import AppState, create_app
        from xflwb.server.http.timeouts import timed_protocol

        self.registry = Registry(self.data_dir, self.db_url)
        self.sessions = PhoneSessionManager(self.registry, host=self.host,
                                            security=self._security())
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
        cert = str(self.tls.cert) if self.tls is not None else None
        key = str(self.tls.key) if self.tls is not None else None
        header, body, idle = self.http_timeouts
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off",
                                http=timed_protocol(header, body),
                                # uvicorn annotates int; it hands the seconds to call_later
                                timeout_keep_alive=idle,  # type: ignore[arg-type]
                                ssl_certfile=cert, ssl_keyfile=key)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="xflwb-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BackendError("the HTTP server did not start")
            time.sleep(0.02)
        self._lock.publish(self.url)
        _LIVE[str(self.data_dir.resolve())] = self
        return self

    @staticmethod
    def running_for(data_dir: str | os.PathLike[str]) -> Workbench | None:
        """The workbench of this process serving ``data_dir``, if one runs (so a second
        ``%xfl_server start`` attaches to it)."""
        wb = _LIVE.get(str(Path(data_dir).resolve()))
        return wb if wb is not None and wb.running else None

    def stop(self) -> None:
        """Stop every fleet, session process and the HTTP server, and close the registry."""
        if self.sessions is not None:
            self.sessions.stop_fleets()
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
        if _LIVE.get(str(self.data_dir.resolve())) is self:
            del _LIVE[str(self.data_dir.resolve())]
        self._lock.release()  # last: a new start may serve the directory from now on

    def __enter__(self) -> Workbench:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"Workbench({where}, data_dir='{self.data_dir}')"

    # -- models and sessions -----------------------------------------------------------------
    def _security(self) -> dict[str, Any]:
        """The ``tls`` / ``device_auth`` options every phone session of this workbench
        gets (``phone_config``)."""
        return {"tls": self.tls.as_list() if self.tls else None,
                "device_auth": self.device_auth}

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

    @_options.generated(SessionConfig)
    def train(self, model: Any, **options: Any) -> Session:
        """Start a Flower session serving ``model``: a published name, or an
        ``ExportResult`` / export directory (published first; versions are immutable, so
        publishing the same export twice is a no-op). Returns at once: phones (or
        ``spawn_devices``) join it; ``session.wait()`` blocks.

        It starts from the exported weights unless ``resume=True`` (then from the model's
        latest phone-session checkpoint); ``session.started_from`` says which. Before any
        process starts, the model is checked against the data of this workbench's running
        fleets that will train it (shape, dtype, classes)."""
        from xflwb.devices.datasets import check_compatible

        _refuse_start_fresh(options, "wb.train")
        if "secagg" in options:
            raise _options.UnknownOptionError(
                "secagg runs only in the Simulation Engine: phones speak Flower's legacy "
                "transport, which cannot carry SecAgg+'s stages; use "
                "wb.simulate(..., secagg=...)")
        _options.unknown(SessionConfig, options, "wb.train")
        # validated once, here: bad options publish nothing; the manager stores this one
        cfg = phone_config(options, self.host, self._security())
        reg = self._reg()
        assert self.sessions is not None
        name = reg.resolve(model)
        found = reg.latest_model(name)
        for fleet in self.fleets:
            if fleet.data_type == found["data_type"] and fleet.alive():
                check_compatible(found["manifest"], fleet.dataset)
        return self.sessions.start_config(name, cfg)

    @_options.generated(SimulationConfig)
    def simulate(self, model: Any, *, wait: bool = True, timeout: float | None = None,
                 progress: bool = True, **options: Any) -> Session:
        """``xflwb.simulate`` recorded in this workbench's registry (so ``session_table``,
        dashboards and the admin API see it). ``wait=True`` (default, as ``xflwb.simulate``)
        blocks with a round progress bar and raises if the simulation fails; ``wait=False``
        returns the running ``Session`` at once."""
        from xflwb import simulation

        def manager() -> Any:
            self._reg()
            return self.sessions

        session: Session = simulation.start(manager, model, wait=wait, timeout=timeout,
                                            progress=progress, **options)
        return session

    def session(self, session_id: int) -> Session:
        self._reg()
        assert self.sessions is not None
        return self.sessions.get(session_id)

    @_options.generated(FleetOptions, DeviceOptions)
    def spawn_devices(self, *, tokens: list[str] | None = None, **options: Any) -> Any:
        """Start virtual phones (a process each) against this backend; returns the Fleet.

        The ``DeviceOptions`` knobs take one value or one per device
        (``slowdown=[1, 1, 10]``). ``tokens``: one device token each (default with
        ``device_auth="token"``: the workbench issues them).

        Names are checked here, and the dataset against the model the devices will be
        served (the latest published for ``data_type``, default ``dataset``), before any
        process starts; ``train`` checks a model published later.
        """
        from xflwb.devices.datasets import check_compatible
        from xflwb.devices.fleet import Fleet, check_spawn, new_run_id

        _options.unknown((FleetOptions, DeviceOptions), options, "wb.spawn_devices")
        spec = FleetOptions(**{k: v for k, v in options.items()
                               if k in _options.names(FleetOptions)})
        android, ios = spec.android, spec.ios
        dataset, partition, data_type = spec.dataset, spec.partition, spec.data_type
        knobs = dict(options)
        url = self.url
        check_compatible(None, dataset, partition)
        reg = self._reg()
        for platform, count in (("android", android), ("ios", ios)):
            found = reg.advertised(data_type or dataset, platform) if count else None
            if found is not None:
                check_compatible(found[0]["manifest"], dataset)
        check_spawn(dataset, data_type or dataset)  # an export not published yet
        self._fleet_count += 1
        first = 1000 * self._fleet_count + 1
        # a fresh directory per spawn: a new kernel's fleet never reads an older one's files
        run_id = new_run_id()
        if self.tls is not None:
            knobs.setdefault("ca_file", self.tls.ca_file)
        if self.device_auth == "token" and tokens is None:
            # the workbench enrolls its own virtual devices, one token each
            tokens = [self.issue_device_token(f"virtual-{first + k}")
                      for k in range(int(android) + int(ios))]
        fleet = Fleet(url, self.data_dir / "fleets" / f"{run_id}-fleet-{self._fleet_count}",
                      first_device_id=first, run_id=run_id, tokens=tokens, **knobs)
        # the session manager keeps the one list of fleets (before it starts: stop() stops
        # even a fleet that failed half-way); when every device of one dies, the phone
        # sessions they were for fail with their errors
        assert self.sessions is not None
        self.sessions.watch_fleet(fleet, f"fleet {self._fleet_count}")
        fleet.start()
        return fleet

    @property
    def fleets(self) -> list[Any]:
        """The fleets ``spawn_devices`` started and nothing stopped yet, oldest first."""
        return self.sessions.fleets if self.sessions is not None else []

    def stop_devices(self) -> None:
        """Stop every fleet this workbench spawned (``%xfl_devices stop``); sessions carry
        on, waiting for phones."""
        if self.sessions is not None:
            self.sessions.stop_fleets()

    @property
    def session_table(self) -> pd.DataFrame:
        reg = self._reg()
        assert self.sessions is not None
        self.sessions.refresh()
        from xflwb.sessions.handle import session_end_reason

        # "end_reason": why a session ended (xflwb.sessions.ending), blank while it runs
        rows = [{"id": s["id"], "model": s["model_name"], "status": s["status"],
                 "round": s["round"], "rounds": s["config"]["rounds"],
                 "end_reason": session_end_reason(reg, s) or "",
                 "started_from": started_from(reg, s), "ports": s["ports"]}
                for s in reg.list_sessions()]
        return pd.DataFrame(rows, columns=["id", "model", "status", "round", "rounds",
                                           "end_reason", "started_from", "ports"])

    def disk_usage(self) -> Any:
        """What the data dir holds on disk (``xflwb.server.disk.DiskUsage``: checkpoint
        files and bytes, artifacts, database, logs), as ``xflwb server status`` prints."""
        from xflwb.server.disk import disk_usage

        return disk_usage(self._reg())

    # -- security ------------------------------------------------------------------------
    def _tokens(self) -> Any:
        from xflwb.server.security import TokenStore

        return TokenStore(self._reg())

    def issue_device_token(self, device: str, ttl: float | None = None,
                           session: Any = None) -> str:
        """A new token for the phone labelled ``device``: give it to the phone (it is shown
        only now; the registry keeps its digest). Phones present it as ``Authorization:
        Bearer <token>`` on HTTP and in the gRPC metadata when ``device_auth="token"``.

        ``ttl``: seconds until it expires (refused from then on; a live stream is cut
        within about a second). ``session``: a session (or its id) the token is valid for,
        alone: other sessions' gRPC ports and ``train/server`` for them refuse it."""
        from xflwb.server.security import check_session_scope
        from xflwb.sessions.registry import NotFound

        scope = check_session_scope(session)
        if scope is not None:
            try:
                self._reg().get_session(scope)
            except NotFound:
                raise InputError(f"session {scope} does not exist: scope a token to a "
                                 "session shown in wb.session_table") from None
        return str(self._tokens().issue(device, ttl=ttl, session=scope)["token"])

    def revoke_device_token(self, device_or_id: str | int) -> int:
        """Revoke a token by id, or every token of a device by name; returns how many.
        A revoked phone is refused at its next HTTP request; its live gRPC streams are cut
        within about a second and any update it has in flight is refused (recorded)."""
        revoked: int = self._tokens().revoke(device_or_id)
        return revoked

    @property
    def device_tokens(self) -> pd.DataFrame:
        """Every token issued (id, device, created, expires, session, revoked; times in
        epoch seconds, None: never / every session / valid); never the tokens themselves."""
        return pd.DataFrame(self._tokens().list(),
                            columns=["id", "device", "created", "expires", "session",
                                     "revoked"])

    @property
    def tls_fingerprint(self) -> str | None:
        """SHA-256 of the certificate phones trust (the CA's, for ``make_dev_ca``)."""
        return self.tls.fingerprint if self.tls is not None else None

    @property
    def security_warnings(self) -> list[str]:
        """What is open to the network: a non-loopback bind without TLS or device auth."""
        from xflwb.server.security import warnings_for

        return warnings_for(self.host, self.tls, self.device_auth)
