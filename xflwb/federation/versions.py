"""FedBuff's loop as decisions: who trains, who evaluates, what becomes of each update, when
training stops. No threads, no sockets, no sleeps, no futures.

A host (``xflwb.server.fedbuff`` for phones) owns the transport and the waiting; it tells a
``VersionDriver`` what happened and asks it what to do:

* ``next_jobs()``: the fits and evaluations to start now, on idle connected clients (the
  ``ClientSource``), idle longest first, at most ``max_concurrency`` fits at once, a client
  that failed resting 2, 4, … 30 s (on the injected clock) before it is given work again;
* ``fit_returned`` / ``fit_failed`` / ``evaluated``: what came back. An update is screened
  (``screen``: a revoked client), its staleness checked (``StaleUpdate`` beyond
  ``max_staleness``), validated and mapped (``accept``, injected: the gate), held during
  bounded influence's warm-up, weighed (``Bounds``), buffered; every ``buffer_size`` buffered
  updates make a version (``on_version``). After the stop rule an update is recorded as
  arriving late, never applied. Every update that reached the server is recorded exactly
  once (``on_arrival``).
* ``done()``: the stop rule (``max_versions``, ``max_seconds``); then ``begin_wind_down`` and
  ``wind_down_step`` until it says the session is over.

Errors are decided here too: the last max(``buffer_size``, connected clients,
``min_clients``) fits all failing with errors raise ``AllFitsFailed``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from xflwb.bridge.arrays import Array
from xflwb.errors import SessionFailure
from xflwb.federation.aggregate import update_norm
from xflwb.federation.fedbuff import Arrival, FedBuff, StaleUpdate, VersionBuffer
from xflwb.federation.influence import WARM, PeerWindow, weight_cap
from xflwb.federation.report import Failure
from xflwb.federation.update import Update

__all__ = ["Accept", "AllFitsFailed", "Bounds", "ClientSource", "Evaluation", "Failure",
           "Job", "Returned", "VersionDriver", "VersionMade", "WindDown"]

log = logging.getLogger("xflwb.fedbuff")

#: longest rest (seconds) of a client whose fits keep failing
MAX_REST = 30.0


class ClientSource(Protocol):
    """The connected clients, as the host knows them now."""

    def connected(self) -> Mapping[str, str | None]:
        """client id → its platform (``None`` when it has none)."""
        ...


class Accept(Protocol):
    """The per-update gate: decode, map to canonical space and validate ``result`` against
    ``base`` (the version the client trained from). Raises to reject this update only; a
    ``KeyError`` means a manifest lookup failed (our fault, not the client's) and stops."""

    def __call__(self, platform: str, client: str, result: Any,
                 base: list[Array]) -> Update: ...


class Bounds(Protocol):
    """Bounded influence (``xflwb.federation.influence``) over accepted updates."""

    @property
    def max_weight_ratio(self) -> float | None:
        """Weight cap as a multiple of the recent clients' median claim (None: none)."""
        ...

    @property
    def judges_norms(self) -> bool:
        """Whether updates are rejected by their norm relative to their peers'."""
        ...

    def observe_norm(self, platform: str, client: str, norm: float) -> None:
        """Remember ``client``'s latest (staleness-weighted) norm before it is judged."""
        ...

    def bound(self, platform: str, client: str, tensors: list[Array], examples: int,
              base: list[Array], cap: int | None, scale: float) -> tuple[int, bool]:
        """(examples it counts for, whether ``cap`` cut them); raises to reject it."""
        ...


@dataclass(frozen=True)
class Job:
    """One piece of work for one client: a fit of, or an evaluation of, model ``version``."""

    kind: Literal["fit", "evaluate"]
    client: str
    platform: str
    version: int


@dataclass(frozen=True)
class Returned:
    """What the host measured of a fit besides its payload (for the arrival's row)."""

    examples: int = 0  # as the client claimed (recorded for a late arrival)
    fit_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    #: what the update and the model sent would have cost as float32 (both 4 × elements
    #: of the platform's layout): the compression ratio's reference
    bytes_up_float32: int = 0
    bytes_down_float32: int = 0


@dataclass
class Evaluation:
    """One version's evaluation, on up to ``target`` clients as they become idle."""

    version: int
    target: int
    dispatched: int = 0
    results: list[Any] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)
    #: the clients it was given to (each evaluates a version once)
    clients: set[str] = field(default_factory=set)

    @property
    def returned(self) -> int:
        return len(self.results) + len(self.failures)


@dataclass
class VersionMade:
    """What one version produced, for the host to record (as a round)."""

    number: int  # versions made in this session (a round's number)
    version: int  # the model's version now
    model: list[Array] | None  # None: the step was not finite, the model stays
    applied: list[Arrival]
    rejected: list[Arrival]  # since the last version
    failures: list[Failure]  # since the last version
    error: str | None = None
    #: per platform (and "all"): clients, examples, bytes, staleness, failures, ...
    metrics: list[tuple[str, str, float | None]] = field(default_factory=list)
    #: "all": failures, seconds, version_seconds, buffer_size, aggregate_seconds
    totals: list[tuple[str, str, float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class WindDown:
    """One step after the stop rule: work to start, clients to say goodbye to, and whether
    nothing is left to wait for."""

    start: list[Job]
    goodbye: list[str]
    over: bool


class AllFitsFailed(SessionFailure):
    """The last fits all failed with errors: the next would fail the same way."""

    def __init__(self, reasons: list[str], version: int, summary: str) -> None:
        super().__init__(f"the last {len(reasons)} fits all failed and none succeeded "
                         f"since version {version}: {summary}")
        self.reasons, self.version = reasons, version


class VersionDriver:
    """FedBuff's decisions for one session, driven by its host's events.

    ``initial``/``first_version``: the model the session starts from (a resumed session's
    checkpoint). ``masks``: per platform, the canonical tensors it trains (its keys are the
    platforms served). ``max_versions``: the session's rounds unless ``options`` says.
    ``screen(client)`` raises to refuse a client's results before they are looked at.
    ``summarize`` turns failure reasons into one line."""

    def __init__(self, initial: list[Array], options: FedBuff, *,
                 masks: Mapping[str, list[bool]], accept: Accept, clients: ClientSource,
                 clock: Callable[[], float], max_versions: int, first_version: int = 0,
                 bounds: Bounds | None = None, min_clients: int = 1,
                 fraction_evaluate: float = 0.0, model_name: str = "",
                 screen: Callable[[str], None] | None = None,
                 summarize: Callable[[list[str]], str] = "; ".join,
                 on_arrival: Callable[[Arrival], None] | None = None,
                 on_version: Callable[[VersionMade], None] | None = None,
                 on_evaluated: Callable[[int, list[Any], list[Any]], None] | None = None
                 ) -> None:
        self.options = options
        self.masks = dict(masks)
        self.accept = accept
        self.clients = clients
        self.clock = clock
        self.max_versions = int(options.max_versions or max_versions)
        self.first_version = int(first_version)
        self.bounds = bounds
        self.min_clients = max(1, int(min_clients))
        self.fraction_evaluate = float(fraction_evaluate)
        self.model_name = model_name
        self.screen = screen
        self.summarize = summarize
        self.on_arrival = on_arrival
        self.on_version = on_version
        self.on_evaluated = on_evaluated
        self.buffer = VersionBuffer(initial, first_version, options, self.masks)
        self.running: dict[str, Job] = {}  # client → its job
        self.stopping = False  # the stop rule was met: no fit starts, updates are late
        self._resting: dict[str, float] = {}  # client → time its next job may start
        self._idle_since: dict[str, float] = {}  # client → when its last job came back
        self._errors: dict[str, int] = defaultdict(int)  # client → consecutive errors
        self._errors_in_a_row: list[str] = []  # fit errors since the last accepted update
        self._evals: list[Evaluation] = []
        self._last_evaluated: int | None = None  # the newest version scheduled
        self._rejected: list[Arrival] = []  # since the last version
        self._failures: list[Failure] = []  # since the last version
        self._told: set[str] = set()  # clients told the session is over
        self._start = 0.0
        self._last_version_at = 0.0
        #: bounded influence: each recent client's latest claim (the weight cap is
        #: ``max_weight_ratio`` × their median, the arrival's included); until ``warm``
        #: distinct clients have reported, accepted updates are held (one per client), so
        #: the first ones are judged against each other, not against nothing
        self.claims = PeerWindow()
        self.warm = min(WARM, self.min_clients)
        self.holding = self.warm > 1 and bounds is not None and (
            bounds.max_weight_ratio is not None or bounds.judges_norms)
        self._held: OrderedDict[str, tuple[Arrival, Update]] = OrderedDict()

    # -- state -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The newest model version."""
        return self.buffer.version

    @property
    def versions_made(self) -> int:
        return self.buffer.version - self.first_version

    @property
    def fits_running(self) -> int:
        return sum(1 for j in self.running.values() if j.kind == "fit")

    @property
    def evaluations(self) -> list[Evaluation]:
        """Scheduled evaluations not yet finished (newest last)."""
        return list(self._evals)

    def begin(self) -> None:
        """Training starts now (the clock of ``max_seconds`` and of the versions' times)."""
        self._start = self._last_version_at = self.clock()

    def done(self) -> bool:
        """The stop rule: ``max_versions`` made or ``max_seconds`` of training passed. Once
        true it stays true: no fit starts and every update still coming is late."""
        if self.stopping:
            return True
        if self.versions_made >= self.max_versions:
            log.info("FedBuff: %d versions made (max_versions); stopping", self.versions_made)
            self.stopping = True
        limit = self.options.max_seconds
        if (not self.stopping and limit is not None
                and self.clock() - self._start >= limit):
            log.info("FedBuff: %.0f s of training (max_seconds); stopping at version %d",
                     limit, self.version)
            self.stopping = True
        return self.stopping

    @property
    def late(self) -> bool:
        """Whether an update returning now comes after the last version."""
        return self.stopping or self.versions_made >= self.max_versions

    # -- what to start ---------------------------------------------------------------------
    def idle(self) -> list[tuple[str, str]]:
        """(client, platform) of the connected clients with no job and no rest to sit out,
        of a platform served, idle longest first (under ``max_concurrency`` they take
        turns)."""
        now = self.clock()
        idle = [(cid, platform) for cid, platform in self.clients.connected().items()
                if cid not in self.running and self._resting.get(cid, 0.0) <= now
                and platform in self.masks]
        return sorted(idle, key=lambda c: (self._idle_since.get(c[0], 0.0), c[0]))

    def next_jobs(self, fits: bool = True) -> list[Job]:
        """The jobs to start now (marked running): an evaluation while one is short of
        clients, else a fit (``fits`` and under ``max_concurrency``)."""
        started: list[Job] = []
        fitting = self.fits_running
        limit = self.options.max_concurrency
        fits = fits and not self.stopping
        for cid, platform in self.idle():
            ev = self._open_evaluation()
            if ev is not None and cid not in ev.clients:
                ev.dispatched += 1
                ev.clients.add(cid)
                job = Job("evaluate", cid, platform, ev.version)
            elif not fits or (limit is not None and fitting >= limit):
                continue
            else:
                fitting += 1
                job = Job("fit", cid, platform, self.version)
            self.running[cid] = job
            started.append(job)
        return started

    def next_rest_end(self) -> float:
        """When the first resting client (its last fits failed with errors) may be given
        work again; ``inf`` when nobody rests. A virtual-clock host jumps no further."""
        now = self.clock()
        return min((t for t in self._resting.values() if t > now), default=math.inf)

    def not_started(self, job: Job) -> None:
        """The host could not start ``job`` (its client left after the look that chose
        it): as if it had never been given; an evaluation looks for another client."""
        if self.running.get(job.client) != job:
            return
        del self.running[job.client]
        if job.kind == "evaluate":
            for ev in self._evals:
                if ev.version == job.version and ev.dispatched:
                    ev.dispatched -= 1
                    ev.clients.discard(job.client)
                    break

    # -- what came back --------------------------------------------------------------------
    def _returned(self, job: Job) -> None:
        if self.running.get(job.client) == job:
            del self.running[job.client]
        self._idle_since[job.client] = self.clock()

    def fit_returned(self, job: Job, result: Any, returned: Returned | None = None) -> None:
        """A fit came back with ``result`` (opaque here: ``accept`` reads it)."""
        self._returned(job)
        returned = returned or Returned()
        staleness = self.version - job.version
        arrival = Arrival(
            version=self.version + 1, platform=job.platform, client=job.client,
            base_version=job.version, staleness=staleness, weight=0.0, examples=0,
            fit_seconds=float(returned.fit_seconds),
            seconds=self.clock() - self._start, status="applied",
            bytes_up=int(returned.bytes_up), bytes_down=int(returned.bytes_down),
            bytes_up_float32=int(returned.bytes_up_float32),
            bytes_down_float32=int(returned.bytes_down_float32))
        if self.late:  # said, not silently dropped
            arrival.examples = int(returned.examples or 0)
            self._too_late(arrival)
            return
        try:
            if self.screen is not None:
                self.screen(job.client)  # a revoked client: never applied
            base = self.buffer.base(job.version, job.platform, job.client)
            update = self.accept(job.platform, job.client, result, base)
            arrival.examples, arrival.capped = update.examples, update.capped
            arrival.weight = self.buffer.weight_of(staleness)
            ready = self._admit(arrival, update, base)
        except KeyError as exc:  # a manifest lookup: our fault, not the client's
            raise RuntimeError(
                f"a lookup failed while mapping {job.platform} client {job.client}'s update "
                f"(KeyError: {exc}): the manifest of model '{self.model_name}' or xflwb is "
                "at fault; re-export the model, and report it if it persists") from exc
        except Exception as exc:  # this update only
            self._reject(arrival, exc)
            self._record(arrival)
            return
        self._errors.pop(job.client, None)
        self._errors_in_a_row.clear()
        for held, accepted in ready:
            if self.late:  # the warm-up released more than the last version needed
                self._too_late(held)
            else:
                self._apply(held, accepted)

    def _too_late(self, arrival: Arrival) -> None:
        arrival.status, arrival.weight = "rejected", 0.0
        arrival.reason = (f"arrived after the session's last version {self.version} "
                          "(max_versions / max_seconds reached)")
        self._record(arrival)

    def fit_failed(self, job: Job, failure: Failure) -> None:
        """A fit raised. A lost connection costs nothing more; an error rests the client
        (2, 4, … 30 s) and counts towards ``AllFitsFailed``. After the stop rule: ignored."""
        self._returned(job)
        if self.late:
            return
        self._failures.append(failure)
        log.warning("version %d: %s client %s failed: %s", self.version + 1,
                    failure.platform, failure.client, failure.reason)
        if not failure.is_error:
            return
        self._errors[job.client] += 1
        self._resting[job.client] = self.clock() + min(MAX_REST,
                                                        2.0 ** self._errors[job.client])
        self._errors_in_a_row.append(failure.reason)
        connected = max(1, len(self.clients.connected()))
        if len(self._errors_in_a_row) >= max(self.options.buffer_size, connected,
                                             self.min_clients):
            raise AllFitsFailed(list(self._errors_in_a_row), self.version,
                                self.summarize(self._errors_in_a_row))

    def evaluated(self, job: Job, result: Any = None, failure: Any = None) -> None:
        """An evaluation came back (``failure`` set when it raised); both opaque here."""
        self._returned(job)
        for ev in self._evals:
            if ev.version == job.version:
                if failure is None:
                    ev.results.append(result)
                else:
                    ev.failures.append(failure)
                break
        self._finish_evaluations()

    # -- one update ------------------------------------------------------------------------
    def _reject(self, arrival: Arrival, exc: BaseException | str) -> None:
        arrival.status, arrival.weight = "rejected", 0.0
        arrival.reason = (exc if isinstance(exc, str) else str(exc)
                          if isinstance(exc, StaleUpdate) else f"{type(exc).__name__}: {exc}")
        log.warning("version %d: rejected %s update from %s: %s", self.version + 1,
                    arrival.platform, arrival.client, arrival.reason)
        self._rejected.append(arrival)

    def _record(self, arrival: Arrival) -> None:
        if self.on_arrival is not None:
            try:
                self.on_arrival(arrival)
            except Exception as exc:  # recording never stops training
                log.error("arrival not recorded (%s: %s)", type(exc).__name__, exc)

    def _admit(self, arrival: Arrival, update: Update, base: list[Array]
               ) -> list[tuple[Arrival, Update]]:
        """The accepted updates to apply now: this one, or, during the warm-up, none (it
        is held, replacing an older held one of the same client) until ``warm`` distinct
        clients have reported; then every held one."""
        self.claims.observe(arrival.client, arrival.examples)
        if not self.holding:
            return [(arrival, update)]
        if self.bounds is not None and self.bounds.judges_norms:  # known before any is judged
            self.bounds.observe_norm(arrival.platform, arrival.client, arrival.weight
                                     * update_norm(update.tensors, base,
                                                   self.masks[arrival.platform]))
        older = self._held.pop(arrival.client, None)
        if older is not None:
            self._reject(older[0], "superseded by a newer update of the same phone during "
                         f"bounded influence's warm-up (until {self.warm} phones report)")
            self._record(older[0])
        self._held[arrival.client] = (arrival, update)
        if len(self.claims) < self.warm:
            return []
        self.holding = False
        ready = list(self._held.values())
        self._held.clear()
        return ready

    def _apply(self, arrival: Arrival, update: Update) -> None:
        """Weigh one accepted update (examples ≤ ``max_weight_ratio`` × the recent
        clients' median claim; norm within bounds), buffer it, record it, and make a
        version when the buffer is full."""
        buffer = self.buffer
        try:
            base = buffer.base(arrival.base_version, arrival.platform, arrival.client)
            n = arrival.examples
            if self.bounds is not None:
                claims = [int(c) for c in self.claims.values()]  # examples: whole
                cap = weight_cap(claims, self.bounds.max_weight_ratio)
                n, cut = self.bounds.bound(arrival.platform, arrival.client, update.tensors,
                                           n, base, cap, arrival.weight)
                arrival.examples, arrival.capped = n, arrival.capped or cut
            arrival.version = buffer.version + 1
            buffer.add(arrival, update.tensors, n)  # validates: NaN/inf rejects only this
        except Exception as exc:  # this update only
            self._reject(arrival, exc)
        self._record(arrival)
        if buffer.full:
            self._make_version()

    # -- a version -------------------------------------------------------------------------
    def _make_version(self) -> None:
        t0 = time.perf_counter()
        buffer = self.buffer
        error = None
        new: list[Array] | None
        try:
            new, applied = buffer.make_version()
        except FloatingPointError as exc:
            error = (f"version {buffer.version + 1}: {exc}; the model stays at version "
                     f"{buffer.version}")
            log.warning(error)
            new, applied = None, []
        now = self.clock()
        rejected, self._rejected = self._rejected, []
        failures, self._failures = self._failures, []
        made = VersionMade(self.versions_made + (0 if new is not None else 1), buffer.version,
                           new, applied, rejected, failures, error)
        made.metrics = _arrival_metrics(applied + rejected)
        for platform in self.masks:
            lost = sum(1 for f in failures if f.platform == platform)
            if lost:
                made.metrics.append((platform, "failures", float(lost)))
        if failures:
            log.warning("version %d: %d fit(s) failed since the last version: %s",
                        buffer.version, len(failures),
                        self.summarize([f.reason for f in failures]))
        made.totals = [("all", "failures", float(len(failures))),
                       ("all", "seconds", now - self._start),
                       ("all", "version_seconds", now - self._last_version_at),
                       ("all", "buffer_size", float(self.options.buffer_size)),
                       ("all", "aggregate_seconds", time.perf_counter() - t0)]
        self._last_version_at = now
        if self.on_version is not None:
            self.on_version(made)
        if (new is not None and self.evaluates
                and (self.versions_made % self.options.evaluate_every == 0
                     or self.versions_made >= self.max_versions)):
            self._schedule_evaluation()

    # -- evaluation ------------------------------------------------------------------------
    @property
    def evaluates(self) -> bool:
        return bool(self.options.evaluate_every) and self.fraction_evaluate > 0

    def _schedule_evaluation(self) -> None:
        """Evaluate the current version on ``fraction_evaluate`` of the connected clients,
        as they become idle."""
        target = max(1, int(len(self.clients.connected()) * self.fraction_evaluate))
        self._evals.append(Evaluation(self.version, target))
        self._last_evaluated = self.version

    def _open_evaluation(self) -> Evaluation | None:
        """The newest scheduled evaluation still short of clients (older ones close with
        what they have: a newer model is worth more than an older one's coverage)."""
        for ev in self._evals[:-1]:
            ev.target = ev.dispatched
        for ev in self._evals:  # its model left the window (max_staleness): no one else
            if ev.version not in self.buffer.versions:
                ev.target = ev.dispatched
        self._finish_evaluations()
        if self._evals and self._evals[-1].dispatched < self._evals[-1].target:
            return self._evals[-1]
        return None

    def _finish_evaluations(self) -> None:
        for ev in [e for e in self._evals if e.dispatched >= e.target
                   and e.returned >= e.dispatched]:
            self._evals.remove(ev)
            if ev.dispatched and self.on_evaluated is not None:
                self.on_evaluated(ev.version - self.first_version, ev.results, ev.failures)

    # -- after the stop rule ---------------------------------------------------------------
    def begin_wind_down(self) -> None:
        """No fit starts from now on; held updates are recorded as rejected (said, not
        silently dropped) and the final model is scheduled for evaluation."""
        self.stopping = True
        for arrival, _ in self._held.values():
            self._reject(arrival, f"held until {self.warm} phones had reported (bounded "
                         "influence's warm-up); the session ended first")
            self._record(arrival)
        self._held.clear()
        scheduled = self._evals[-1].version if self._evals else self._last_evaluated
        if self.evaluates and self.versions_made and scheduled != self.version:
            self._schedule_evaluation()  # the final model is always evaluated

    def wind_down_step(self) -> WindDown:
        """The final evaluation runs on clients as they become idle (closed with what it
        has once no fit is running and nobody is idle); each idle client, once no
        evaluation is pending, is told goodbye once; over when nothing runs or is pending."""
        if self._evals and not any(j.kind == "fit" for j in self.running.values()):
            ev = self._evals[-1]  # nobody else will become free: close with these
            if not [cid for cid, _ in self.idle() if cid not in ev.clients]:
                ev.target = ev.dispatched
        start = self.next_jobs(fits=False)
        goodbye = []
        if not self._evals:
            for cid, _ in self.idle():
                if cid not in self._told:
                    self._told.add(cid)
                    goodbye.append(cid)
        return WindDown(start, goodbye, not self.running and not self._evals)

    @property
    def told(self) -> int:
        """How many clients were told goodbye."""
        return len(self._told)


def _arrival_metrics(arrivals: list[Arrival]) -> list[tuple[str, str, float | None]]:
    """Per platform and "all": what the arrivals since the last version were."""
    per: dict[str, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        per[a.platform].append(a)
    per["all"] = arrivals
    metrics: list[tuple[str, str, float | None]] = []
    for platform, group in per.items():
        ok = [a for a in group if a.status == "applied"]
        n = len(ok)
        up = float(sum(a.bytes_up for a in group))
        metrics += [
            (platform, "clients", float(n)),
            (platform, "examples", float(sum(a.examples for a in ok))),
            (platform, "fit_seconds", float(np.mean([a.fit_seconds for a in ok])) if ok
             else None),
            (platform, "bytes_up", up),
            (platform, "bytes_per_update", up / len(group) if group else None),
            (platform, "bytes_down", float(sum(a.bytes_down for a in group))),
            (platform, "bytes_up_float32", float(sum(a.bytes_up_float32 for a in group))),
            (platform, "bytes_down_float32",
             float(sum(a.bytes_down_float32 for a in group))),
            (platform, "rejected", float(len(group) - n)),
            (platform, "staleness_mean", float(np.mean([a.staleness for a in ok])) if ok
             else None),
            (platform, "staleness_max", float(max(a.staleness for a in ok)) if ok else None)]
        capped = sum(a.capped for a in ok)
        if capped:
            metrics.append((platform, "capped", float(capped)))
    return metrics
