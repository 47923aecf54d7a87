"""Training sessions: each runs a Flower server in its own process.

A process per session because ``start_server`` installs signal handlers (main thread only)
and, more importantly, so a crashing session can never take down the notebook kernel or its
sibling sessions. The process listens on one gRPC port per platform, writes its state,
metrics and per-round checkpoints to the registry, and needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xflwb import _lifeline
from xflwb.bridge import manifest as manifest_mod
from xflwb.server.aggregate import pin_blas_threads
from xflwb.server.config import (
    FLOOR_MESSAGE_BYTES,
    SessionConfig,
    message_limit,
)
from xflwb.server.registry import ACTIVE, Registry, RegistryError

DONE = ("finished", "failed", "stopped", "crashed")
log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_grpc(cm: Any, platform: str, host: str, port: int | None,
                max_workers: int = 1000, max_message_bytes: int = FLOOR_MESSAGE_BYTES,
                probe_timeout: float | None = None,
                certificates: tuple[bytes, bytes, bytes] | None = None,
                interceptors: list[Any] | None = None) -> tuple[Any, int]:
    from xflwb.server.flower_legacy import start_grpc_server
    from xflwb.server.strategy import PlatformClientManager

    last: Exception | None = None
    for _ in range(1 if port else 8):
        p = port or _free_port(host)
        try:
            return start_grpc_server(client_manager=PlatformClientManager(
                                         cm, platform, probe_timeout=probe_timeout),
                                     server_address=f"{host}:{p}",
                                     max_concurrent_workers=max_workers,
                                     max_message_length=max_message_bytes,
                                     certificates=certificates,
                                     interceptors=interceptors), p
        except RuntimeError as exc:  # grpc: port taken between probe and bind
            last = exc
    raise RuntimeError(f"could not bind a gRPC port for {platform}: {last}")


def _grpc_security(cfg: SessionConfig, registry: Registry
                   ) -> tuple[tuple[bytes, bytes, bytes] | None, list[Any] | None]:
    """Flower's ``certificates=`` from the workbench's TLS files, and the device-token
    interceptor when ``device_auth == "token"``."""
    from xflwb.server import security

    tls = security.tls_config(cfg.tls) if cfg.tls else None
    interceptors = ([security.grpc_interceptor(security.TokenStore(registry.engine))]
                    if cfg.device_auth == "token" else None)
    return (tls.certificates() if tls else None), interceptors


class CheckpointError(RuntimeError):
    """No usable checkpoint: the message names the file(s), why, and what to do."""


def save_checkpoint(registry: Registry, session_id: int, model: dict[str, Any], rnd: int,
                    arrays: list[np.ndarray]) -> Path:
    """Write the global model of round ``rnd`` and record it with the sha256 of its bytes
    (checked when it is loaded). Raises ``OSError`` (disk full, read-only folder) or a
    registry error; ``round_recorders`` logs those and training goes on."""
    folder = registry.checkpoint_dir / model["name"] / f"session-{session_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{rnd:05d}.npz"
    tmp = folder / f".round-{rnd:05d}.tmp.npz"
    try:
        np.savez(tmp, *arrays)
        digest = manifest_mod.sha256(tmp)
        os.replace(tmp, path)  # a kill mid-write never leaves a half checkpoint
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    registry.add_checkpoint(session_id, model, rnd, path, sha256=digest)
    return path


def load_checkpoint(path: str | Path, sha256: str | None = None,
                    manifest: dict[str, Any] | None = None) -> list[np.ndarray]:
    """The arrays of a checkpoint file, verified: its sha256 (when recorded), a readable
    ``.npz`` of real float arrays, finite values, and (given the ``manifest``) the model's
    tensor count and shapes. ``CheckpointError`` says what is wrong with which file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if sha256 is not None:
        got = manifest_mod.sha256(path)
        if got != sha256:
            raise CheckpointError(f"{path} does not match its recorded sha256 ({got[:12]}… "
                                  f"instead of {sha256[:12]}…): the file changed after it "
                                  "was written")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [np.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    except Exception as exc:  # truncated, garbage, not a zip, missing members
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                              f"{exc})") from None
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            raise CheckpointError(f"{path}: tensor {i} has dtype {a.dtype}, not float")
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise CheckpointError(f"{path}: tensor {i} holds {bad} NaN/inf values")
    if manifest is not None:
        want = [tuple(p["shape"]) for p in manifest["parameters"]]
        if len(arrays) != len(want):
            raise CheckpointError(f"{path} holds {len(arrays)} tensors; model "
                                  f"{manifest['name']} has {len(want)}")
        for i, (a, shape) in enumerate(zip(arrays, want, strict=True)):
            if a.shape != shape:
                raise CheckpointError(f"{path}: tensor {i} has shape {a.shape}; model "
                                      f"{manifest['name']} expects {shape}")
    return [a.astype(np.float32) for a in arrays]


def newest_valid_checkpoint(candidates: list[dict[str, Any]], manifest: dict[str, Any],
                            what: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The first checkpoint of ``candidates`` (newest first) that verifies, logging why
    each newer one was skipped; ``CheckpointError`` naming every file when none does."""
    problems: list[str] = []
    for ckpt in candidates:
        try:
            arrays = load_checkpoint(ckpt["path"], ckpt.get("sha256"), manifest)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("skipping checkpoint %s (session %s, round %s): %s", ckpt["id"],
                        ckpt["session_id"], ckpt["round"], exc)
            continue
        if problems:
            log.warning("falling back to checkpoint %s (%s, session %s, round %s), the newest "
                        "valid one", ckpt["id"], ckpt["path"], ckpt["session_id"],
                        ckpt["round"])
        return ckpt, arrays
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                       if len(problems) > 5 else "")
    raise CheckpointError(f"no valid checkpoint of {what}: {shown}")


def round_recorders(registry: Registry, session_id: int, model: dict[str, Any],
                    offset: int = 0
                    ) -> tuple[Callable[[Any, list[np.ndarray]], None], Callable[[Any], None]]:
    """The strategy's per-round callbacks that persist metrics, rejections, evaluations and
    a checkpoint; shared by phone sessions and simulations so both record the same way.

    ``offset``: the round a resumed session continues from (its Flower round 1 is recorded
    as round ``offset + 1``); the session row's ``round`` counts this session's rounds."""

    def on_fit(report: Any, global_: list[np.ndarray]) -> None:
        rnd = report.round + offset
        registry.add_metrics(session_id, rnd, report.metrics)
        for platform, cid, reason in report.rejections:
            registry.add_rejection(session_id, rnd, platform, cid, reason)
        registry.add_failures(session_id, rnd, getattr(report, "failures", []))
        if getattr(report, "failed", None):
            return  # every client failed: no new model, the session fails (strategy raises)
        try:
            save_checkpoint(registry, session_id, model, rnd, global_)
        except Exception as exc:  # disk full, read-only folder: training goes on
            log.error("round %s: checkpoint not written (%s: %s); training goes on and the "
                      "next round writes one again", rnd, type(exc).__name__, exc)
        registry.update_session(session_id, round=report.round)

    def on_eval(report: Any) -> None:
        rnd = report.round + offset
        registry.add_metrics(session_id, rnd, report.metrics)
        registry.add_evaluations(session_id, rnd, report.evaluations)
        for platform, cid, reason in getattr(report, "rejections", []):  # bad EvaluateRes
            registry.add_rejection(session_id, rnd, platform, cid, reason)

    return on_fit, on_eval


def process_logger(label: str) -> logging.Logger:
    """The ``xflwb`` logger of a session or simulation process, labelled in its log file.

    Flower logs through its own handler; xflwb's loggers get one too (no root config)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {label} %(name)s: %(message)s"))
    xlog = logging.getLogger("xflwb")
    xlog.addHandler(handler)
    xlog.setLevel(logging.INFO)
    return xlog


def progress_path(data_dir: str | Path, session_id: int) -> Path:
    """Where a session process says what it is doing (``phase``: waiting | fit | evaluate,
    ``round``, ``connected``, ``needed``, ``selected``): a small JSON file, rewritten on
    change, so ``wait`` and the dashboard can say what a session waits for."""
    return Path(data_dir) / "progress" / f"session-{session_id}.json"


def progress_writer(data_dir: str | Path, session_id: int) -> Callable[[dict[str, Any]], None]:
    """The strategy's ``on_progress`` callback for this session (atomic writes)."""
    path = progress_path(data_dir, session_id)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(state: dict[str, Any]) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**state, "time": time.time()}))
        os.replace(tmp, path)

    return write


def _only_if_active(registry: Registry, session_id: int, **values: Any) -> None:
    """Update the session unless it already ended (a session failed from outside, e.g. by
    its fleet dying, is stopped with SIGTERM and must stay failed)."""
    with contextlib.suppress(Exception):
        if registry.get_session(session_id)["status"] not in ACTIVE:
            return
    registry.update_session(session_id, **values)


def run_session(data_dir: str, db_url: str, session_id: int) -> None:
    """Entry point of a session process."""
    xlog = process_logger(f"session-{session_id}")
    pin_blas_threads()  # aggregation is this process's numeric work; devices share the CPUs
    registry = Registry(data_dir, db_url)
    servers: list[Any] = []
    stopping = {"flag": False}

    def _term(_sig: int, _frame: Any) -> None:
        stopping["flag"] = True
        for srv in servers:
            srv.stop(grace=0)
        _only_if_active(registry, session_id, status="stopped",
                        error=_lifeline.stop_reason())
        os._exit(0)

    signal.signal(signal.SIGTERM, _term)
    _lifeline.install()  # SIGTERM ourselves when the kernel that started us dies
    try:
        from xflwb.server.flower_legacy import Server, SimpleClientManager
        from xflwb.server.strategy import AllClientsFailed, CrossPlatformStrategy

        row = registry.get_session(session_id)
        cfg = SessionConfig(**row["config"])
        model = registry.get_model(row["model_id"])
        m = model["manifest"]
        initial = manifest_mod.initial_parameters(m)
        resumed, offset = None, 0
        if cfg.resume:
            candidates = registry.checkpoints_newest_first(model["name"], model["version"])
            if candidates:  # the newest valid one (CheckpointError when none is)
                ckpt, initial = newest_valid_checkpoint(
                    candidates, m, f"{model['name']} v{model['version']} to resume from "
                    "(start fresh with resume=False, or restore a checkpoint file)")
                resumed, offset = ckpt["id"], int(ckpt["round"])
                xlog.info("resuming %s from checkpoint %s (round %s of session %s); this "
                          "session's rounds are numbered from %s", model["name"],
                          ckpt["path"], ckpt["round"], ckpt["session_id"], offset + 1)
            else:
                xlog.info("resume=True but %s v%s has no checkpoint: starting fresh",
                          model["name"], model["version"])
        else:
            xlog.info("starting %s fresh from the exported weights", model["name"])
        cm = SimpleClientManager()
        ports = {}
        limit = message_limit(m, cfg.max_message_bytes)
        xlog.info("gRPC messages are limited to %d bytes (max_message_bytes)", limit)
        certificates, interceptors = _grpc_security(cfg, registry)
        for platform in m["platforms"]:
            # each joining client is asked GetParameters first: its reply says which
            # tensor encoding it reads, before its first FitIns (PlatformClientManager)
            srv, port = _start_grpc(cm, platform, cfg.host, cfg.ports.get(platform),
                                    cfg.max_workers, limit,
                                    probe_timeout=min(cfg.round_timeout, 120.0),
                                    certificates=certificates, interceptors=interceptors)
            servers.append(srv)
            ports[platform] = port

        on_fit, on_eval = round_recorders(registry, session_id, model, offset)
        strategy = CrossPlatformStrategy(
            m, initial, strategy=cfg.strategy, strategy_options=cfg.strategy_options,
            fraction_fit=cfg.fraction_fit, fraction_evaluate=cfg.fraction_evaluate,
            min_clients=cfg.min_clients, local_epochs=cfg.local_epochs,
            max_examples=cfg.max_examples, max_update_norm=cfg.max_update_norm,
            on_fit_round=on_fit, on_evaluate_round=on_eval,
            on_progress=progress_writer(data_dir, session_id))
        try:  # the weights it starts from, at the round it continues from
            save_checkpoint(registry, session_id, model, offset, initial)
        except Exception as exc:  # disk full, read-only folder: round 1 writes one again
            xlog.error("checkpoint of the starting weights not written (%s: %s); training "
                       "goes on", type(exc).__name__, exc)
        registry.update_session(session_id, status="running", ports=ports, pid=os.getpid(),
                                resumed_from=resumed)
        server = Server(client_manager=cm, strategy=strategy)
        server.set_max_workers(cfg.max_workers)
        try:
            server.fit(num_rounds=cfg.rounds, timeout=cfg.round_timeout)
        except AllClientsFailed as exc:  # the reason is the clients', not a traceback
            xlog.error("session %s failed: %s", session_id, exc)
            _only_if_active(registry, session_id, status="failed", error=str(exc))
            return
        with contextlib.suppress(Exception):
            server.disconnect_all_clients(timeout=5)
        _only_if_active(registry, session_id, status="finished")
    except CheckpointError as exc:  # names the files; no traceback
        xlog.error("session %s failed: %s", session_id, exc)
        _only_if_active(registry, session_id, status="failed", error=str(exc))
    except BaseException as exc:  # the session dies, the kernel and siblings do not
        if not stopping["flag"]:
            _only_if_active(registry, session_id, status="failed",
                            error="".join(traceback.format_exception(exc))[-4000:])
        raise
    finally:
        for srv in servers:
            srv.stop(grace=1)
        registry.close()


class Session:
    """The notebook's handle on one session (state lives in the registry)."""

    def __init__(self, manager: SessionManager, session_id: int) -> None:
        self._manager = manager
        self.id = session_id

    @property
    def registry(self) -> Registry:
        return self._manager.registry

    @property
    def info(self) -> dict[str, Any]:
        self._manager.refresh()
        return self.registry.get_session(self.id)

    @property
    def status(self) -> str:
        return self.info["status"]

    @property
    def ports(self) -> dict[str, int]:
        return self.info["ports"]

    @property
    def round(self) -> int:
        return int(self.info["round"])

    @property
    def started_from(self) -> str:
        """What this session's global model started from, for cell outputs and dashboard
        headers: ``"started fresh"`` or ``"resumed from session 1, round 5"``."""
        return started_from(self.registry, self.info)

    def __repr__(self) -> str:
        i = self.info
        cfg = i["config"]
        where = (f"simulated android={cfg['android']} ios={cfg['ios']}"
                 if cfg.get("engine") == "simulation" else f"ports={i['ports']}")
        return (f"Session(id={self.id}, model={i['model_name']!r}, status={i['status']!r}, "
                f"round={i['round']}/{cfg['rounds']}, {started_from(self.registry, i)}, "
                f"{where})")

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the session ends; returns its final status (``failed`` carries the
        reason in ``session.error``). After ``timeout`` seconds raises ``SessionTimeout``
        (a ``TimeoutError``) saying what the session is waiting for and the last device
        errors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status
            if status in DONE:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise SessionTimeout(self.explain(after=timeout))
            time.sleep(poll)

    @property
    def error(self) -> str | None:
        """Why the session failed, crashed or was stopped (None while it runs)."""
        return self.info.get("error")

    @property
    def progress(self) -> dict[str, Any]:
        """What the session process last said it was doing: ``phase`` (waiting | fit |
        evaluate), ``round``, ``connected``, ``needed``, ``selected``; ``{}`` before then."""
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(progress_path(self.registry.data_dir, self.id).read_text())
            if isinstance(data, dict):
                return data
        return {}

    def doing(self, info: dict[str, Any] | None = None) -> str:
        """What the session is doing or waiting for, in words."""
        info = info or self.info
        if info["status"] in DONE:
            return info["status"]
        if info["status"] == "starting":
            return "its process is starting"
        p = self.progress
        rnd = p.get("round", int(info["round"]) + 1)
        if p.get("phase") == "waiting":
            return (f"waiting for {p['needed']} clients before round {rnd} "
                    f"(min_clients={p['needed']}); {p['connected']} connected")
        if p.get("phase") in ("fit", "evaluate"):
            verb = "training" if p["phase"] == "fit" else "evaluating"
            return f"{verb} round {rnd} on {p.get('selected', '?')} clients"
        return "starting its first round"

    @property
    def failures(self) -> pd.DataFrame:
        """Failed fits: round, platform, client, reason (errors and lost connections)."""
        return pd.DataFrame(self.registry.get_failures(self.id),
                            columns=["round", "platform", "client", "reason"])

    def device_errors(self) -> list[str]:
        """The last errors of this session's clients: its failed fits, then the errors of
        the devices of the fleets the workbench started for its model."""
        return self._manager.device_errors(self.id)

    def explain(self, after: float | None = None) -> str:
        """``session 3 is still at round 0/5 after 120 s: waiting for 2 clients ...;
        0 connected; last device errors: ...`` — for timeouts and the dashboard."""
        info = self.info
        errors = self.device_errors()
        from xflwb.server.strategy import summarize

        when = f" after {after:g} s" if after is not None else ""
        return (f"session {self.id} is still at round {info['round']}/"
                f"{info['config']['rounds']}{when}: {self.doing(info)}; last device errors: "
                f"{summarize(errors) if errors else 'none reported'} (log: "
                f"{self._manager.log_dir / f'session-{self.id}.log'})")

    def stop(self) -> None:
        self._manager.stop(self.id)

    @property
    def history(self) -> pd.DataFrame:
        """Long table: round, platform (android | ios | all), metric, value."""
        return history_frame(self.registry, self.id)

    @property
    def rejections(self) -> pd.DataFrame:
        return pd.DataFrame(self.registry.get_rejections(self.id),
                            columns=["round", "platform", "client", "reason"])

    def global_parameters(self) -> list[np.ndarray]:
        """The latest canonical global model of this session."""
        info = self.registry.get_session(self.id)
        candidates = self.registry.checkpoints_newest_first(info["model_name"],
                                                            session_id=self.id)
        if not candidates:
            raise RegistryError(f"session {self.id} has no checkpoint yet")
        manifest = self.registry.get_model(info["model_id"])["manifest"]
        return newest_valid_checkpoint(candidates, manifest, f"session {self.id}")[1]

    @property
    def first_round(self) -> int:
        """The number of this session's first round in its history and checkpoints: 1, or
        the round after the one it resumed from (``session.round`` counts this session's
        rounds from 1, for progress)."""
        return self.registry.round_offset(self.info) + 1


class SessionTimeout(TimeoutError):
    """``Session.wait`` ran out of time; the message says what the session waits for."""


@dataclass
class _WatchedFleet:
    """A fleet the workbench started: when every device dies with an error, the phone
    sessions of its data type fail with the devices' reasons instead of waiting."""

    fleet: Any
    label: str
    spent: bool = False  # superseded by a newer fleet, or already failed its sessions
    reason: str | None = None  # once every device died (dead fleets stay dead)


def _fleet_died(fleet: Any) -> str | None:
    """The devices' reasons when every device process of ``fleet`` has died (exit code
    other than 0, or killed other than by SIGTERM, i.e. not ended or stopped)."""
    procs = getattr(fleet, "procs", {})
    if not procs or any(p.poll() is None for p in procs.values()):
        return None
    if any(p.returncode in (0, -signal.SIGTERM) for p in procs.values()):
        return None
    from xflwb.server.strategy import summarize

    errors = [str(r.get("error") or r.get("status") or "?") for r in fleet.statuses()]
    return summarize(errors)


def resumes(config: dict[str, Any]) -> bool:
    """Whether a stored session config asked to resume (rows written before ``resume``
    existed resumed unless ``start_fresh``)."""
    return bool(config.get("resume", not config.get("start_fresh", False)))


def started_from(registry: Registry, info: dict[str, Any]) -> str:
    """``"resumed from session 1, round 5"`` or ``"started fresh"``, from a session row.

    A session's first checkpoint holds the weights it started from (round 0, or the round
    it resumed from), so a resume from it names where those came from. A resumed session
    numbers its rounds on from the round it resumed from."""
    import sqlalchemy as sa

    from xflwb.server.registry import checkpoints, sessions

    ckpt_id = info.get("resumed_from")
    if ckpt_id is None:
        if info["status"] == "starting":
            return "starting"
        if resumes(info["config"]) and info["config"].get("engine") != "simulation":
            return "started fresh (nothing to resume)"
        return "started fresh"
    seen: set[int] = set()
    with registry.engine.connect() as c:
        while True:
            row = c.execute(checkpoints.select().where(checkpoints.c.id == ckpt_id)).first()
            if row is None:
                return f"resumed from checkpoint {ckpt_id} (no longer in the registry)"
            if row.session_id in seen:
                break
            seen.add(row.session_id)
            origin = c.execute(sa.select(sessions.c.resumed_from)
                               .where(sessions.c.id == row.session_id)).scalar()
            if origin is None:
                if row.round != 0:
                    break
                return (f"resumed from session {row.session_id}, round 0 (the exported "
                        "weights)")
            start = c.execute(sa.select(checkpoints.c.round)
                              .where(checkpoints.c.id == origin)).scalar()
            if row.round not in (0, start):  # a round that session trained itself
                break
            ckpt_id = origin
    return f"resumed from session {row.session_id}, round {row.round}"


def history_frame(registry: Registry, session_id: int) -> pd.DataFrame:
    rows = registry.get_metrics(session_id)
    rows += registry.accuracy_metrics(session_id)
    df = pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])
    return df.sort_values(["round", "platform", "metric"], kind="stable").reset_index(drop=True)


class SessionManager:
    """Starts session processes and notices when one dies."""

    def __init__(self, registry: Registry, host: str = "127.0.0.1",
                 security: dict[str, Any] | None = None) -> None:
        self.registry = registry
        self.host = host
        #: the workbench's ``tls`` / ``device_auth``, given to every phone session it starts
        self.security = dict(security or {})
        self._procs: dict[int, subprocess.Popen] = {}
        self.log_dir = registry.data_dir / "logs"
        self._fleets: list[_WatchedFleet] = []
        self._lock = threading.RLock()

    def start(self, model_name: str, wait_ready: float = 120.0, **options: Any) -> Session:
        options.setdefault("host", self.host)
        options.update(self.security)
        cfg = SessionConfig(**options)
        model = self.registry.latest_model(model_name)
        self.refresh()  # a crashed session must not block the start
        # one transaction + a unique index: of racing starts exactly one wins, the others
        # get SessionConflict (HTTP 409) naming the winner
        sid = self.registry.create_session(model, asdict(cfg), exclusive=True)
        return self._launch(sid, "xflwb.server.session", wait_ready)

    def start_engine(self, model: dict[str, Any], config: dict[str, Any], module: str,
                     wait_ready: float = 120.0) -> Session:
        """Record a session of ``model`` (a registry row) with ``config`` and run
        ``python -m module`` on it. Another engine (``xflwb.simulation``) starts its
        session process through this, so the server need not know the engines above it;
        the handle is a ``Session`` like any other, recorded in the same registry."""
        sid = self.registry.create_session(model, config)
        return self._launch(sid, module, wait_ready)

    def _launch(self, sid: int, module: str, wait_ready: float) -> Session:
        # a fresh interpreter (not multiprocessing): no re-import of the caller's __main__,
        # so scripts without a main guard work too; its log goes to data_dir/logs
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"session-{sid}.log", "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, str(self.registry.data_dir),
                     self.registry.db_url, str(sid)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True, env=_lifeline.child_env())
        except OSError as exc:  # the row must not stay "starting" (it blocks the model)
            self.registry.update_session(sid, status="failed",
                                         error=f"could not launch its process: {exc}")
            raise RuntimeError(f"session {sid} could not launch its process: {exc}") from exc
        self._procs[sid] = proc
        self.registry.update_session(sid, pid=proc.pid)
        session = Session(self, sid)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            info = session.info
            if info["status"] != "starting":
                if info["status"] in ("failed", "crashed"):
                    raise RuntimeError(f"session {sid} failed to start: {info['error']}")
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"session {sid} did not start within {wait_ready} s")
        return session

    def get(self, session_id: int) -> Session:
        self.registry.get_session(session_id)
        return Session(self, session_id)

    def watch_fleet(self, fleet: Any, label: str) -> None:
        """Fail the phone sessions for ``fleet.data_type`` when all of the fleet's devices
        die (``refresh`` checks). A newer fleet for the same data type supersedes it."""
        with self._lock:
            for w in self._fleets:
                if w.fleet.data_type == fleet.data_type:
                    w.spent = True
            self._fleets.append(_WatchedFleet(fleet, label))

    def device_errors(self, session_id: int, last: int = 50) -> list[str]:
        """Recent failure reasons of the session's clients, then its watched fleets'
        device errors (a device that died before joining never reached the session)."""
        out = [f"{f['reason']}" for f in self.registry.get_failures(session_id, last=last)]
        info = self.registry.get_session(session_id)
        if info["config"].get("engine") == "simulation":
            return out
        data_type = self.registry.get_model(info["model_id"])["data_type"]
        with self._lock:
            fleets = [w.fleet for w in self._fleets if w.fleet.data_type == data_type]
        for fleet in fleets[-1:]:  # the latest fleet for this data type
            with contextlib.suppress(Exception):
                out += [str(r["error"]) for r in fleet.statuses() if r.get("error")]
        return out

    def fail(self, session_id: int, reason: str, timeout: float = 10.0) -> None:
        """Mark a session failed with ``reason`` and end its process."""
        self.registry.update_session(session_id, status="failed", error=reason)
        self._end_process(session_id, self.registry.get_session(session_id), timeout,
                          force=True)

    def _check_fleets(self) -> None:
        """A watched fleet whose devices all died fails its data type's phone sessions."""
        with self._lock:
            for w in self._fleets:
                if w.spent:
                    continue
                reason = w.reason = w.reason or _fleet_died(w.fleet)
                if reason is None:
                    continue
                targets = [s for s in self.registry.list_sessions(status=ACTIVE)
                           if s["config"].get("engine") != "simulation"
                           and self.registry.get_model(s["model_id"])["data_type"]
                           == w.fleet.data_type]
                for s in targets:
                    self.fail(s["id"], f"all {len(w.fleet.procs)} devices of {w.label} "
                                       f"died: {reason}")
                w.spent = bool(targets)

    #: a ``starting`` row still without a process pid after this long is crashed even while
    #: its launcher lives (a launch takes milliseconds; this catches a launcher that hung)
    LAUNCH_DEADLINE = 300.0

    def refresh(self) -> None:
        """Mark sessions whose process died without saying so as crashed, and fail those
        whose fleet died. Never raises: reads (``GET /api/v1/sessions``, ``Session.info``)
        call it, and a write that fails (disk full, read-only folder) is logged and tried
        again at the next refresh instead of failing the read."""
        try:
            if self._fleets:
                self._check_fleets()
            rows = self.registry.list_sessions(status=ACTIVE)
        except Exception as exc:
            log.warning("could not refresh session states: %s", exc)
            return
        for info in rows:
            reason = self._dead_reason(info)
            if reason is None:
                continue
            try:  # conditional UPDATE: a status the process wrote meanwhile wins
                self.registry.mark_crashed(info["id"], reason,
                                           without_pid=info["pid"] is None)
            except Exception as exc:
                log.warning("could not mark session %s crashed (%s): %s", info["id"],
                            reason, exc)

    def _dead_reason(self, info: dict[str, Any]) -> str | None:
        """Why an active session row has no live process, or None while it may have one."""
        proc = self._procs.get(info["id"])
        if proc is not None:  # we launched it: its exit code is ours to read
            if proc.poll() is None:
                return None
            return f"session process exited unexpectedly (exit code {proc.returncode})"
        if info["pid"] is not None:
            if _lifeline.pid_alive(info["pid"]):
                return None
            return f"session process {info['pid']} exited unexpectedly"
        # no pid yet: its launcher is between the insert and writing the pid
        launcher = info.get("launcher_pid")
        age = time.time() - info["started"]
        if launcher is not None and launcher != os.getpid() and not _lifeline.pid_alive(launcher):
            return (f"its launcher (process {launcher}) exited before the session process "
                    "started")
        if age > self.LAUNCH_DEADLINE:
            return (f"its process did not start within {self.LAUNCH_DEADLINE:g} s of the "
                    "session's creation")
        return None

    def stop(self, session_id: int, timeout: float = 10.0) -> None:
        info = self.registry.get_session(session_id)
        self._end_process(session_id, info, timeout)
        if self.registry.get_session(session_id)["status"] in ACTIVE:
            self.registry.update_session(session_id, status="stopped")

    def _end_process(self, session_id: int, info: dict[str, Any], timeout: float,
                     force: bool = False) -> None:
        """Terminate the session's process (``force``: even when the registry says it
        ended, as after ``fail``)."""
        proc = self._procs.get(session_id)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            # anything it started in its process group (a simulation's Ray processes)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif (proc is None and (force or info["status"] in ACTIVE)
              and _lifeline.pid_alive(info["pid"])):
            os.kill(info["pid"], signal.SIGTERM)

    def stop_all(self) -> None:
        for sid, proc in list(self._procs.items()):
            if proc.poll() is None:
                self.stop(sid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()


if __name__ == "__main__":  # python -m xflwb.server.session DATA_DIR DB_URL SESSION_ID
    run_session(sys.argv[1], sys.argv[2], int(sys.argv[3]))
