"""The parent side of sessions: launch their processes, notice when one dies, stop them.

``SessionManager`` lives in the notebook kernel (or the HTTP API): it records a session row,
runs ``python -m <module>`` on it and hands back a ``Session``. The caller names the module
(the phone session's, through ``xflwb.server.phone_sessions``; the simulation's, through
``start_engine``): the manager sits below the engines and knows none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from xflwb import _lifeline
from xflwb.errors import SessionFailure
from xflwb.sessions.handle import Session, SessionTimeout
from xflwb.sessions.registry import Registry
from xflwb.sessions.status import ACTIVE, SessionStatus

log = logging.getLogger(__name__)

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
    from xflwb.federation.report import summarize

    errors = [str(r.get("error") or r.get("status") or "?") for r in fleet.statuses()]
    return summarize(errors)



class SessionManager:
    """Starts session processes and notices when one dies."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self.log_dir = registry.data_dir / "logs"
        self._fleets: list[_WatchedFleet] = []
        self._lock = threading.RLock()

    def start(self, model_name: str, config: Any, module: str,
              wait_ready: float = 120.0) -> Session:
        """Record a phone session of the latest ``model_name`` with ``config`` (its
        validated options dataclass: stored as given) and run ``python -m module`` on it.
        At most one phone session of a model is active: of racing starts exactly one wins,
        the others get ``SessionConflict`` (HTTP 409) naming the winner."""
        model = self.registry.latest_model(model_name)
        self.refresh()  # a crashed session must not block the start
        # one transaction + a unique index: of racing starts exactly one wins
        sid = self.registry.create_session(model, config, exclusive=True, engine="phone")
        return self._launch(sid, module, wait_ready)

    def start_engine(self, model: dict[str, Any], config: Any, module: str,
                     wait_ready: float = 120.0, engine: str | None = None) -> Session:
        """Record a session of ``model`` (a registry row) with ``config`` (its validated
        options dataclass) and run
        ``python -m module`` on it. Another engine (``xflwb.simulation``) starts its
        session process through this, so this room need not know the engines above it;
        the handle is a ``Session`` like any other, recorded in the same registry.
        ``engine``: the row's engine (default: the config's ``engine``, "simulation"
        when it names none; phones never join such a session)."""
        sid = self.registry.create_session(
            model, config, engine=engine or str(
                (config.get("engine") if isinstance(config, dict)
                 else getattr(config, "engine", None)) or "simulation"))
        return self._launch(sid, module, wait_ready)

    def _launch(self, sid: int, module: str, wait_ready: float) -> Session:
        # a fresh interpreter (not multiprocessing): no re-import of the caller's __main__,
        # so scripts without a main guard work too; its log goes to data_dir/logs. Its own
        # session: the notebook's Stop (SIGINT to the kernel's process group) does not
        # reach it, and stop() ends its Ray processes with os.killpg on that group
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"session-{sid}.log", "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, str(self.registry.data_dir),
                     self.registry.db_url, str(sid)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True, env=_lifeline.child_env())
        except OSError as exc:  # the row must not stay "starting" (it blocks the model)
            self.registry.update_session(sid, status=SessionStatus.FAILED,
                                         error=f"could not launch its process: {exc}")
            raise SessionFailure(f"session {sid} could not launch its process: {exc}") from exc
        self._procs[sid] = proc
        _lifeline.reap(proc)  # no <defunct> entry once it exits (its exit code stays readable)
        self.registry.update_session(sid, pid=proc.pid)
        session = Session(self, sid)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            info = session.info
            if info["status"] != SessionStatus.STARTING:
                if info["status"] in (SessionStatus.FAILED, SessionStatus.CRASHED):
                    raise SessionFailure(f"session {sid} failed to start: {info['error']}")
                break
            time.sleep(0.05)
        else:
            raise SessionTimeout(f"session {sid} did not start within {wait_ready} s")
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

    @property
    def fleets(self) -> list[Any]:
        """The fleets watched (``watch_fleet``), oldest first: the one record of them."""
        with self._lock:
            return [w.fleet for w in self._fleets]

    def stop_fleets(self) -> None:
        """Stop every watched fleet and forget it (stopped devices fail no session)."""
        with self._lock:
            fleets, self._fleets = [w.fleet for w in self._fleets], []
        for fleet in fleets:
            fleet.stop()

    def device_errors(self, session_id: int, last: int = 50) -> list[str]:
        """Recent failure reasons of the session's clients, then its watched fleets'
        device errors (a device that died before joining never reached the session)."""
        out = [f"{f['reason']}" for f in self.registry.get_failures(session_id, last=last)]
        info = self.registry.get_session(session_id)
        if info["engine"] == "simulation":
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
        self.registry.update_session(session_id, status=SessionStatus.FAILED, error=reason)
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
                           if s["engine"] != "simulation"
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
            self.registry.update_session(session_id, status=SessionStatus.STOPPED)

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

    def close(self) -> None:
        """Release the registry's connections (``Registry.close``): its owner is done with
        it. Sessions still running carry on (``stop_all`` first stops them)."""
        self.registry.close()

    def stop_all(self) -> None:
        for sid, proc in list(self._procs.items()):
            if proc.poll() is None:
                self.stop(sid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()

