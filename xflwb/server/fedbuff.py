"""Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022) hosted on phones.

A synchronous round waits for its slowest phone. Here every idle connected phone is given
the current model at once; each update that comes back is mapped to canonical space and
its delta taken against the version *that phone started from*; every ``buffer_size``
accepted updates the server applies their staleness-weighted mean delta and makes a new
model version. Phones see only FitIns / FitRes, as in a round, so FedKit and Flower-SDK
phones work unchanged. Compression is negotiated per phone as in a round (the session's
``Round.negotiate``): a phone's model goes down in its down-link codec and its update is
decoded against the version it started from as that codec delivered it.

What FedBuff *means* is transport-free, in ``xflwb.federation``: the options, staleness
rules and ``VersionBuffer`` (``xflwb.federation.fedbuff``, re-exported here) and the
loop's decisions (``xflwb.federation.versions.VersionDriver``: who trains, what becomes of
each update, when it stops). ``AsyncLoop`` here is its host on Flower's ``ClientManager`` /
``ClientProxy``: it owns the thread pool, the waiting, FitIns / EvaluateIns / ReconnectIns
and the wire encoding, tells the driver what came back and does what it says. What a round
does per client (screen, decode, map, validate; the relative bounds; recording; evaluation
reports) is the session's ``CrossPlatformStrategy``'s, reached only through
``xflwb.sessions.fedbuff_port.StrategyPort`` (shared with the Simulation Engine's host), so
the masked cross-platform rule, validation and rejection are the synchronous ones.

Written here rather than taken from Flower: Flower has no asynchronous strategy (its
legacy ``Server.fit`` is strictly round-based, and a FedBuff PR was closed unmerged), and
NVFlare's FedBuff is tied to its own edge runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from xflwb.federation.codecs import KEY_UP
from xflwb.federation.fedbuff import (
    Arrival,
    FedBuff,
    StaleUpdate,
    VersionBuffer,
    fedbuff_options,
    staleness_rule,
)
from xflwb.federation.influence import PeerWindow
from xflwb.federation.versions import (
    AllFitsFailed,
    Job,
    Returned,
    VersionDriver,
    VersionMade,
)
from xflwb.flower_legacy import (
    ClientManager,
    ClientProxy,
    EvaluateIns,
    FitIns,
    Parameters,
    ReconnectIns,
)
from xflwb.sessions.fedbuff_port import StrategyPort
from xflwb.sessions.flower_strategy import CrossPlatformStrategy

# FedBuff's rules are spelled here too (``xflwb.server.fedbuff.FedBuff``, ...)
__all__ = ["Arrival", "AsyncLoop", "FedBuff", "StaleUpdate", "VersionBuffer",
           "fedbuff_options", "staleness_rule"]

log = logging.getLogger("xflwb.fedbuff")


@dataclass
class _Job:
    """A job in flight: the driver's ``Job`` with the proxy it runs on (a ``Tracked``
    for fits)."""

    kind: str  # "fit" | "evaluate"
    client: Any
    platform: str
    version: int

    def job(self) -> Job:
        return Job("fit" if self.kind == "fit" else "evaluate", self.client.cid,
                   self.platform, self.version)


class AsyncLoop:
    """Serve phones asynchronously until ``max_versions`` / ``max_seconds``.

    ``strategy``: the session's ``CrossPlatformStrategy`` (plain FedAvg inside; its
    ``global_`` follows the newest version). ``first_version``: the version the session
    starts from (a resumed session's checkpoint). ``on_arrival``: called with each
    ``Arrival`` (the session writes ``session.arrivals``)."""

    POLL = 0.25  # seconds between looks for newly connected phones

    def __init__(self, client_manager: ClientManager | None, strategy: CrossPlatformStrategy,
                 options: FedBuff, *, max_versions: int, first_version: int = 0,
                 round_timeout: float = 600.0, max_workers: int = 1024,
                 on_arrival: Callable[[Arrival], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cm = client_manager
        self.strategy = strategy
        self.port = StrategyPort(strategy)
        self.options = options
        self.round_timeout = float(round_timeout)
        self.on_arrival = on_arrival
        self.clock = clock
        port = self.port
        self.core = VersionDriver(
            port.model, options, masks=port.masks, accept=port.accept, clients=self,
            clock=clock, max_versions=max_versions, first_version=first_version,
            bounds=port, min_clients=port.min_clients,
            fraction_evaluate=port.fraction_evaluate,
            model_name=str(port.manifest.get("name")), screen=port.screen,
            summarize=port.summarize, on_arrival=self._record_arrival,
            on_version=self._version_made, on_evaluated=port.record_evaluation)
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="fedbuff")
        self._jobs: dict[Future[Any], _Job] = {}
        self._proxies: dict[str, ClientProxy] = {}  # the last look at the connected phones
        self._cache: dict[tuple[int, str, str], Parameters] = {}

    # -- the driver's view -----------------------------------------------------------------
    @property
    def state(self) -> VersionBuffer:
        return self.core.buffer

    @property
    def versions_made(self) -> int:
        return self.core.versions_made

    @property
    def max_versions(self) -> int:
        return self.core.max_versions

    @property
    def first_version(self) -> int:
        return self.core.first_version

    @property
    def claims(self) -> PeerWindow:
        return self.core.claims

    def connected(self) -> Mapping[str, str | None]:
        """The driver's ``ClientSource``: the connected phones and their platforms."""
        self._proxies = dict(self.cm.all()) if self.cm is not None else {}
        return {cid: getattr(c, "platform", None) for cid, c in self._proxies.items()}

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        """Until the stop rule: dispatch to idle phones, handle what came back; then wind
        down (the final evaluation, goodbyes)."""
        if self.cm is not None:
            self.port.attach(self.cm)
        self._wait_for_clients()
        self.core.begin()
        try:
            while not self.core.done():
                self._step()
            self._wind_down()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _step(self, fits: bool = True) -> None:
        """Give idle phones work, then handle what comes back within ``POLL`` seconds."""
        self._dispatch(self.core.next_jobs(fits))
        if not self._jobs:
            time.sleep(self.POLL)
            return
        done, _ = wait(list(self._jobs), timeout=self.POLL, return_when=FIRST_COMPLETED)
        for fut in done:
            # two updates back in one poll can fill the last buffer and one more: once the
            # last version is made the rest arrive late (the driver records them)
            self._complete(fut, self._jobs.pop(fut))

    def _wind_down(self) -> None:
        """After the last version no phone starts a fit. The final model's evaluation runs
        on phones as they become idle; fits still running are waited for (their updates
        are recorded as arriving too late, not applied); each idle phone is told the
        session is over (Flower's ReconnectIns without a delay, as
        ``Server.disconnect_all_clients``), so phones end cleanly instead of seeing their
        stream cut. At most ``round_timeout`` seconds; phones still busy then see their
        stream end when the session closes its ports."""
        deadline = self.clock() + self.round_timeout
        self.core.begin_wind_down()
        goodbyes: list[Future[Any]] = []
        while True:
            step = self.core.wind_down_step()
            self._dispatch(step.start)
            for cid in step.goodbye:
                if cid in self._proxies:
                    goodbyes.append(self._pool.submit(self._proxies[cid].reconnect,
                                                      ReconnectIns(seconds=None), 5, None))
            if step.over or self.clock() >= deadline:
                break
            self._step(fits=False)
        log.info("FedBuff: session over at version %d; %d phone(s) told, %d still busy",
                 self.state.version, self.core.told, len(self.core.running))
        wait(goodbyes, timeout=6)

    def _wait_for_clients(self) -> None:
        need = self.port.min_clients
        while self.cm is not None and not self.cm.wait_for(need, timeout=1):
            self.port.progress(phase="waiting", round=self.versions_made + 1,
                               connected=self.cm.num_available(), needed=need)

    # -- starting jobs ---------------------------------------------------------------------
    def _parameters(self, platform: str, client: ClientProxy, version: int) -> Parameters:
        """The model ``version`` in the client's layout and encoding or down-link codec
        (once per version, platform and encoding)."""
        codec = self.port.down(client)
        tensor_type = self.port.tensor_type(codec)
        key = (version, platform, tensor_type)
        if key not in self._cache:
            for old in [k for k in self._cache if k[0] < self.state.version]:
                del self._cache[old]
            tensors = self.port.encode(self.state.versions[version], platform, codec)
            self._cache[key] = Parameters(tensors=tensors, tensor_type=tensor_type)
        return self._cache[key]

    def _dispatch(self, jobs: list[Job]) -> None:
        """Start what the driver said on the phones it named, then report progress."""
        for job in jobs:
            client = self._proxies.get(job.client)
            if client is None:  # it left between the driver's two looks at the phones
                self.core.not_started(job)
                continue
            if job.kind == "evaluate":
                asked = EvaluateIns(parameters=self._parameters(job.platform, client,
                                                                job.version), config={})
                fut: Future[Any] = self._pool.submit(client.evaluate, asked,
                                                     self.round_timeout, job.version)
                self._jobs[fut] = _Job("evaluate", client, job.platform, job.version)
                continue
            # FedKit reads local_epochs as a sint64 Scalar: a Python int serialises to it
            config: dict[str, Any] = {"local_epochs": self.port.local_epochs}
            negotiated = self.port.asked[job.client] = self.port.negotiate(client)
            if negotiated.up is not None:
                config[KEY_UP] = negotiated.up.spec
            tracked = self.port.track(client, job.platform)
            ins = FitIns(parameters=self._parameters(job.platform, client, job.version),
                         config=config)
            fut = self._pool.submit(tracked.fit, ins, self.round_timeout, job.version)
            self._jobs[fut] = _Job("fit", tracked, job.platform, job.version)
        self.port.progress(phase="fedbuff", round=self.versions_made + 1,
                           connected=self.cm.num_available() if self.cm is not None else 0,
                           needed=0, selected=self.core.fits_running)

    # -- what came back --------------------------------------------------------------------
    def _complete(self, fut: Future[Any], job: _Job) -> None:
        """One job came back: tell the driver."""
        try:
            res = fut.result()
        except Exception as exc:
            failure: BaseException | None = exc
            res = None
        else:
            failure = None
        done = job.job()
        if job.kind == "evaluate":
            self.core.evaluated(done, result=(job.client, res) if failure is None else None,
                                failure=failure)
        elif failure is not None:
            try:
                self.core.fit_failed(done, self.port.describe(failure))
            except AllFitsFailed as exc:
                raise self.port.all_failed(exc) from exc
        else:
            f32 = self.port.float32_bytes(job.platform)
            self.core.fit_returned(done, res, Returned(
                examples=_claimed(res),
                fit_seconds=float(getattr(job.client, "seconds", 0.0)),
                bytes_up=int(getattr(job.client, "bytes_up", 0)),
                bytes_down=int(getattr(job.client, "bytes_down", 0)),
                bytes_up_float32=f32, bytes_down_float32=f32))

    def _record_arrival(self, arrival: Arrival) -> None:
        if self.on_arrival is not None:
            self.on_arrival(arrival)

    def _version_made(self, made: VersionMade) -> None:
        if made.model is not None:
            self.port.set_model(made.model)
        self.port.record_version(made)


def _claimed(res: Any) -> int:
    """The examples a FitRes claims, as recorded for an update arriving too late (0 when
    it claims nothing usable: it is never applied, only listed)."""
    try:
        return int(getattr(res, "num_examples", 0) or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
