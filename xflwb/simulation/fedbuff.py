"""FedBuff on the Simulation Engine, on a virtual clock.

Phones run FedBuff on the wall clock (``xflwb.server.fedbuff``); a simulated fleet runs it on
simulated seconds, so phones of very different speeds, each available only part of the
day, are simulated without waiting out their hours. The decisions are the very ``VersionDriver``
(``xflwb.federation.versions``) and the per-update rules the very ``StrategyPort``
(``xflwb.sessions.fedbuff_port``) phone sessions use; only time is simulated:

* a fit dispatched at virtual time ``t`` sends its FitIns at once (the model of that version,
  through the Grid to a Ray worker) and completes at ``t + Capacities.fit_seconds(...)``,
  unless its client becomes unavailable first (``Availability.until(t)``): then it is a
  drop-out at that time and trains nothing. Evaluations likewise (``evaluate_seconds``);
* completions are consumed in virtual-time order (a heap keyed ``(time, sequence)``), each
  waiting for its real result, so nothing depends on the order Ray finishes in: a seed gives
  the same versions, arrivals and model every time (given the same measured costs);
* when nothing runs and nobody is idle, the clock jumps to the next availability change.

``VirtualLoop`` is that event loop over a ``Runner`` (what actually runs a job);
``GridRunner`` runs jobs on the Simulation Engine's Grid client proxies; ``run_fedbuff`` is
the simulation process's entry.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from xflwb.bridge import params
from xflwb.bridge.arrays import Array
from xflwb.federation.codecs import KEY_UP, Codec
from xflwb.federation.fedbuff import Arrival, FedBuff
from xflwb.federation.fleet import (
    Availability,
    Capacities,
    NoClientAvailable,
    VirtualClock,
    fit_outcomes,
)
from xflwb.federation.versions import Accept, Failure, Job, Returned, VersionDriver, VersionMade
from xflwb.flower_legacy import ClientProxy, Code, EvaluateIns, FitIns, Parameters
from xflwb.sessions.fedbuff_port import StrategyPort

__all__ = ["AvailableClients", "Done", "Event", "EventQueue", "GridRunner", "Runner",
           "VirtualLoop", "run_fedbuff", "serve"]

log = logging.getLogger("xflwb.fedbuff")

#: the reason a simulated drop-out is recorded with (a failure, not an error: no rest)
DROPOUT = "became unavailable (simulated)"
#: wall seconds between progress reports (the dashboard reads them; events are fast)
PROGRESS_EVERY = 0.5


class AvailableClients:
    """The driver's ``ClientSource`` on a virtual clock: the clients available now (client
    id = partition id as a string → its platform). Recomputed only when the clock reaches
    the next availability change: between two changes the fleet's availability is fixed."""

    def __init__(self, availability: Availability, platforms: Sequence[str],
                 clock: VirtualClock) -> None:
        self.availability = availability
        self.platforms = np.asarray(platforms, dtype=object)
        self.clock = clock
        self._since = math.inf  # the current answer holds on [_since, _until)
        self._until = -math.inf
        self._now: dict[str, str | None] = {}

    def connected(self) -> Mapping[str, str | None]:
        now = self.clock.now
        if not self._since <= now < self._until:
            on = np.flatnonzero(self.availability.available(now))
            self._now = {str(int(i)): str(self.platforms[i]) for i in on}
            self._since, self._until = now, self.availability.next_change(now)
        return self._now


@dataclass(order=True)
class Event:
    """A job's end on the virtual clock: its report, or its client's drop-out."""

    time: float
    seq: int
    job: Job = field(compare=False)
    handle: Any = field(compare=False, default=None)  # the runner's (None: never sent)
    dropped: bool = field(compare=False, default=False)
    seconds: float = field(compare=False, default=0.0)  # simulated duration had it finished


class EventQueue:
    """Jobs in flight, earliest end first; ties in dispatch order (the sequence number), so
    the order is a function of virtual times and dispatch order alone."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0

    def push(self, time: float, job: Job, handle: Any = None, dropped: bool = False,
             seconds: float = 0.0) -> Event:
        ev = Event(float(time), self._seq, job, handle, dropped, float(seconds))
        self._seq += 1
        heapq.heappush(self._heap, ev)
        return ev

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def peek(self) -> Event | None:
        return self._heap[0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


@dataclass
class Done:
    """What a job's real run gave: a fit's result (or its failure), an evaluation's result
    (or its error)."""

    result: Any = None
    failure: Failure | None = None  # a fit that failed
    error: BaseException | None = None  # an evaluation that failed
    returned: Returned = field(default_factory=Returned)


class Runner(Protocol):
    """What actually runs jobs (the Simulation Engine's Grid; a test's stand-in)."""

    def sizes(self, job: Job) -> tuple[int, int]:
        """(bytes of the model sent, bytes the reply is expected to take) — known before
        the job runs, since its simulated duration depends on them."""
        ...

    def start(self, job: Job) -> Any:
        """Send the job (it runs in the background); a handle for ``finish``."""
        ...

    def finish(self, handle: Any, job: Job) -> Done:
        """Wait for the job's real result."""
        ...


class VirtualLoop:
    """FedBuff on a virtual clock: the ``VersionDriver``'s host over a ``Runner``.

    ``caps``/``availability``: the simulated fleet (client ``i`` is partition ``i``,
    client id ``str(i)``); ``train_examples``/``test_examples``: per client, what its fit and
    evaluation take time for. The driver's other arguments (``first_version``, ``bounds``,
    ``min_clients``, ``fraction_evaluate``, ``model_name``, ``screen``, ``summarize``) pass
    through ``driver``. ``on_version`` gets each version with ("all", "sim_seconds") and
    per-platform ``dropouts`` added."""

    def __init__(self, initial: list[Array], options: FedBuff, *,
                 masks: Mapping[str, list[bool]], accept: Accept, caps: Capacities,
                 availability: Availability, train_examples: Sequence[int] | npt.NDArray[Any],
                 test_examples: Sequence[int] | npt.NDArray[Any], runner: Runner,
                 max_versions: int, local_epochs: int = 1,
                 clock: VirtualClock | None = None,
                 on_arrival: Callable[[Arrival], None] | None = None,
                 on_version: Callable[[VersionMade], None] | None = None,
                 on_evaluated: Callable[[int, list[Any], list[Any]], None] | None = None,
                 on_progress: Callable[..., None] | None = None, **driver: Any) -> None:
        n = len(caps)
        if availability.n != n or len(train_examples) != n or len(test_examples) != n:
            raise ValueError(f"the fleet's parts disagree on its size: {n} capacities, "
                             f"availability of {availability.n}, {len(train_examples)} and "
                             f"{len(test_examples)} example counts")
        self.caps = caps
        self.availability = availability
        self.train_examples = np.asarray(train_examples, np.float64)
        self.test_examples = np.asarray(test_examples, np.float64)
        self.runner = runner
        self.epochs = int(local_epochs)
        self.clock = clock or VirtualClock()
        self.options = options
        self.on_version = on_version
        self.on_progress = on_progress
        self.clients = AvailableClients(availability, caps.platform, self.clock)
        self.queue = EventQueue()
        self._dropouts: dict[str, int] = defaultdict(int)  # since the last version
        self._limit_at: float | None = None
        self._progress_at = -math.inf
        self.core = VersionDriver(
            initial, options, masks=masks, accept=accept, clients=self.clients,
            clock=self.clock, max_versions=max_versions, on_arrival=on_arrival,
            on_version=self._version_made, on_evaluated=on_evaluated, **driver)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        """Until the stop rule (``max_versions``, or ``max_seconds`` simulated); then the
        wind-down: fits in flight arrive late, the final model is evaluated."""
        self.core.begin()
        limit = self.options.max_seconds
        self._limit_at = None if limit is None else self.clock.now + float(limit)
        while not self.core.done():
            self.step()
        self.wind_down()
        self._progress(force=True)

    def step(self) -> None:
        """Give idle clients work, then move the clock to the next event (a job's end, or
        the next availability change when nothing runs) and handle it."""
        self._dispatch(self.core.next_jobs())
        nxt = self.queue.peek()
        when = nxt.time if nxt is not None else self.wake_time()
        if self._limit_at is not None and when > self._limit_at:
            self.clock.advance_to(self._limit_at)  # the stop rule holds from here
            return
        if nxt is None:
            if math.isinf(when):
                raise NoClientAvailable(
                    f"no client is available after {self.clock.now:g} simulated seconds, "
                    "and none ever will be (the availability trace ends): "
                    f"{self.core.versions_made} of {self.core.max_versions} versions were "
                    "made; pass strategy_options max_seconds, fewer max_versions, or a "
                    "longer trace")
            self.clock.advance_to(when)
            return
        self._handle(self.queue.pop())

    def wake_time(self) -> float:
        """When anything can change while nothing runs: the next availability change, or a
        resting client's return (``inf``: never)."""
        return min(self.availability.next_change(self.clock.now), self.core.next_rest_end())

    def wind_down(self) -> None:
        """After the stop rule: no fit starts; the final model's evaluation runs on clients
        as they become idle; fits in flight end in virtual order and arrive late."""
        self.core.begin_wind_down()
        while True:
            step = self.core.wind_down_step()
            self._dispatch(step.start)
            if step.over:
                return
            if self.queue:
                self._handle(self.queue.pop())
                continue
            when = self.wake_time()
            if math.isinf(when):  # an evaluation waits for clients that never come
                log.info("FedBuff: no client will become available for the final "
                         "evaluation; ending at version %d", self.core.version)
                return
            self.clock.advance_to(when)

    # -- starting jobs ---------------------------------------------------------------------
    def _dispatch(self, jobs: list[Job]) -> None:
        """Send each job now and schedule its end: its report after its simulated seconds,
        or its drop-out when its client becomes unavailable first (a drop-out is never
        sent: it would train for nothing)."""
        if not jobs:
            return
        now = self.clock.now
        idx = np.array([int(j.client) for j in jobs], np.int64)
        sizes = np.array([self.runner.sizes(j) for j in jobs], np.float64).reshape(-1, 2)
        fit = np.array([j.kind == "fit" for j in jobs])
        seconds = np.where(
            fit, self.caps.fit_seconds(idx, self.train_examples[idx], self.epochs,
                                       sizes[:, 0], sizes[:, 1]),
            self.caps.evaluate_seconds(idx, self.test_examples[idx], sizes[:, 0]))
        end, dropped = fit_outcomes(self.availability, idx, now, seconds)
        for job, t, gone, secs in zip(jobs, end.tolist(), dropped.tolist(), seconds.tolist(),
                                      strict=True):
            handle = None if gone else self.runner.start(job)
            self.queue.push(t, job, handle, gone, secs)
        self._progress()

    # -- what came back --------------------------------------------------------------------
    def _handle(self, ev: Event) -> None:
        """One job ended at ``ev.time``: the clock moves there and the driver is told."""
        self.clock.advance_to(ev.time)
        job = ev.job
        if ev.dropped:
            if job.kind == "evaluate":
                self.core.evaluated(job, failure=RuntimeError(DROPOUT))
                return
            if not self.core.late:
                self._dropouts[job.platform] += 1
            self.core.fit_failed(job, Failure(job.platform, job.client, DROPOUT, False))
            return
        done = self.runner.finish(ev.handle, job)
        if job.kind == "evaluate":
            self.core.evaluated(job, result=done.result if done.error is None else None,
                                failure=done.error)
        elif done.failure is not None:
            self.core.fit_failed(job, done.failure)
        else:
            self.core.fit_returned(job, done.result,
                                   dataclasses.replace(done.returned, fit_seconds=ev.seconds))

    def _version_made(self, made: VersionMade) -> None:
        """A version on the virtual clock: when it was made and who dropped out since."""
        made.metrics += [(p, "dropouts", float(self._dropouts.get(p, 0)))
                         for p in self.core.masks]
        made.metrics.append(("all", "dropouts", float(sum(self._dropouts.values()))))
        made.totals.append(("all", "sim_seconds", self.clock.now))
        self._dropouts.clear()
        if self.on_version is not None:
            self.on_version(made)

    def _progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        wall = time.monotonic()
        if not force and wall - self._progress_at < PROGRESS_EVERY:
            return
        self._progress_at = wall
        self.on_progress(phase="fedbuff", round=self.core.versions_made + 1,
                         connected=len(self.clients.connected()), needed=0,
                         selected=self.core.fits_running, sim_seconds=self.clock.now)


class GridRunner:
    """Jobs on the Simulation Engine: FitIns / EvaluateIns through the Grid's client proxies
    (one message each, in a thread pool: Ray trains as many at once as it has CPUs), in
    each platform's layout and negotiated codecs, measured like a phone's (``Tracked``)."""

    def __init__(self, port: StrategyPort, proxies: Mapping[str, ClientProxy],
                 versions: Callable[[int], list[Array]], round_timeout: float = 600.0,
                 max_workers: int = 256) -> None:
        self.port = port
        self.proxies = dict(proxies)
        self.versions = versions  # version → its model (canonical)
        self.round_timeout = float(round_timeout)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="simbuff")
        self._cache: dict[tuple[int, str, str], Parameters] = {}
        self._up: dict[tuple[str, str], int] = {}  # (platform, codec) → an update's bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _parameters(self, job: Job) -> Parameters:
        """Model ``job.version`` in the client's layout and down-link codec or encoding
        (once per version, platform and encoding)."""
        client = self.proxies[job.client]
        codec = self.port.down(client)
        tensor_type = self.port.tensor_type(codec)
        key = (job.version, job.platform, tensor_type)
        if key not in self._cache:
            if job.kind == "fit":  # older versions are sent only for their evaluation
                for old in [k for k in self._cache if k[0] < job.version - 1]:
                    del self._cache[old]
            tensors = self.port.encode(self.versions(job.version), job.platform, codec)
            self._cache[key] = Parameters(tensors=tensors, tensor_type=tensor_type)
        return self._cache[key]

    def _update_bytes(self, platform: str, up: Codec | None) -> int:
        """What an update of ``platform`` takes in ``up`` (None: float32), from a zero
        update of its layout's shapes: the size a codec gives does not depend on values."""
        key = (platform, up.spec if up is not None else "float32")
        if key not in self._up:
            if up is None:
                self._up[key] = self.port.float32_bytes(platform)
            else:
                rng = np.random.default_rng(0)
                shapes = params.platform_shapes(self.port.manifest, platform)
                self._up[key] = sum(len(up.encode(np.zeros(math.prod(s), np.float32), rng))
                                    for s in shapes)
        return self._up[key]

    def sizes(self, job: Job) -> tuple[int, int]:
        down = sum(len(t) for t in self._parameters(job).tensors)
        if job.kind != "fit":
            return down, 0
        up = self.port.negotiate(self.proxies[job.client]).up
        return down, self._update_bytes(job.platform, up)

    def _fit(self, job: Job) -> tuple[Future[Any], Any]:
        client = self.proxies[job.client]
        parameters = self._parameters(job)
        config: dict[str, Any] = {"local_epochs": self.port.local_epochs}
        negotiated = self.port.asked[job.client] = self.port.negotiate(client)
        if negotiated.up is not None:
            config[KEY_UP] = negotiated.up.spec
        tracked = self.port.track(client, job.platform)  # measures the bytes each way
        return self._pool.submit(tracked.fit, FitIns(parameters=parameters, config=config),
                                 self.round_timeout, job.version), tracked

    def start(self, job: Job) -> tuple[Future[Any], Any]:
        """The job's message on its way: (its future, the ``Tracked`` proxy of a fit)."""
        if job.kind == "evaluate":
            client = self.proxies[job.client]
            ins = EvaluateIns(parameters=self._parameters(job), config={})
            return self._pool.submit(client.evaluate, ins, self.round_timeout,
                                     job.version), None
        return self._fit(job)

    def finish(self, handle: Any, job: Job) -> Done:
        fut, tracked = handle
        try:
            res = fut.result()
        except Exception as exc:
            if job.kind == "evaluate":
                return Done(error=exc)
            return Done(failure=self.port.describe(exc))
        if job.kind == "evaluate":
            return Done(result=(self.proxies[job.client], res))
        if getattr(getattr(res, "status", None), "code", Code.OK) != Code.OK:
            return Done(failure=self.port.describe((tracked, res)))  # drop_prob's drop-out
        f32 = self.port.float32_bytes(job.platform)
        return Done(result=res, returned=Returned(
            examples=_claimed(res), bytes_up=int(tracked.bytes_up),
            bytes_down=int(tracked.bytes_down), bytes_up_float32=f32, bytes_down_float32=f32))


def _claimed(res: Any) -> int:
    """The examples a FitRes claims (0 when it claims nothing usable)."""
    try:
        return int(getattr(res, "num_examples", 0) or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def run_fedbuff(strategy: Any, proxies: Mapping[str, ClientProxy], options: FedBuff, *,
                caps: Capacities, availability: Availability,
                train_examples: Sequence[int] | npt.NDArray[Any],
                test_examples: Sequence[int] | npt.NDArray[Any], max_versions: int,
                round_timeout: float = 600.0, max_workers: int = 256,
                on_arrival: Callable[[Arrival], None] | None = None,
                after_version: Callable[[], None] | None = None) -> VirtualLoop:
    """FedBuff over the simulation's client proxies (client id = partition id) with the
    session's ``CrossPlatformStrategy``; returns the loop once it has wound down.
    ``after_version`` runs once each version is recorded (the arrivals' flush).
    ``AllFitsFailed`` becomes the strategy's ``AllClientsFailed``."""
    from xflwb.federation.versions import AllFitsFailed

    port = StrategyPort(strategy)
    holder: list[VirtualLoop] = []

    def version_made(made: VersionMade) -> None:
        if made.model is not None:
            port.set_model(made.model)
        port.record_version(made)
        if after_version is not None:
            after_version()

    runner = GridRunner(port, proxies, lambda v: holder[0].core.buffer.versions[v],
                        round_timeout=round_timeout, max_workers=max_workers)
    loop = VirtualLoop(
        port.model, options, masks=port.masks, accept=port.accept, caps=caps,
        availability=availability, train_examples=train_examples,
        test_examples=test_examples, runner=runner, max_versions=max_versions,
        local_epochs=port.local_epochs, on_arrival=on_arrival, on_version=version_made,
        on_evaluated=port.record_evaluation, on_progress=port.progress, bounds=port,
        min_clients=port.min_clients, fraction_evaluate=port.fraction_evaluate,
        model_name=str(port.manifest.get("name")), screen=port.screen,
        summarize=port.summarize)
    holder.append(loop)
    try:
        loop.run()
    except AllFitsFailed as exc:
        raise port.all_failed(exc) from exc
    finally:
        runner.close()
    return loop


def serve(proc: Any, grid: Any, cm: Any, strategy: Any, cfg: Any, manifest: Mapping[str, Any],
          spec: Any) -> VirtualLoop:
    """The simulation process's FedBuff (``xflwb.simulation.server`` when ``strategy`` is
    asynchronous): the fleet's capacities and availability (``virtual_fleet``), a Grid
    client proxy per node named by its partition id (``cm``: the ``NodeClientManager``),
    arrivals written to ``session.arrivals`` a version at a time."""
    from pathlib import Path

    from xflwb.federation.fedbuff import fedbuff_options
    from xflwb.flower_legacy import simulation_api
    from xflwb.simulation.virtual import virtual_fleet

    api = simulation_api()
    for node_id in cm.nodes:
        cm.register(api.GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id))
    proxies = dict(cm.all())
    fleet = virtual_fleet(cfg, Path(manifest["_dir"]), spec, proc.data_dir)
    options = fedbuff_options(cfg.strategy_options)
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        if rows:
            proc.registry.add_arrivals(proc.session_id, list(rows))
            rows.clear()

    def on_arrival(arrival: Arrival) -> None:
        rows.append(arrival.row())
        if len(rows) >= 512:
            flush()

    proc.log.info("FedBuff on the virtual clock: %d clients, buffer_size %d, up to %d "
                  "versions%s", len(fleet.caps), options.buffer_size,
                  int(options.max_versions or cfg.rounds),
                  "" if options.max_seconds is None
                  else f" or {options.max_seconds:g} simulated seconds")
    try:
        loop = run_fedbuff(strategy, proxies, options, caps=fleet.caps,
                           availability=fleet.availability,
                           train_examples=fleet.train_examples,
                           test_examples=fleet.test_examples, max_versions=cfg.rounds,
                           round_timeout=cfg.round_timeout, max_workers=cfg.max_workers,
                           on_arrival=on_arrival, after_version=flush)
    finally:
        flush()
    proc.log.info("FedBuff: %d versions in %.0f simulated seconds", loop.core.versions_made,
                  loop.clock.now)
    return loop
