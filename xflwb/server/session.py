"""Training sessions: each runs a Flower server in its own process.

A process per session because ``start_server`` installs signal handlers (main thread only)
and, more importantly, so a crashing session can never take down the notebook kernel or its
sibling sessions. The process listens on one gRPC port per platform, writes its state,
metrics and per-round checkpoints to the registry, and needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xflwb.bridge import manifest as manifest_mod
from xflwb.server.aggregate import pin_blas_threads
from xflwb.server.registry import ACTIVE, Registry, RegistryError

DONE = ("finished", "failed", "stopped", "crashed")


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
    start_fresh: bool = False
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)  # fixed ports; empty = free ports
    #: clients trained in parallel and gRPC streams per port (Flower's defaults, 6 threads
    #: on 2 cores and 1000 streams, would serialise a large fleet's fits)
    max_workers: int = 1024

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
        if not isinstance(self.round_timeout, int | float) or self.round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive seconds, got {self.round_timeout!r}")
        if str(self.strategy).lower() not in SERVER_STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of "
                             f"{sorted(SERVER_STRATEGIES)}")
        self.strategy = str(self.strategy).lower()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_grpc(cm: Any, platform: str, host: str, port: int | None,
                max_workers: int = 1000) -> tuple[Any, int]:
    from xflwb.server.flower_legacy import start_grpc_server
    from xflwb.server.strategy import PlatformClientManager

    last: Exception | None = None
    for _ in range(1 if port else 8):
        p = port or _free_port(host)
        try:
            return start_grpc_server(client_manager=PlatformClientManager(cm, platform),
                                     server_address=f"{host}:{p}",
                                     max_concurrent_workers=max_workers), p
        except RuntimeError as exc:  # grpc: port taken between probe and bind
            last = exc
    raise RuntimeError(f"could not bind a gRPC port for {platform}: {last}")


def save_checkpoint(registry: Registry, session_id: int, model: dict[str, Any], rnd: int,
                     arrays: list[np.ndarray]) -> None:
    folder = registry.checkpoint_dir / model["name"] / f"session-{session_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{rnd:05d}.npz"
    tmp = folder / f".round-{rnd:05d}.tmp.npz"
    np.savez(tmp, *arrays)
    os.replace(tmp, path)  # a kill mid-write never leaves a half checkpoint
    registry.add_checkpoint(session_id, model, rnd, path)


def load_checkpoint(path: str | Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [np.asarray(data[f"arr_{i}"], np.float32) for i in range(len(data.files))]


def round_recorders(registry: Registry, session_id: int, model: dict[str, Any]
                    ) -> tuple[Callable[[Any, list[np.ndarray]], None], Callable[[Any], None]]:
    """The strategy's per-round callbacks that persist metrics, rejections, evaluations and
    a checkpoint; shared by phone sessions and simulations so both record the same way."""

    def on_fit(report: Any, global_: list[np.ndarray]) -> None:
        registry.add_metrics(session_id, report.round, report.metrics)
        for platform, cid, reason in report.rejections:
            registry.add_rejection(session_id, report.round, platform, cid, reason)
        save_checkpoint(registry, session_id, model, report.round, global_)
        registry.update_session(session_id, round=report.round)

    def on_eval(report: Any) -> None:
        registry.add_metrics(session_id, report.round, report.metrics)
        registry.add_evaluations(session_id, report.round, report.evaluations)

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
        registry.update_session(session_id, status="stopped")
        os._exit(0)

    signal.signal(signal.SIGTERM, _term)
    try:
        from xflwb.server.flower_legacy import Server, SimpleClientManager
        from xflwb.server.strategy import CrossPlatformStrategy

        row = registry.get_session(session_id)
        cfg = SessionConfig(**row["config"])
        model = registry.get_model(row["model_id"])
        m = model["manifest"]
        initial = manifest_mod.initial_parameters(m)
        resumed = None
        if not cfg.start_fresh:
            ckpt = registry.latest_checkpoint(model["name"], model["version"])
            if ckpt is not None and Path(ckpt["path"]).exists():
                initial = load_checkpoint(ckpt["path"])
                resumed = ckpt["id"]
                xlog.info("resuming %s from checkpoint %s (round %s of session %s)",
                             model["name"], ckpt["path"], ckpt["round"], ckpt["session_id"])
        cm = SimpleClientManager()
        ports = {}
        for platform in m["platforms"]:
            srv, port = _start_grpc(cm, platform, cfg.host, cfg.ports.get(platform),
                                    cfg.max_workers)
            servers.append(srv)
            ports[platform] = port

        on_fit, on_eval = round_recorders(registry, session_id, model)
        strategy = CrossPlatformStrategy(
            m, initial, strategy=cfg.strategy, strategy_options=cfg.strategy_options,
            fraction_fit=cfg.fraction_fit, fraction_evaluate=cfg.fraction_evaluate,
            min_clients=cfg.min_clients, local_epochs=cfg.local_epochs,
            on_fit_round=on_fit, on_evaluate_round=on_eval)
        save_checkpoint(registry, session_id, model, 0, initial)
        registry.update_session(session_id, status="running", ports=ports, pid=os.getpid(),
                                resumed_from=resumed)
        server = Server(client_manager=cm, strategy=strategy)
        server.set_max_workers(cfg.max_workers)
        server.fit(num_rounds=cfg.rounds, timeout=cfg.round_timeout)
        with contextlib.suppress(Exception):
            server.disconnect_all_clients(timeout=5)
        registry.update_session(session_id, status="finished")
    except BaseException as exc:  # the session dies, the kernel and siblings do not
        if not stopping["flag"]:
            registry.update_session(session_id, status="failed",
                                    error="".join(traceback.format_exception(exc))[-4000:])
        raise
    finally:
        for srv in servers:
            srv.stop(grace=1)
        registry.close()


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def __repr__(self) -> str:
        i = self.info
        cfg = i["config"]
        where = (f"simulated android={cfg['android']} ios={cfg['ios']}"
                 if cfg.get("engine") == "simulation" else f"ports={i['ports']}")
        return (f"Session(id={self.id}, model={i['model_name']!r}, status={i['status']!r}, "
                f"round={i['round']}/{cfg['rounds']}, {where})")

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the session ends; returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status
            if status in DONE:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} still {status} after {timeout} s "
                                   f"(round {self.round})")
            time.sleep(poll)

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
        ckpt = self.registry.latest_checkpoint(info["model_name"], session_id=self.id)
        if ckpt is None:
            raise RegistryError(f"session {self.id} has no checkpoint yet")
        return load_checkpoint(ckpt["path"])


def history_frame(registry: Registry, session_id: int) -> pd.DataFrame:
    rows = registry.get_metrics(session_id)
    rows += registry.accuracy_metrics(session_id)
    df = pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])
    return df.sort_values(["round", "platform", "metric"], kind="stable").reset_index(drop=True)


class SessionManager:
    """Starts session processes and notices when one dies."""

    def __init__(self, registry: Registry, host: str = "127.0.0.1") -> None:
        self.registry = registry
        self.host = host
        self._procs: dict[int, subprocess.Popen] = {}
        self.log_dir = registry.data_dir / "logs"

    def start(self, model_name: str, wait_ready: float = 120.0, **options: Any) -> Session:
        options.setdefault("host", self.host)
        cfg = SessionConfig(**options)
        model = self.registry.latest_model(model_name)
        self.refresh()
        active = self.registry.active_session_for(model_name)
        if active is not None:
            raise RegistryError(f"model {model_name!r} already has session {active['id']} "
                                f"({active['status']}); stop it first")
        sid = self.registry.create_session(model, asdict(cfg))
        return self._launch(sid, "xflwb.server.session", wait_ready)

    def start_simulation(self, model_name: str, config: Any = None, wait_ready: float = 120.0,
                         **options: Any) -> Session:
        """Run ``model_name`` on Flower's Simulation Engine (see ``xflwb.simulate``); the
        handle is a ``Session`` like any other, recorded in the same registry. ``config``
        is a ``SimulationConfig`` (else one is made from ``options``)."""
        from xflwb.simulation.config import SimulationConfig

        cfg = config if config is not None else SimulationConfig(**options)
        model = self.registry.latest_model(model_name)
        cfg.check_platforms(model["manifest"])
        sid = self.registry.create_session(model, asdict(cfg))
        return self._launch(sid, "xflwb.simulation.server", wait_ready)

    def _launch(self, sid: int, module: str, wait_ready: float) -> Session:
        # a fresh interpreter (not multiprocessing): no re-import of the caller's __main__,
        # so scripts without a main guard work too; its log goes to data_dir/logs
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"session-{sid}.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(self.registry.data_dir),
                 self.registry.db_url, str(sid)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
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

    def refresh(self) -> None:
        """Mark sessions whose process died without saying so as crashed."""
        for info in self.registry.list_sessions(status=ACTIVE):
            proc = self._procs.get(info["id"])
            alive = proc.poll() is None if proc is not None else _pid_alive(info["pid"])
            if not alive:
                code = proc.returncode if proc is not None else None
                # the process may have written its final status just before exiting
                latest = self.registry.get_session(info["id"])
                if latest["status"] in ACTIVE:
                    self.registry.update_session(
                        info["id"], status="crashed",
                        error=f"session process exited unexpectedly (exit code {code})")

    def stop(self, session_id: int, timeout: float = 10.0) -> None:
        info = self.registry.get_session(session_id)
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
        elif proc is None and info["status"] in ACTIVE and _pid_alive(info["pid"]):
            os.kill(info["pid"], signal.SIGTERM)
        if self.registry.get_session(session_id)["status"] in ACTIVE:
            self.registry.update_session(session_id, status="stopped")

    def stop_all(self) -> None:
        for sid, proc in list(self._procs.items()):
            if proc.poll() is None:
                self.stop(sid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()


if __name__ == "__main__":  # python -m xflwb.server.session DATA_DIR DB_URL SESSION_ID
    run_session(sys.argv[1], sys.argv[2], int(sys.argv[3]))
