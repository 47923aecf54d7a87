"""The notebook's handle on a session, and what is said about a session row.

``Session`` reads everything from the registry (the session's process writes it), so a
handle works for phone sessions and simulations alike and for sessions another process
started. The ``SessionManager`` behind it launches, watches and stops the processes.
"""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from xflwb.bridge.arrays import Array
from xflwb.errors import SessionFailure
from xflwb.federation.fairness import fairness_by_round
from xflwb.sessions.checkpoints import newest_valid_checkpoint
from xflwb.sessions.ending import end_reason, needs_history
from xflwb.sessions.options import is_asynchronous
from xflwb.sessions.process import progress_path
from xflwb.sessions.registry import ARRIVAL_COLUMNS, Registry, RegistryError
from xflwb.sessions.status import DONE, SessionStatus

if TYPE_CHECKING:
    from xflwb.sessions.manager import SessionManager


#: what an interrupted ``wait`` says (the session and its devices carry on)
STILL_RUNNING = ("session {id} is still running (only the wait was interrupted); "
                 "session.stop() (or wb.session({id}).stop()) stops it")


class Session:
    """The notebook's handle on one session (state lives in the registry).

    A handle made with ``owns_manager=True`` (``xflwb.simulate`` without a Workbench) owns
    its ``SessionManager``: it closes it (``close``) once it sees the session end (``wait``,
    ``stop``), when closed or garbage-collected. A Workbench's handles own nothing:
    ``wb.stop()`` stops and closes the Workbench's manager."""

    def __init__(self, manager: SessionManager, session_id: int, *,
                 owns_manager: bool = False) -> None:
        self._manager = manager
        self.id = session_id
        self._owns_manager = owns_manager
        if owns_manager:  # a dropped handle releases its manager too
            weakref.finalize(self, manager.close)

    def close(self) -> None:
        """Release what this handle owns (its manager's database connections, when it owns
        one). The session itself carries on (``stop()`` stops it) and the handle stays
        readable: each later read opens the database for itself alone."""
        if self._owns_manager:
            self._manager.close()

    @property
    def registry(self) -> Registry:
        return self._manager.registry

    @property
    def info(self) -> dict[str, Any]:
        self._manager.refresh()
        return self.registry.get_session(self.id)

    @property
    def status(self) -> str:
        status: str = self.info["status"]
        return status

    @property
    def ports(self) -> dict[str, int]:
        ports: dict[str, int] = self.info["ports"]
        return ports

    @property
    def round(self) -> int:
        return int(self.info["round"])

    @property
    def started_from(self) -> str:
        """What this session's global model started from, for cell outputs and dashboard
        headers: ``"started fresh"`` or ``"resumed from session 1, round 5"``."""
        return started_from(self.registry, self.info)

    @property
    def end_reason(self) -> str | None:
        """Why the session ended, in words (``xflwb.sessions.ending.end_reason``): "finished
        all 8 rounds", "privacy budget spent at ε = … after round 6", "failed: …",
        "stopped by the user"; None while it runs."""
        return session_end_reason(self.registry, self.info)

    @property
    def parameter_count(self) -> int:
        """How many numbers the model trains and sends (its canonical parameters), which
        the DP noise warning weighs against the clients per round."""
        manifest = self.registry.get_model(self.info["model_id"])["manifest"]
        return parameter_count(manifest)

    def __repr__(self) -> str:
        i = self.info
        cfg = i["config"]
        where = (f"simulated android={cfg['android']} ios={cfg['ios']}"
                 if i["engine"] == "simulation" else f"ports={i['ports']}")
        why = session_end_reason(self.registry, i)
        ended = f"end_reason={why!r}, " if why else ""
        return (f"Session(id={self.id}, model={i['model_name']!r}, status={i['status']!r}, "
                f"round={i['round']}/{cfg['rounds']}, {ended}{started_from(self.registry, i)}, "
                f"{where})")

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the session ends; returns its final status (``failed`` carries the
        reason in ``session.error``). After ``timeout`` seconds raises ``SessionTimeout``
        (a ``TimeoutError``) saying what the session is waiting for and the last device
        errors. Interrupted (JupyterLab's Stop), it raises ``KeyboardInterrupt`` saying the
        session is still running: only the wait stops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                status = self.status
                if status in DONE:
                    self.close()  # ended: an owned manager has nothing left to watch
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise SessionTimeout(self.explain(after=timeout))
                time.sleep(poll)
        except KeyboardInterrupt:  # the notebook's Stop: its processes never see the SIGINT
            raise KeyboardInterrupt(STILL_RUNNING.format(id=self.id)) from None

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
        status: str = info["status"]
        if status in DONE:
            return status
        if info["status"] == SessionStatus.STARTING:
            return "its process is starting"
        p = self.progress
        rnd = p.get("round", int(info["round"]) + 1)
        unit = "model version" if is_asynchronous(info["config"]) else "round"
        if p.get("phase") == "waiting":
            return (f"waiting for {p['needed']} clients before {unit} {rnd} "
                    f"(min_clients={p['needed']}); {p['connected']} connected")
        if p.get("phase") in ("fit", "evaluate"):
            verb = "training" if p["phase"] == "fit" else "evaluating"
            return f"{verb} round {rnd} on {p.get('selected', '?')} clients"
        if p.get("phase") == "fedbuff":  # asynchronous: versions, not rounds
            return (f"building model version {rnd} (FedBuff): {p.get('selected', '?')} of "
                    f"{p.get('connected', '?')} connected clients training")
        return f"starting its first {unit}"

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
        from xflwb.federation.report import summarize

        when = f" after {after:g} s" if after is not None else ""
        return (f"session {self.id} is still at round {info['round']}/"
                f"{info['config']['rounds']}{when}: {self.doing(info)}; last device errors: "
                f"{summarize(errors) if errors else 'none reported'} (log: "
                f"{self._manager.log_dir / f'session-{self.id}.log'})")

    def stop(self) -> None:
        self._manager.stop(self.id)
        self.close()

    @property
    def history(self) -> pd.DataFrame:
        """Long table: round, platform (android | ios | all), metric, value."""
        return history_frame(self.registry, self.id)

    @property
    def client_metrics(self) -> pd.DataFrame:
        """Every client's evaluation, one row each: ``round`` (FedBuff: the version
        evaluated), ``platform``, ``client``, ``examples``, ``loss``, ``accuracy`` (NaN when
        the client reported none: a phone whose telemetry has not arrived or did not match,
        a row of an older xflwb). The history's ``accuracy_p10`` … ``eval_clients`` are
        these accuracies summarised per round (``xflwb.federation.fairness``).

        Read from the registry in one query, so it survives restarts and works on a
        finished session. It has one row per client evaluation: rounds × clients evaluated
        per round (100 rounds over 1,000 simulated clients: 100,000 rows, about 15 MB and
        under a second to read); read it once and filter the frame, not in a loop."""
        return client_metrics_frame(self.registry, self.id)

    @property
    def rejections(self) -> pd.DataFrame:
        return pd.DataFrame(self.registry.get_rejections(self.id),
                            columns=["round", "platform", "client", "reason"])

    @property
    def arrivals(self) -> pd.DataFrame:
        """FedBuff: every update that reached the server, applied or rejected, with the
        version it went into, its staleness and weight (``ARRIVAL_COLUMNS``); empty for
        synchronous sessions."""
        return arrivals_frame(self.registry.get_arrivals(self.id))

    def global_parameters(self) -> list[Array]:
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


class SessionTimeout(SessionFailure, TimeoutError):
    """``Session.wait`` ran out of time; the message says what the session waits for."""




def session_end_reason(registry: Registry, info: dict[str, Any]) -> str | None:
    """``end_reason`` of a registry row, reading its metrics only when they decide it."""
    history = history_frame(registry, info["id"]) if needs_history(info) else None
    return end_reason(info, history)


def parameter_count(manifest: dict[str, Any]) -> int:
    """The number of scalars in a manifest's canonical (trained, sent) parameters."""
    return int(sum(int(np.prod(p["shape"])) for p in manifest.get("parameters") or []))


def resumes(config: dict[str, Any]) -> bool:
    """Whether a stored session config asked to resume (rows written before ``resume``
    existed resumed unless ``start_fresh``)."""
    return bool(config.get("resume", not config.get("start_fresh", False)))


def started_from(registry: Registry, info: dict[str, Any]) -> str:
    """``"resumed from session 1, round 5"`` or ``"started fresh"``, from a session row.

    A session's first checkpoint holds the weights it started from (round 0, or the round
    it resumed from), so a resume from it names where those came from. A resumed session
    numbers its rounds on from the round it resumed from."""
    ckpt_id = info.get("resumed_from")
    if ckpt_id is None:
        if info["status"] == SessionStatus.STARTING:
            return "starting"
        if resumes(info["config"]) and info["engine"] != "simulation":
            return "started fresh (nothing to resume)"
        return "started fresh"
    origin = registry.resume_origin(ckpt_id)
    if "missing" in origin:
        return f"resumed from checkpoint {origin['missing']} (no longer in the registry)"
    if origin["exported"]:
        return f"resumed from session {origin['session_id']}, round 0 (the exported weights)"
    return f"resumed from session {origin['session_id']}, round {origin['round']}"


def history_frame(registry: Registry, session_id: int) -> pd.DataFrame:
    """round, platform, metric, value; a FedBuff session also gets ``version`` (= round),
    so plots and readers can tell versions from synchronous rounds."""
    info = registry.get_session(session_id)
    rows = registry.get_metrics(session_id)
    rows += registry.accuracy_metrics(session_id)
    rows += telemetry_fairness(registry, info, rows)
    df = pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])
    df = df.sort_values(["round", "platform", "metric"], kind="stable").reset_index(drop=True)
    if is_asynchronous(info["config"]):
        df["version"] = df["round"]
    return df


#: the columns of ``Session.client_metrics``, in order
CLIENT_METRIC_COLUMNS = ("round", "platform", "client", "examples", "loss", "accuracy")


def client_metrics_frame(registry: Registry, session_id: int) -> pd.DataFrame:
    """``Session.client_metrics`` of a registry's session (typed columns, also when
    empty)."""
    df = pd.DataFrame(registry.client_evaluations(session_id),
                      columns=list(CLIENT_METRIC_COLUMNS))
    return df.astype({"round": "int64", "platform": object, "client": object,
                      "examples": "int64", "loss": "float64", "accuracy": "float64"})


def telemetry_fairness(registry: Registry, info: dict[str, Any],
                       stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A phone session's per-round accuracy spread (``xflwb.federation.fairness``) for the
    rounds whose stored metrics have none: FedKit phones report accuracy as telemetry,
    after their EvaluateRes was aggregated, so the spread is summarised here from the
    matched accuracies (as ``Registry.accuracy_metrics`` does for the mean). Simulations
    record theirs with each round: nothing to add."""
    if info["engine"] != "phone":
        return []
    recorded = {r["round"] for r in stored if r["metric"] == "eval_clients"}
    cm = client_metrics_frame(registry, info["id"])
    cm = cm[~cm["round"].isin(recorded)]
    return fairness_by_round(cm["round"].to_numpy(), cm["platform"].to_numpy(),
                             cm["accuracy"].to_numpy())


def arrivals_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Arrival rows as a frame with ``ARRIVAL_COLUMNS`` in order (none: an empty frame)."""
    return pd.DataFrame(rows, columns=list(ARRIVAL_COLUMNS))

