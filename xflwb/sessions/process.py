"""The one skeleton of a session process, phone session or simulation alike.

Both run as ``python -m <module> DATA_DIR DB_URL SESSION_ID`` (a process per session, so a
crash or ``stop()`` never takes the notebook kernel or a sibling down) and share every step
but the training itself: a labelled logger, BLAS pinned to one thread, the registry, a stop
flag and the SIGTERM handler that marks the row ``stopped``, loading the row's config and
model, the strategy wired to the recorders below, the checkpoint of the starting weights,
the status transitions and the cleanup. ``SessionProcess`` is that skeleton; each engine's
``run`` fills in how its clients are served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from xflwb import _lifeline
from xflwb.bridge.arrays import Array
from xflwb.federation.aggregate import pin_blas_threads
from xflwb.sessions.checkpoints import (
    CheckpointError,
    Retention,
    prune_checkpoints,
    save_checkpoint,
    sweep_pruned,
)
from xflwb.sessions.options import RoundOptions
from xflwb.sessions.registry import Registry
from xflwb.sessions.status import ACTIVE, SessionStatus

log = logging.getLogger(__name__)

_Options = TypeVar("_Options", bound=RoundOptions)


class Housekeeping:
    """Work a round leaves behind that no later step waits for (pruning old checkpoints,
    the session row's round counter, the progress file), done on one background thread,
    in order, off the round's critical path; ``flush`` waits for it (a session flushes
    before it records how it ended, so a finished session's checkpoints are already
    pruned and its row counts every round). What a model's release waits for (the privacy
    ledger, the metrics, the checkpoint itself) is still written before ``on_fit`` returns.

    Pruning reads the newest checkpoint back to verify it before anything older goes:
    1–2 ms a round at 50 phones, and up to 10 ms on a busy machine, between one round's
    model and the next round's FitIns; here it overlaps the next round's fits instead."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="housekeeping")
        self._pending: list[Any] = []
        self._lock = threading.Lock()

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the work already queued (its exceptions are ``fn``'s to log)."""
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(fn))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout`` seconds) for the queued work."""
        from concurrent.futures import wait

        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout)

    def close(self) -> None:
        """Finish the queued work, then let the thread end."""
        self.flush()
        self._pool.shutdown(wait=False)


def round_recorders(registry: Registry, session_id: int, model: dict[str, Any],
                    offset: int = 0, private: bool = False,
                    retention: Retention | None = None, tracking: Any = None,
                    later: Callable[[Callable[[], None]], None] | None = None
                    ) -> tuple[Callable[[Any, list[Array]], None], Callable[[Any], None]]:
    """The strategy's per-round callbacks that persist metrics, rejections, evaluations and
    a checkpoint; shared by phone sessions and simulations so both record the same way.

    ``offset``: the round a resumed session continues from (its Flower round 1 is recorded
    as round ``offset + 1``); the session row's ``round`` counts this session's rounds.
    ``private``: the session runs central DP (each round's ``privacy_event`` is the
    ledger); without it every round that releases a model is recorded as a noiseless event,
    so a DP session resuming this lineage knows its ε is infinite.
    ``retention``: which older checkpoints go once a round's is written (default: keep
    the last ``DEFAULT_KEEP``).
    ``tracking``: an ``xflwb.sessions.tracking.Tracking`` that gets each round's metrics too.
    ``later``: runs pruning and the session row's round counter off the round's critical
    path (``Housekeeping.later``); None: both before ``on_fit`` returns."""
    retention = retention or Retention()

    def prune(rnd: int) -> None:
        try:
            prune_checkpoints(registry, session_id, model, retention)
        except Exception as exc:  # the registry busy, ...: the next round prunes again
            log.error("round %s: older checkpoints not pruned (%s: %s)", rnd,
                      type(exc).__name__, exc)

    def on_fit(report: Any, global_: list[Array]) -> None:
        rnd = report.round + offset
        # first: the lineage's ledger holds the round before its model is released (the
        # checkpoint below, the next round's FitIns), so a crash can only over-count
        event = getattr(report, "privacy_event", None)
        if event is not None:
            registry.add_privacy_event(session_id, rnd, event.population, event.sample_size,
                                       event.noise_multiplier, event.target_delta)
        elif not private and not getattr(report, "failed", None):
            registry.add_privacy_event(session_id, rnd, 0, 0, 0.0)
        registry.add_metrics(session_id, rnd, report.metrics)
        if tracking is not None:
            tracking.log_round(rnd, report.metrics)
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
        else:  # pruned only once the new one is safely written
            if later is None:
                prune(rnd)
            else:
                later(lambda: prune(rnd))
        if later is None:
            registry.update_session(session_id, round=report.round)
        else:  # the row's round counter (dashboards): after the checkpoint, in order
            later(lambda: registry.update_session(session_id, round=report.round))

    def on_eval(report: Any) -> None:
        rnd = report.round + offset
        registry.add_metrics(session_id, rnd, report.metrics)
        if tracking is not None:
            tracking.log_round(rnd, report.metrics)
        registry.add_evaluations(session_id, rnd, report.evaluations)
        for platform, cid, reason in getattr(report, "rejections", []):  # bad EvaluateRes
            registry.add_rejection(session_id, rnd, platform, cid, reason)

    return on_fit, on_eval


def process_logger(label: str) -> logging.Logger:
    """The ``xflwb`` logger of a session or simulation process, labelled in its log file.

    Flower logs through its own handler (its colours off: the log is a file); xflwb's
    loggers get one too (no root config)."""
    from xflwb._plain_logs import PlainFormatter, plain_logs

    plain_logs()
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter(f"%(asctime)s {label} %(name)s: %(message)s"))
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

def only_if_active(registry: Registry, session_id: int, **values: Any) -> None:
    """Update the session unless it already ended (a session failed from outside, e.g. by
    its fleet dying, is stopped with SIGTERM and must stay failed)."""
    with contextlib.suppress(Exception):
        if registry.get_session(session_id)["status"] not in ACTIVE:
            return
    registry.update_session(session_id, **values)


class SessionProcess:
    """A session process's life around its training: ``with SessionProcess(...) as p:``.

    Entering installs the SIGTERM handler (and the lifeline: SIGTERM when the kernel that
    started us dies); leaving records how the run ended (``fail``/``finish`` inside say it
    explicitly; an exception is ``failed`` with its traceback, a ``CheckpointError`` with
    its message alone), runs the ``on_exit`` hooks and closes the registry. SIGTERM marks
    the row ``stopped``, runs the ``on_stop`` hooks and exits at once."""

    def __init__(self, kind: str, data_dir: str, db_url: str, session_id: int) -> None:
        self.kind, self.session_id, self.data_dir = kind, session_id, data_dir
        #: the ``xflwb`` logger, labelled ``<kind>-<id>`` in the session's log file
        self.log = process_logger(f"{kind}-{session_id}")
        # aggregation is this process's numeric work; devices and Ray's workers (other
        # processes) share the CPUs and keep their own threads
        pin_blas_threads()
        self.registry = Registry(data_dir, db_url)
        #: set by SIGTERM: the run is being stopped, not failing
        self.stopping = threading.Event()
        self._on_stop: list[Callable[[], None]] = []
        self._on_exit: list[Callable[[], None]] = []
        #: which checkpoints stay on disk, from the config ``load`` reads
        self.retention = Retention()
        #: pruning off the rounds' critical path, flushed before the session's end is recorded
        self.housekeeping = Housekeeping()
        self._row: dict[str, Any] = {}  # the session row ``load`` read

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when SIGTERM stops the process (it exits right after, skipping
        ``on_exit``): release what must not outlive it (ports, a Ray we started)."""
        self._on_stop.append(fn)

    def on_exit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the run ends in any other way (latest registered first)."""
        self._on_exit.append(fn)

    def handle_sigterm(self) -> None:
        """(Re)install our SIGTERM handler; call again after a library installed its own
        (``ray.init`` does)."""
        signal.signal(signal.SIGTERM, self._term)

    def _term(self, _sig: int, _frame: Any) -> None:
        """The handler runs on the main thread between two of its bytecodes, which may be
        inside a registry write (its SQLite lock held): recording ``stopped`` there would
        wait on that very lock until the lifeline's hard exit. So the stop runs on its own
        thread and the interrupted code goes on (releasing the lock) until it exits."""
        if self.stopping.is_set():
            return  # a second SIGTERM (the lifeline and a stop() at once): one stop
        self.stopping.set()
        threading.Thread(target=self._stop, name="xflwb-stop", daemon=True).start()

    def _stop(self) -> None:
        try:
            self.set_status(SessionStatus.STOPPED, error=_lifeline.stop_reason())
        finally:  # even when the registry cannot be written: the manager marks it then
            for fn in self._on_stop:
                with contextlib.suppress(Exception):
                    fn()
            os._exit(0)

    def __enter__(self) -> SessionProcess:
        self.handle_sigterm()
        _lifeline.install()  # SIGTERM ourselves when the kernel that started us dies
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        try:
            if exc is None:
                return False
            if isinstance(exc, CheckpointError):  # names the files; no traceback
                self.fail(str(exc))
                return True
            if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
                # stopped while a library's own SIGTERM handler (ray.init's: sys.exit) was
                # in place
                self.set_status(SessionStatus.STOPPED, error=_lifeline.stop_reason())
            elif not self.stopping.is_set():  # the session dies, the kernel does not
                self.set_status(SessionStatus.FAILED,
                                error="".join(traceback.format_exception(exc))[-4000:])
            return False
        finally:
            for fn in reversed(self._on_exit):
                with contextlib.suppress(Exception):
                    fn()
            self.housekeeping.close()
            self.registry.close()

    # -- the row -------------------------------------------------------------------------
    def load(self, config_type: type[_Options]) -> tuple[_Options, dict[str, Any]]:
        """The session's config and its model's registry row. The config is rebuilt with
        ``config_type.from_stored`` (not validated again: its starter validated it before
        the registry stored it)."""
        row = self.registry.get_session(self.session_id)
        config = config_type.from_stored(row["config"])
        self.retention = Retention.of(config)
        self._row = row
        return config, self.registry.get_model(row["model_id"])

    def set_status(self, status: SessionStatus, **values: Any) -> None:
        """Record ``status`` (how the session ended) unless the session already ended
        (``only_if_active``), once the rounds' housekeeping is done."""
        self.housekeeping.flush(5.0 if self.stopping.is_set() else 30.0)
        only_if_active(self.registry, self.session_id, status=status, **values)

    def running(self, **values: Any) -> None:
        """The process serves: record ``running``, its pid and ``values`` (ports, ...)."""
        self.registry.update_session(self.session_id, status=SessionStatus.RUNNING,
                                     pid=os.getpid(), **values)

    def finish(self) -> None:
        self.set_status(SessionStatus.FINISHED)

    def fail(self, reason: str) -> None:
        """End as ``failed`` with a reason that needs no traceback (the clients' errors, a
        checkpoint problem)."""
        self.log.error("%s %s failed: %s", self.kind, self.session_id, reason)
        self.set_status(SessionStatus.FAILED, error=reason)

    # -- training ------------------------------------------------------------------------
    def strategy(self, model: dict[str, Any], initial: list[Array],
                 cfg: RoundOptions, offset: int = 0, **extra: Any) -> Any:
        """The ``CrossPlatformStrategy`` for ``model`` starting from ``initial`` with the
        session's loaded options ``cfg`` (``RoundOptions.strategy_arguments``: one place
        maps options to the core), recording each round (``round_recorders``, numbered on
        from ``offset``) and its progress; ``extra``: the engine's own arguments that are
        no option (``secure_sums`` of a SecAgg+ simulation)."""
        from xflwb.sessions.flower_strategy import CrossPlatformStrategy
        from xflwb.sessions.tracking import Tracking

        row = self._row or self.registry.get_session(self.session_id)
        tracking = Tracking.open(self.data_dir, row["config"], row)
        if tracking is not None:  # ends with the run: its status, artifacts, the rest
            self.on_exit(lambda: tracking.close(self.registry, self.session_id))
            self.on_stop(lambda: tracking.close(self.registry, self.session_id, light=True))
        on_fit, on_eval = round_recorders(self.registry, self.session_id, model, offset,
                                          private=cfg.privacy is not None,
                                          retention=self.retention, tracking=tracking,
                                          later=self.housekeeping.later)
        return CrossPlatformStrategy(
            model["manifest"], initial, on_fit_round=on_fit, on_evaluate_round=on_eval,
            on_progress=self._progress(progress_writer(self.data_dir, self.session_id)),
            **cfg.strategy_arguments(), **extra)

    def _progress(self, write: Callable[[dict[str, Any]], None]
                  ) -> Callable[[dict[str, Any]], None]:
        """``write`` on the housekeeping thread: the progress file (what a round waits for)
        is rewritten between a round's model and its FitIns; a failed write is logged, as
        the round's own report of it would be."""

        def safe(state: dict[str, Any]) -> None:
            try:
                write(state)
            except Exception as exc:
                log.warning("progress report failed: %s", exc)

        return lambda state: self.housekeeping.later(lambda: safe(state))

    def save_start(self, model: dict[str, Any], rnd: int, arrays: list[Array],
                   strict: bool = False) -> None:
        """Checkpoint the weights the session starts from, at the round it continues from
        (0 when fresh). Unless ``strict``, a failed write (disk full, read-only folder) is
        logged and training goes on: round 1 writes one again. Also deletes the files a
        crash left behind while pruning (``sweep_pruned``)."""
        try:
            save_checkpoint(self.registry, self.session_id, model, rnd, arrays)
        except Exception as exc:
            if strict:
                raise
            self.log.error("checkpoint of the starting weights not written (%s: %s); "
                           "training goes on", type(exc).__name__, exc)
        try:
            swept = sweep_pruned(self.registry, model["name"])
        except Exception as exc:  # the next session start sweeps again
            self.log.warning("pruned checkpoints not swept (%s: %s)", type(exc).__name__, exc)
        else:
            if swept:
                self.log.info("deleted %s checkpoint file(s) pruned before a crash", swept)
