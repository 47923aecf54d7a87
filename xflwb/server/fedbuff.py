"""Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022) for phone sessions.

A synchronous round waits for its slowest phone. Here every idle connected phone is given
the current model at once; each update that comes back is mapped to canonical space and
its delta taken against the version *that phone started from*; every ``buffer_size``
accepted updates the server applies their staleness-weighted mean delta and makes a new
model version. Phones see only FitIns / FitRes, as in a round, so FedKit and Flower-SDK
phones work unchanged.

The pieces:

* ``FedBuff``: the option set (declared once, ``xflwb._options``), passed as the session's
  ``strategy_options`` when ``strategy="fedbuff"``.
* ``staleness_rule``: "constant", "polynomial:a" (``(1+s)^-a``, FedBuff's default a=0.5)
  or "hinge:a,b" (FedAsync's: 1 up to ``b`` versions, then ``1/(a(s-b)+1)``).
* ``VersionBuffer``: the aggregation state, no threads or sockets — the last
  ``max_staleness + 1`` versions in canonical space (bounded memory), the buffer (a
  ``StreamingFedAvg`` of weighted deltas: a tensor a platform does not train is masked out
  exactly as in a round), and ``arrive`` / ``make_version``.
* ``AsyncLoop``: the loop on Flower's ``ClientManager`` / ``ClientProxy`` (through
  ``xflwb.flower_legacy``) that dispatches fits and evaluations to idle phones from
  a thread pool and feeds ``VersionBuffer``. It reuses ``CrossPlatformStrategy`` for what a
  round does per client (decode, map, validate: ``_accept``), for encoding the model per
  platform and wire encoding, for evaluation and for recording (``on_fit_round``), so the
  masked cross-platform rule, validation and rejection are the synchronous ones.

Written here rather than taken from Flower: Flower has no asynchronous strategy (its
legacy ``Server.fit`` is strictly round-based, and a FedBuff PR was closed unmerged), and
NVFlare's FedBuff is tied to its own edge runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.federation.aggregate import StreamingFedAvg, update_norm
from xflwb.federation.influence import WARM, PeerWindow, weight_cap

log = logging.getLogger("xflwb.fedbuff")


@_options.declared  # unknown keywords: did you mean
@dataclass
class FedBuff:
    """FedBuff's options (``strategy="fedbuff"``, passed as ``strategy_options``)."""

    buffer_size: int = option(4, "accepted updates per new model version (FedBuff's K)",
                              ge=1, le=100_000)
    max_concurrency: int | None = option(
        None, "phones training at once (none: every connected phone that is idle)",
        ge=1, le=1_000_000)
    staleness: str = option(
        "polynomial:0.5", 'weight of an update trained on a model s versions old: '
        '"constant", "polynomial:a" ((1+s)^-a) or "hinge:a,b" (1 up to b, then '
        "1/(a(s-b)+1))")
    max_staleness: int = option(
        10, "updates trained on a model more than this many versions old are rejected (the "
        "server keeps this many past versions)", ge=0, le=10_000)
    server_lr: float = option(1.0, "server learning rate on the buffered mean delta", gt=0,
                              le=1000)
    max_versions: int | None = option(
        None, "stop after this many new versions (none: the session's rounds)", ge=1,
        le=1_000_000)
    max_seconds: float | None = option(
        None, "stop after this many seconds of training (none: no time limit)", gt=0)
    evaluate_every: int = option(
        1, "evaluate every this many versions on idle phones (0: never)", ge=0,
        le=1_000_000)

    def __post_init__(self) -> None:
        _options.check(self)
        staleness_rule(self.staleness)  # ValueError naming the spelling


def fedbuff_options(value: Any) -> FedBuff:
    """A session's ``strategy_options`` under ``strategy="fedbuff"`` (a ``FedBuff`` or its
    dict) as a checked ``FedBuff``; ``ValueError`` naming the option otherwise."""
    if isinstance(value, FedBuff):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"strategy_options of fedbuff must be xflwb.FedBuff(...) or its "
                         f"dict, got {value!r}")
    try:
        return FedBuff(**value)
    except (TypeError, ValueError) as exc:  # one line naming the option (OptionError)
        raise _options.OptionError(f"strategy_options: {exc}") from None


def staleness_rule(spec: str) -> Callable[[int], float]:
    """The weight function ``s → w`` of a ``staleness`` spelling, or ``ValueError``."""
    fix = ('use "constant", "polynomial:a" with a ≥ 0 (e.g. "polynomial:0.5") or '
           '"hinge:a,b" with a, b ≥ 0 (e.g. "hinge:10,4")')
    if not isinstance(spec, str):
        raise ValueError(f"staleness must be a string; {fix}")
    name, _, args = spec.strip().lower().partition(":")
    try:
        values = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"staleness {spec!r}: {args!r} is not a number list; {fix}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"staleness {spec!r}: parameters must be finite and ≥ 0; {fix}")
    if name == "constant" and not values:
        return lambda s: 1.0
    if name == "polynomial" and len(values) == 1:
        a = values[0]
        return lambda s: float((1.0 + s) ** -a)
    if name == "hinge" and len(values) == 2:
        a, b = values
        return lambda s: 1.0 if s <= b else float(1.0 / (a * (s - b) + 1.0))
    raise ValueError(f"staleness {spec!r} is not understood; {fix}")


@dataclass
class Arrival:
    """What became of one update that reached the server (a row of ``session.arrivals``)."""

    version: int  # the version it went into (or would have)
    platform: str
    client: str
    base_version: int
    staleness: int
    weight: float
    examples: int
    fit_seconds: float
    seconds: float
    status: str  # "applied" | "rejected"
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    capped: bool = False

    def row(self) -> dict[str, Any]:
        """The registry's row (``Registry.add_arrivals``)."""
        d = dataclasses.asdict(self)
        for k in ("bytes_up", "bytes_down", "capped"):
            d.pop(k)
        return d


class StaleUpdate(ValueError):
    """An update trained on a version older than ``max_staleness`` allows."""


class VersionBuffer:
    """FedBuff's aggregation state: past versions, the buffer, the staleness rule. No
    validation here: the caller maps and checks each update against its base version first
    (``CrossPlatformStrategy._accept``), so a bad update never reaches ``add``."""

    def __init__(self, initial: list[np.ndarray], version: int, options: FedBuff,
                 masks: dict[str, list[bool]]) -> None:
        self.options = options
        self.weight_of = staleness_rule(options.staleness)
        self.version = int(version)
        #: version → canonical float32 model; the newest ``max_staleness + 1``
        self.versions: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self.versions[self.version] = [np.asarray(a, np.float32) for a in initial]
        self.masks = masks
        self._zeros = [np.zeros(a.shape, np.float32) for a in initial]
        self.buffer = StreamingFedAvg(self._zeros)
        self.pending: list[Arrival] = []  # applied arrivals in the current buffer

    @property
    def current(self) -> list[np.ndarray]:
        return self.versions[self.version]

    def base(self, version: int, platform: str, client: str) -> list[np.ndarray]:
        """The model ``version`` (raises ``StaleUpdate`` when it is too old)."""
        staleness = self.version - version
        if staleness > self.options.max_staleness or version not in self.versions:
            raise StaleUpdate(
                f"stale update: {platform} client {client} trained on version {version}, "
                f"the model is at version {self.version} (staleness {staleness} > "
                f"max_staleness {self.options.max_staleness}); rejected")
        return self.versions[version]

    def add(self, arrival: Arrival, canonical: list[np.ndarray], examples: int) -> None:
        """Buffer one accepted update: its delta to its base version, scaled by its
        staleness weight, weighted by its examples, over the tensors its platform trains."""
        base = self.versions[arrival.base_version]
        mask = self.masks[arrival.platform]
        w = np.float32(arrival.weight)
        with np.errstate(over="ignore", invalid="ignore"):  # inf: refused by add below
            deltas = [(np.subtract(c, b, dtype=np.float32) * w) if t else z
                      for c, b, t, z in zip(canonical, base, mask, self._zeros, strict=True)]
        self.buffer.add(deltas, examples, mask)  # validates: NaN/inf rejects only this one
        self.pending.append(arrival)

    @property
    def full(self) -> bool:
        return self.buffer.count >= self.options.buffer_size

    def make_version(self) -> tuple[list[np.ndarray], list[Arrival]]:
        """Apply the buffer: ``new = current + server_lr · Σ n·s·Δ / Σ n`` per tensor (over
        the updates whose platform trains it; untouched tensors keep their value). Returns
        the new model and the arrivals it holds; raises ``FloatingPointError`` (and keeps
        the model) when the step is not finite."""
        mean = self.buffer.result()
        lr = np.float32(self.options.server_lr)
        new = [np.add(g, lr * d, dtype=np.float32) for g, d in zip(self.current, mean,
                                                                    strict=True)]
        applied, self.pending = self.pending, []
        self.buffer = StreamingFedAvg(self._zeros)
        if not all(np.isfinite(a).all() for a in new):
            raise FloatingPointError("the buffered step produced NaN or inf")
        self.version += 1
        self.versions[self.version] = new
        while len(self.versions) > self.options.max_staleness + 1:
            self.versions.popitem(last=False)
        return new, applied


@dataclass
class _Job:
    kind: str  # "fit" | "evaluate"
    client: Any  # the ClientProxy (a ``_Tracked`` for fits)
    platform: str
    version: int


@dataclass
class _Evaluation:
    version: int
    target: int
    dispatched: int = 0
    results: list[Any] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)

    @property
    def returned(self) -> int:
        return len(self.results) + len(self.failures)


class AsyncLoop:
    """Serve phones asynchronously until ``max_versions`` / ``max_seconds``.

    ``strategy``: the session's ``CrossPlatformStrategy`` (plain FedAvg inside; its
    ``global_`` follows the newest version). ``first_version``: the version the session
    starts from (a resumed session's checkpoint). ``on_arrival``: called with each
    ``Arrival`` (the session writes ``session.arrivals``)."""

    POLL = 0.25  # seconds between looks for newly connected phones

    def __init__(self, client_manager: Any, strategy: Any, options: FedBuff, *,
                 max_versions: int, first_version: int = 0, round_timeout: float = 600.0,
                 max_workers: int = 1024,
                 on_arrival: Callable[[Arrival], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cm = client_manager
        self.strategy = strategy
        self.options = options
        self.max_versions = int(options.max_versions or max_versions)
        self.first_version = int(first_version)
        self.round_timeout = float(round_timeout)
        self.on_arrival = on_arrival
        self.clock = clock
        self.state = VersionBuffer(strategy.global_, first_version, options,
                                   strategy._masks)
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="fedbuff")
        self._jobs: dict[Future[Any], _Job] = {}
        self._busy: set[str] = set()
        self._resting: dict[str, float] = {}  # cid → time its next job may start
        self._idle_since: dict[str, float] = {}  # cid → when its last job came back
        self._errors: dict[str, int] = defaultdict(int)  # cid → consecutive errors
        self._errors_in_a_row: list[str] = []  # fit errors since the last accepted update
        self._evals: list[_Evaluation] = []
        self._cache: dict[tuple[int, str, str], Any] = {}
        self._rejected: list[Arrival] = []  # since the last version
        self._failures: list[Any] = []  # since the last version
        self._start = 0.0
        self._last_version_at = 0.0
        self._last_evaluated: int | None = None  # the newest version scheduled
        #: bounded influence (``xflwb.federation.influence``): each recent phone's latest claim
        #: (the weight cap is ``max_weight_ratio`` × their median, the arrival's included);
        #: until ``_warm`` distinct phones have reported, accepted updates are held (one per
        #: phone), so the first ones are judged against each other, not against nothing
        self.claims = PeerWindow()
        self._warm = min(WARM, strategy.min_clients)
        self._holding = self._warm > 1 and (strategy.max_weight_ratio is not None
                                            or strategy.max_norm_ratio is not None)
        self._held: OrderedDict[str, tuple[Arrival, list[np.ndarray]]] = OrderedDict()

    # -- the loop --------------------------------------------------------------------------
    @property
    def versions_made(self) -> int:
        return self.state.version - self.first_version

    def run(self) -> None:
        """Until the stop rule: dispatch to idle phones, handle what came back; then wind
        down (the final evaluation, goodbyes)."""
        self.strategy._manager = self.cm
        self._wait_for_clients()
        self._start = self._last_version_at = self.clock()
        try:
            while not self._done():
                self._step()
            self._wind_down()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _step(self, fits: bool = True) -> None:
        """Give idle phones work, then handle what comes back within ``POLL`` seconds."""
        self._dispatch(fits)
        if not self._jobs:
            time.sleep(self.POLL)
            return
        done, _ = wait(list(self._jobs), timeout=self.POLL, return_when=FIRST_COMPLETED)
        for fut in done:
            # two updates back in one poll can fill the last buffer and one more: once the
            # last version is made the rest arrive late (recorded, never applied)
            late = not fits or self.versions_made >= self.max_versions
            self._complete(fut, self._jobs.pop(fut), late=late)

    def _wind_down(self) -> None:
        """After the last version no phone starts a fit. The final model's evaluation runs
        on phones as they become idle; fits still running are waited for (their updates
        are recorded as arriving too late, not applied); each idle phone is told the
        session is over (Flower's ReconnectIns without a delay, as
        ``Server.disconnect_all_clients``), so phones end cleanly instead of seeing their
        stream cut. At most ``round_timeout`` seconds; phones still busy then see their
        stream end when the session closes its ports."""
        from xflwb.flower_legacy import ReconnectIns

        deadline = self.clock() + self.round_timeout
        for arrival, _ in self._held.values():  # said, not silently dropped
            self._reject(arrival, f"held until {self._warm} phones had reported (bounded "
                         "influence's warm-up); the session ended first")
            self._record_arrival(arrival)
        self._held.clear()
        scheduled = self._evals[-1].version if self._evals else self._last_evaluated
        if self._evaluates() and self.versions_made and scheduled != self.state.version:
            self._schedule_evaluation()  # the final model is always evaluated
        told: set[str] = set()
        goodbyes: list[Future[Any]] = []
        while True:
            if self._evals and not any(j.kind == "fit" for j in self._jobs.values()):
                ev = self._evals[-1]  # nobody else will become free: close with these
                if not self._idle():
                    ev.target = ev.dispatched
            self._dispatch(fits=False)
            for client in self._idle():
                if client.cid not in told and not self._evals:
                    told.add(client.cid)
                    goodbyes.append(self._pool.submit(client.reconnect,
                                                      ReconnectIns(seconds=None), 5, None))
            if (not self._jobs and not self._evals) or self.clock() >= deadline:
                break
            self._step(fits=False)
        log.info("FedBuff: session over at version %d; %d phone(s) told, %d still busy",
                 self.state.version, len(told), len(self._busy))
        wait(goodbyes, timeout=6)

    def _done(self) -> bool:
        if self.versions_made >= self.max_versions:
            log.info("FedBuff: %d versions made (max_versions); stopping",
                     self.versions_made)
            return True
        limit = self.options.max_seconds
        if limit is not None and self.clock() - self._start >= limit:
            log.info("FedBuff: %.0f s of training (max_seconds); stopping at version %d",
                     limit, self.state.version)
            return True
        return False

    def _wait_for_clients(self) -> None:
        need = self.strategy.min_clients
        while not self.cm.wait_for(need, timeout=1):
            self.strategy._progress(phase="waiting", round=self.versions_made + 1,
                                    connected=self.cm.num_available(), needed=need)

    def _idle(self) -> list[Any]:
        now = self.clock()
        idle = [c for cid, c in self.cm.all().items()
                if cid not in self._busy and self._resting.get(cid, 0.0) <= now
                and getattr(c, "platform", None) in self.strategy.manifest["platforms"]]
        # idle longest first: under max_concurrency the phones take turns
        return sorted(idle, key=lambda c: (self._idle_since.get(c.cid, 0.0), c.cid))

    def _parameters(self, platform: str, client: Any, version: int) -> Any:
        """The model ``version`` in the client's layout and encoding (once per version,
        platform and encoding)."""
        from xflwb.bridge import params
        from xflwb.federation.gate import TENSOR_TYPES
        from xflwb.flower_legacy import Parameters

        codec = self.strategy.codec_of.get(client.cid, getattr(client, "codec", "raw"))
        key = (version, platform, codec)
        if key not in self._cache:
            for old in [k for k in self._cache if k[0] < self.state.version]:
                del self._cache[old]
            tensors = params.encode_tensors(
                params.to_platform(self.state.versions[version], self.strategy.manifest,
                                   platform), codec)
            self._cache[key] = Parameters(tensors=tensors, tensor_type=TENSOR_TYPES[codec])
        return self._cache[key]

    def _dispatch(self, fits: bool = True) -> None:
        from xflwb.flower_legacy import EvaluateIns, FitIns
        from xflwb.sessions.flower_strategy import Tracked as _Tracked

        idle = self._idle()
        fitting = sum(1 for j in self._jobs.values() if j.kind == "fit")
        limit = self.options.max_concurrency
        for client in idle:
            platform = client.platform
            version = self.state.version
            ev = self._open_evaluation()
            if ev is not None:
                ins = EvaluateIns(parameters=self._parameters(platform, client, ev.version),
                                  config={})
                fut = self._pool.submit(client.evaluate, ins, self.round_timeout,
                                        ev.version)
                ev.dispatched += 1
                self._start_job(fut, _Job("evaluate", client, platform, ev.version))
                continue
            if not fits or (limit is not None and fitting >= limit):
                continue
            config: dict[str, Any] = {"local_epochs": self.strategy.local_epochs}
            tracked = _Tracked(client, platform)
            ins = FitIns(parameters=self._parameters(platform, client, version),
                         config=config)
            fut = self._pool.submit(tracked.fit, ins, self.round_timeout, version)
            fitting += 1
            self._start_job(fut, _Job("fit", tracked, platform, version))
        self.strategy._progress(phase="fedbuff", round=self.versions_made + 1,
                                connected=self.cm.num_available(), needed=0,
                                selected=fitting)

    def _start_job(self, fut: Future[Any], job: _Job) -> None:
        self._busy.add(job.client.cid)
        self._jobs[fut] = job

    # -- what came back --------------------------------------------------------------------
    def _complete(self, fut: Future[Any], job: _Job, late: bool = False) -> None:
        """One job came back. ``late``: a fit that ends after the last version."""
        self._busy.discard(job.client.cid)
        self._idle_since[job.client.cid] = self.clock()
        try:
            res = fut.result()
        except Exception as exc:
            failure: BaseException | None = exc
            res = None
        else:
            failure = None
        if job.kind == "evaluate":
            self._evaluated(job, res, failure)
        elif late:
            if failure is None:  # said, not silently dropped
                self._record_arrival(Arrival(
                    self.state.version + 1, job.platform, job.client.cid, job.version,
                    self.state.version - job.version, 0.0,
                    int(getattr(res, "num_examples", 0) or 0),
                    float(getattr(job.client, "seconds", 0.0)), self.clock() - self._start,
                    "rejected", f"arrived after the session's last version "
                    f"{self.state.version} (max_versions / max_seconds reached)"))
        elif failure is not None:
            self._failed(job, failure)
        else:
            self._arrived(job, res)

    def _failed(self, job: _Job, exc: BaseException) -> None:
        from xflwb.federation.report import AllClientsFailed, summarize
        from xflwb.sessions.flower_strategy import failure_reason

        self._failures.append(exc)
        platform, cid, why, is_error = failure_reason(exc)
        log.warning("version %d: %s client %s failed: %s", self.state.version + 1, platform,
                    cid, why)
        if not is_error:
            return
        self._errors[job.client.cid] += 1
        # a phone that fails at once is not given work in a tight loop
        self._resting[job.client.cid] = self.clock() + min(30.0,
                                                           2.0 ** self._errors[job.client.cid])
        self._errors_in_a_row.append(why)
        connected = max(1, self.cm.num_available())
        if len(self._errors_in_a_row) >= max(self.options.buffer_size, connected,
                                             self.strategy.min_clients):
            raise AllClientsFailed(
                f"the last {len(self._errors_in_a_row)} fits all failed and none succeeded "
                f"since version {self.state.version}: {summarize(self._errors_in_a_row)}")

    def _arrived(self, job: _Job, res: Any) -> None:
        client = job.client
        state = self.state
        now = self.clock()
        staleness = state.version - job.version
        arrival = Arrival(
            version=state.version + 1, platform=job.platform, client=client.cid,
            base_version=job.version, staleness=staleness,
            weight=0.0, examples=0, fit_seconds=float(getattr(client, "seconds", 0.0)),
            seconds=now - self._start, status="applied",
            bytes_up=int(getattr(client, "bytes_up", 0)),
            bytes_down=int(getattr(client, "bytes_down", 0)))
        try:
            self.strategy._refused(client.cid)  # a revoked device token: never applied
            base = state.base(job.version, job.platform, client.cid)
            canonical, n, capped, codec = self.strategy._accept(job.platform, res, base)
            arrival.examples, arrival.capped = n, capped
            arrival.weight = state.weight_of(staleness)
            ready = self._admit(arrival, canonical, base)
        except KeyError as exc:  # a manifest lookup: our fault, not the phone's
            raise RuntimeError(
                f"a lookup failed while mapping {job.platform} client {client.cid}'s update "
                f"(KeyError: {exc}): the manifest of model "
                f"'{self.strategy.manifest.get('name')}' or xflwb is at fault; re-export "
                "the model, and report it if it persists") from exc
        except Exception as exc:  # this update only
            self._reject(arrival, exc)
            self._record_arrival(arrival)
            return
        self.strategy.codec_of[client.cid] = codec
        self._errors.pop(client.cid, None)
        self._errors_in_a_row.clear()
        for held, arrays in ready:
            self._apply(held, arrays)

    def _reject(self, arrival: Arrival, exc: BaseException | str) -> None:
        arrival.status, arrival.weight = "rejected", 0.0
        arrival.reason = (exc if isinstance(exc, str) else str(exc)
                          if isinstance(exc, StaleUpdate) else f"{type(exc).__name__}: {exc}")
        log.warning("version %d: rejected %s update from %s: %s", self.state.version + 1,
                    arrival.platform, arrival.client, arrival.reason)
        self._rejected.append(arrival)

    def _admit(self, arrival: Arrival, canonical: list[np.ndarray], base: list[np.ndarray]
               ) -> list[tuple[Arrival, list[np.ndarray]]]:
        """The accepted updates to apply now: this one, or, during the warm-up, none (it
        is held, replacing an older held one of the same phone) until ``_warm`` distinct
        phones have reported; then every held one."""
        self.claims.observe(arrival.client, arrival.examples)
        if not self._holding:
            return [(arrival, canonical)]
        if self.strategy.max_norm_ratio is not None:  # known before any is judged
            peers = self.strategy.norms[arrival.platform]
            peers.observe(arrival.client, arrival.weight * update_norm(
                canonical, base, self.strategy._masks[arrival.platform]))
        older = self._held.pop(arrival.client, None)
        if older is not None:
            self._reject(older[0], "superseded by a newer update of the same phone during "
                         f"bounded influence's warm-up (until {self._warm} phones report)")
            self._record_arrival(older[0])
        self._held[arrival.client] = (arrival, canonical)
        if len(self.claims) < self._warm:
            return []
        self._holding = False
        ready = list(self._held.values())
        self._held.clear()
        return ready

    def _apply(self, arrival: Arrival, canonical: list[np.ndarray]) -> None:
        """Weigh one accepted update (examples ≤ ``max_weight_ratio`` × the recent
        phones' median claim; norm within ``max_norm_ratio``), buffer it, record it, and
        make a version when the buffer is full."""
        state = self.state
        try:
            base = state.base(arrival.base_version, arrival.platform, arrival.client)
            cap = weight_cap(self.claims.values(), self.strategy.max_weight_ratio)
            n, cut = self.strategy._bounded(arrival.platform, arrival.client, canonical,
                                            arrival.examples, base, cap, arrival.weight)
            arrival.examples, arrival.capped = n, arrival.capped or cut
            arrival.version = state.version + 1
            state.add(arrival, canonical, n)  # validates: NaN/inf rejects only this one
        except Exception as exc:  # this update only
            self._reject(arrival, exc)
        self._record_arrival(arrival)
        if state.full:
            self._make_version()

    def _record_arrival(self, arrival: Arrival) -> None:
        if self.on_arrival is not None:
            try:
                self.on_arrival(arrival)
            except Exception as exc:  # recording never stops training
                log.error("arrival not recorded (%s: %s)", type(exc).__name__, exc)

    def _make_version(self) -> None:
        from xflwb.federation.report import RoundReport, summarize
        from xflwb.sessions.flower_strategy import failure_reason

        t0 = time.perf_counter()
        state = self.state
        report = RoundReport(self.versions_made + 1)
        try:
            new, applied = state.make_version()
        except FloatingPointError as exc:
            why = (f"version {state.version + 1}: {exc}; the model stays at version "
                   f"{state.version}")
            log.warning(why)
            report.rejections.append(("all", "server", why))
            applied = []
            new = None
        if new is not None:
            self.strategy.global_ = new
        now = self.clock()
        rejected, self._rejected = self._rejected, []
        failures, self._failures = self._failures, []
        report.rejections += [(a.platform, a.client, a.reason) for a in rejected]
        per: dict[str, list[Arrival]] = defaultdict(list)
        for a in applied + rejected:
            per[a.platform].append(a)
        per["all"] = applied + rejected
        for platform, arrivals in per.items():
            ok = [a for a in arrivals if a.status == "applied"]
            n = len(ok)
            up = float(sum(a.bytes_up for a in arrivals))
            report.metrics += [
                (platform, "clients", float(n)),
                (platform, "examples", float(sum(a.examples for a in ok))),
                (platform, "fit_seconds",
                 float(np.mean([a.fit_seconds for a in ok])) if ok else None),
                (platform, "bytes_up", up),
                (platform, "bytes_per_update", up / len(arrivals) if arrivals else None),
                (platform, "bytes_down", float(sum(a.bytes_down for a in arrivals))),
                (platform, "rejected", float(len(arrivals) - n)),
                (platform, "staleness_mean",
                 float(np.mean([a.staleness for a in ok])) if ok else None),
                (platform, "staleness_max",
                 float(max(a.staleness for a in ok)) if ok else None)]
            capped = sum(a.capped for a in ok)
            if capped:
                report.metrics.append((platform, "capped", float(capped)))
        described = [failure_reason(f) for f in failures]
        report.failures = [(p, cid, why) for p, cid, why, _ in described]
        for platform in self.strategy.manifest["platforms"]:
            lost = sum(1 for p, _, _, _ in described if p == platform)
            if lost:
                report.metrics.append((platform, "failures", float(lost)))
        violations: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.strategy._violations(report, violations)  # duplicated / out-of-order messages
        report.metrics += [(p, "protocol_violations", v["protocol_violations"])
                           for p, v in violations.items()]
        if described:
            log.warning("version %d: %d fit(s) failed since the last version: %s",
                        state.version, len(described),
                        summarize([why for _, _, why, _ in described]))
        report.metrics += [("all", "failures", float(len(failures))),
                           ("all", "seconds", now - self._start),
                           ("all", "version_seconds", now - self._last_version_at),
                           ("all", "buffer_size", float(self.options.buffer_size)),
                           ("all", "aggregate_seconds", time.perf_counter() - t0)]
        self._last_version_at = now
        if self.strategy.on_fit_round is not None:
            self.strategy.on_fit_round(report, self.strategy.global_)
        if (new is not None and self._evaluates()
                and (self.versions_made % self.options.evaluate_every == 0
                     or self.versions_made >= self.max_versions)):
            self._schedule_evaluation()

    # -- evaluation ------------------------------------------------------------------------
    def _evaluates(self) -> bool:
        return bool(self.options.evaluate_every) and self.strategy.fraction_evaluate > 0

    def _schedule_evaluation(self) -> None:
        """Evaluate the current version on ``fraction_evaluate`` of the connected phones,
        as they become idle."""
        target = max(1, int(self.cm.num_available() * self.strategy.fraction_evaluate))
        self._evals.append(_Evaluation(self.state.version, target))
        self._last_evaluated = self.state.version

    def _open_evaluation(self) -> _Evaluation | None:
        """The newest scheduled evaluation still short of phones (older ones close with
        what they have: a newer model is worth more than an older one's coverage)."""
        for ev in self._evals[:-1]:
            ev.target = ev.dispatched
        for ev in self._evals:  # its model left the window (max_staleness): no one else
            if ev.version not in self.state.versions:
                ev.target = ev.dispatched
        self._finish_evaluations()
        if self._evals and self._evals[-1].dispatched < self._evals[-1].target:
            return self._evals[-1]
        return None

    def _evaluated(self, job: _Job, res: Any, failure: BaseException | None) -> None:
        for ev in self._evals:
            if ev.version == job.version:
                if failure is None:
                    ev.results.append((job.client, res))
                else:
                    ev.failures.append(failure)
                break
        self._finish_evaluations()

    def _finish_evaluations(self) -> None:
        for ev in [e for e in self._evals if e.dispatched >= e.target
                   and e.returned >= e.dispatched]:
            self._evals.remove(ev)
            if ev.dispatched:
                self.strategy.aggregate_evaluate(ev.version - self.first_version,
                                                 ev.results, ev.failures)
