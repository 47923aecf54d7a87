"""Results where researchers keep them: TensorBoard event files and MLflow runs.

A session or simulation with ``tracking=["tensorboard", "mlflow"]`` logs what its round
recorders persist (``xflwb.sessions.process.round_recorders``: per-platform accuracy,
eval_loss, clients, examples, bytes, rejected, ε, staleness, …) to each backend as it goes,
tag ``<platform>/<metric>`` at step = round (FedBuff: model version), plus the session's
options as hyperparameters. When the run ends, whatever the registry holds that was not
logged yet (the budget-spent round, telemetry accuracy) is logged too, so the tracked
metrics equal ``session.history``; MLflow also gets the manifest, the final checkpoint and
the HTML report as artifacts.

One :class:`Tracker` per backend, registered by name in :data:`BACKENDS`; a
:class:`Tracking` composes the requested ones for one session process. A tracker that
fails (disk full, an MLflow server down) is logged and dropped: training goes on, as it
does when a checkpoint cannot be written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from xflwb.errors import InputError

log = logging.getLogger(__name__)

#: (platform, metric, value) triples, as ``Registry.add_metrics`` takes them
Metrics = list[tuple[str, str, float | None]]


class Tracker(ABC):
    """One tracking backend for one session: opened once, a call per round, closed once."""

    #: the name ``tracking=`` takes
    name: ClassVar[str]
    #: the module it needs and how to install it (None: always there)
    module: ClassVar[str | None] = None
    install: ClassVar[str] = ""

    @classmethod
    def check(cls) -> None:
        """Raise ``ValueError`` with the fix when the backend cannot run here (at config
        time: before any process starts)."""
        if cls.module is not None and not _installed(cls.module):
            raise InputError(f"tracking={cls.name!r} needs {cls.module}, which is not "
                             f"installed: {cls.install}")

    @abstractmethod
    def open(self, where: Path, uri: str | None, config: dict[str, Any],
             session: dict[str, Any]) -> None:
        """Start the run of ``session`` (its registry row) under ``where`` (the tracking
        directory) or at ``uri``; ``config`` is the stored session options."""

    @abstractmethod
    def log_round(self, rnd: int, metrics: Metrics) -> None:
        """Log one round's (platform, metric, value) triples at step ``rnd``."""

    @abstractmethod
    def close(self, status: str, artifacts: dict[str, Path]) -> None:
        """End the run with the session's final ``status``; ``artifacts`` (name → file)
        go where the backend keeps files (a backend without files ignores them)."""


#: the backends by name (``register`` adds one)
BACKENDS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make ``cls`` available as ``tracking=cls.name``."""
    BACKENDS[cls.name] = cls
    return cls


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def normalize(tracking: Any) -> list[str] | None:
    """``"tensorboard"``, ``"tensorboard,mlflow"`` or a list of names → the sorted-unique
    list (None or empty: None); an unknown name raises ``ValueError`` with "did you mean",
    a backend that is not installed raises with the ``pip install`` that fixes it."""
    if tracking is None:
        return None
    if isinstance(tracking, str):
        tracking = [part for part in tracking.split(",")]
    if not isinstance(tracking, list | tuple) or not all(isinstance(t, str) for t in tracking):
        raise InputError(f"tracking must be a backend name or a list of them "
                         f"({', '.join(map(repr, BACKENDS))}), got {tracking!r}")
    names = list(dict.fromkeys(t.strip().lower() for t in tracking if t.strip()))
    for n in names:
        if n not in BACKENDS:
            from xflwb._argparse import suggest

            found = suggest(n, BACKENDS)
            hint = f"did you mean {' or '.join(map(repr, found))}? " if found else ""
            raise InputError(f"tracking={n!r} is not a tracking backend: {hint}it takes "
                             f"{', '.join(map(repr, BACKENDS))}")
        BACKENDS[n].check()
    return names or None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The session options as hyperparameters: scalars as they are, nested dicts flattened
    (``privacy.noise_multiplier``), lists and None as text (TensorBoard's hparams and
    MLflow's params take scalars only)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        elif isinstance(value, bool | int | str) or (isinstance(value, float)
                                                     and math.isfinite(value)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def run_name(session: dict[str, Any]) -> str:
    """``session-3`` / ``simulation-4``: how each backend names the session's run."""
    kind = "simulation" if session.get("engine") == "simulation" else "session"
    return f"{kind}-{session['id']}"


# -- TensorBoard ---------------------------------------------------------------------------
@register
class TensorBoard(Tracker):
    """Event files under ``<tracking_dir>/tensorboard/<model>/<run>`` (``tensorboard
    --logdir <tracking_dir>/tensorboard`` shows every session as a run).

    Written without TensorFlow: session processes never import it (seconds and hundreds
    of MB each). ``tf.summary`` and even ``tensorboard.summary.Writer`` /
    ``EventFileWriter`` import TensorFlow when it is installed (they open files through
    ``tf.io.gfile``), so the event file is opened here with plain ``open`` and written
    with TensorBoard's own pieces: ``RecordWriter`` (the TFRecord framing and CRCs),
    ``event_pb2`` and the scalar and hparams plugins' ``*_pb`` summaries."""

    name = "tensorboard"

    def open(self, where: Path, uri: str | None, config: dict[str, Any],
             session: dict[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event = event_pb2.Event
        self.logdir = where / "tensorboard" / str(session["model_name"]) / run_name(session)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # the file name TensorBoard's EventFileWriter gives (its reader looks for it)
        path = self.logdir / (f"events.out.tfevents.{int(time.time()):010d}."
                              f"{socket.gethostname()}.{os.getpid()}.0")
        self._writer = RecordWriter(open(path, "wb"))  # noqa: SIM115 (closed in close)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=hparams_pb(
            flat_params(config), trial_id=run_name(session))))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()  # live: TensorBoard shows each round as it lands

    def log_round(self, rnd: int, metrics: Metrics) -> None:
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        now = time.time()
        for platform, metric, value in metrics:
            if value is not None and math.isfinite(float(value)):
                self._writer.write(self._event(
                    wall_time=now, step=int(rnd),
                    summary=scalar_pb(f"{platform}/{metric}", float(value)))
                    .SerializeToString())
        self._writer.flush()

    def close(self, status: str, artifacts: dict[str, Path]) -> None:
        self._writer.close()


# -- MLflow --------------------------------------------------------------------------------
@register
class MLflow(Tracker):
    """One MLflow run per session in the experiment named after the model.

    Default store: SQLite at ``<tracking_dir>/mlruns/mlflow.db`` with artifacts in
    ``<tracking_dir>/mlruns/artifacts`` (MLflow 3 refuses its plain ``./mlruns`` file store
    unless ``MLFLOW_ALLOW_FILE_STORE`` is set; SQLite is the local store it recommends).
    ``tracking_uri`` points elsewhere (an ``http://`` tracking server)."""

    name = "mlflow"
    module = "mlflow"
    install = "pip install 'xflwb[mlflow]' (or pip install mlflow)"

    #: MLflow's final run states by session status
    STATES: ClassVar[dict[str, str]] = {"finished": "FINISHED", "stopped": "KILLED"}

    def open(self, where: Path, uri: str | None, config: dict[str, Any],
             session: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        store = where / "mlruns"
        if uri is None:
            store.mkdir(parents=True, exist_ok=True)
            uri = store_uri(where)
        self.client = MlflowClient(tracking_uri=uri)
        name = str(session["model_name"])
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    name, artifact_location=(store / "artifacts").resolve().as_uri()
                    if uri.startswith("sqlite:") else None)
            except Exception:  # a sibling session created it first
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name(session), tags={
            "xflwb.session_id": str(session["id"]),
            "xflwb.engine": str(session.get("engine") or "flower"),
            "xflwb.model_version": str(session.get("model_version", ""))})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, rnd: int, metrics: Metrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(f"{p}/{k}", float(v), now, int(rnd)) for p, k, v in metrics
                if v is not None and math.isfinite(float(v))]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def close(self, status: str, artifacts: dict[str, Path]) -> None:
        for name, path in artifacts.items():
            try:
                self.client.log_artifact(self.run_id, str(path))
            except Exception as exc:  # the run still ends with its status
                log.error("mlflow: artifact %s (%s) not logged: %s", name, path, exc)
        self.client.set_terminated(self.run_id, self.STATES.get(status, "FAILED"))


def store_uri(tracking_dir: str | Path) -> str:
    """The default MLflow tracking URI of a tracking directory (``mlflow ui
    --backend-store-uri`` takes it)."""
    return "sqlite:///" + str((Path(tracking_dir) / "mlruns" / "mlflow.db").resolve())


def tracking_dir(data_dir: str | Path, configured: str | None) -> Path:
    """Where tracked runs go: ``configured``, else ``<data_dir>/tracking``."""
    return Path(configured) if configured else Path(data_dir) / "tracking"


# -- one session's trackers ------------------------------------------------------------------
class Tracking:
    """The requested trackers of one session process, behind one lock (FedBuff records
    from its loop thread, Flower from its own)."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)
        self._lock = threading.Lock()
        self._logged: set[tuple[int, str, str]] = set()
        self._closed = False

    @classmethod
    def open(cls, data_dir: str | Path, config: dict[str, Any],
             session: dict[str, Any]) -> Tracking | None:
        """The trackers ``config["tracking"]`` asks for, opened (None when it asks for
        none). A backend that cannot open is logged and left out."""
        names = config.get("tracking") or []
        where = tracking_dir(data_dir, config.get("tracking_dir"))
        opened = []
        for n in names:
            tracker = BACKENDS[n]()
            try:
                tracker.open(where, config.get("tracking_uri"), config, session)
            except Exception as exc:
                log.error("tracking %r not started (%s: %s); training goes on", n,
                          type(exc).__name__, exc)
            else:
                opened.append(tracker)
                log.info("tracking %s of session %s in %s", n, session["id"], where)
        return cls(opened) if names else None

    def _each(self, what: str, fn: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                fn(tracker)
            except Exception as exc:
                log.error("tracking %r: %s failed (%s: %s); it is dropped, training goes on",
                          tracker.name, what, type(exc).__name__, exc)
                self.trackers.remove(tracker)

    def log_round(self, rnd: int, metrics: Metrics) -> None:
        """Log a round's metrics (each (round, platform, metric) once: the registry's
        first value of it, as ``session.history`` shows it first)."""
        with self._lock:
            self._log_round(rnd, metrics)

    def _log_round(self, rnd: int, metrics: Metrics) -> None:
        fresh = [(p, k, v) for p, k, v in metrics if (rnd, p, k) not in self._logged]
        self._logged.update((rnd, p, k) for p, k, _ in fresh)
        if fresh and not self._closed:
            self._each("log_round", lambda t: t.log_round(rnd, fresh))

    def close(self, registry: Any, session_id: int, light: bool = False) -> None:
        """Log what the registry holds beyond the logged rounds, hand the artifacts over
        and end each run with the session's status. ``light`` (SIGTERM: the process exits
        right after): no HTML report. The lock is awaited a bounded time: SIGTERM's
        handler may interrupt the very thread that holds it."""
        from xflwb.sessions.handle import history_frame

        if not self._lock.acquire(timeout=10):
            log.warning("tracking: runs not closed (a round was still being logged)")
            return
        try:
            if self._closed:
                return
            with contextlib.suppress(Exception):
                by_round: dict[int, Metrics] = {}
                for r in history_frame(registry, session_id).itertuples():
                    value = (None if r.value is None or math.isnan(r.value)
                             else float(r.value))
                    by_round.setdefault(int(r.round), []).append((r.platform, r.metric,
                                                                 value))
                for rnd, metrics in sorted(by_round.items()):
                    self._log_round(rnd, metrics)
            info = registry.get_session(session_id)
            with tempfile.TemporaryDirectory(prefix="xflwb-tracking-") as tmp:
                artifacts = artifacts_of(registry, info, Path(tmp), report=not light)
                self._closed = True
                self._each("close", lambda t: t.close(str(info["status"]), artifacts))
        finally:
            self._lock.release()


def artifacts_of(registry: Any, info: dict[str, Any], tmp: Path, report: bool = True
                 ) -> dict[str, Path]:
    """The files a run keeps: the model's manifest, the session's final checkpoint and
    (``report``) the HTML report, each only if it can be had."""
    out: dict[str, Path] = {}
    with contextlib.suppress(Exception):
        manifest = registry.get_model(info["model_id"])["manifest"]
        path = tmp / "manifest.json"
        path.write_text(json.dumps(manifest, indent=1))
        out["manifest"] = path
    with contextlib.suppress(Exception):
        newest = registry.checkpoints_newest_first(info["model_name"], session_id=info["id"])
        if newest and Path(newest[0]["path"]).is_file():
            out["model"] = Path(newest[0]["path"])
    if report:
        try:
            path = tmp / "report.html"
            path.write_text(report_html(registry, info["id"]))
            out["report"] = path
        except Exception as exc:
            log.warning("tracking: the HTML report could not be built (%s: %s)",
                        type(exc).__name__, exc)
    return out


def report_html(registry: Any, session_id: int) -> str:
    """The run's HTML report, built in the session process from the registry (matplotlib,
    no TensorFlow): why it ended, the per-platform loss / accuracy (and ε) plot and the
    bytes on the wire (with the compression ratio) and the per-round table, drawn by
    ``xflwb.style`` as the dashboard draws them; a simulation on the virtual clock also
    plots against simulated time and shows participation per platform, and per-client
    evaluations show accuracy across clients. (The dashboard's own snapshot is a
    front-end view, which the hosts do not import.)"""
    import html

    from xflwb.sessions.ending import end_reason
    from xflwb.sessions.handle import history_frame
    from xflwb.style import (
        default_x,
        fairness_html,
        figure_png,
        history_wide,
        img_html,
        participation_html,
        plot_figure,
        table_html,
        traffic_html,
    )

    info = registry.get_session(session_id)
    history = history_frame(registry, session_id)
    privacy = (info.get("config") or {}).get("privacy") or {}
    png = figure_png(plot_figure(history, x=default_x(history),
                                 max_epsilon=privacy.get("max_epsilon")))
    step = "version" if "version" in history.columns else "round"
    wide = history_wide(history).reset_index() if len(history) else history
    why = end_reason(info, history) or str(info.get("status", ""))
    title = html.escape(run_name(info))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>xflwb report: "
            f"{title}</title></head><body><h2>{title}</h2>"
            f"<p>{html.escape(str(info.get('model_name', '')))} · "
            f"{html.escape(str(info.get('status', '')))} · {html.escape(why)}</p>"
            f"{img_html(png)}{fairness_html(history, client_metrics_of(registry, session_id))}"
            f"{participation_html(history, step)}{traffic_html(history, info.get('config'))}"
            f"{table_html(wide)}"
            "</body></html>")


def client_metrics_of(registry: Any, session_id: int) -> Any:
    """The session's per-client evaluations as a frame (round, platform, client, examples,
    loss, accuracy) when the registry keeps them, else None: the report then shows the
    accuracy percentiles without the ECDF."""
    from xflwb.sessions.handle import client_metrics_frame

    try:
        frame = client_metrics_frame(registry, session_id)
    except Exception as exc:  # the report must not fail on one panel
        log.warning("tracking: per-client evaluations unreadable (%s: %s)",
                    type(exc).__name__, exc)
        return None
    return frame if len(frame) else None
