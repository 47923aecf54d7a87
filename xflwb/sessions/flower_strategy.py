"""The Flower ``Strategy`` the legacy transport drives: a thin adapter over the federation
core (``xflwb.federation``).

Flower's legacy ``Server`` (phone sessions over gRPC, simulations over Ray's grid, SecAgg+'s
workflow) samples clients through a ``ClientManager``, sends ``FitIns`` and collects
``FitRes``; everything a round *means* is ``xflwb.federation.rounds.Round``: the gate
decodes and validates (``UpdateGate``), the bounds weigh (``Bounds``), the policy
aggregates (FedAvg, a server optimiser, a robust rule, DP around a mean, SecAgg+ sums). This
module only translates: Flower's client proxies and messages in, canonical updates and
round reports out, and Flower's failure shapes into reasons (``failure_reason``).

Public names for the hosts (FedBuff's loop, the session processes): ``gate``, ``bounds``,
``core`` (the ``Round``), ``policy``, ``refused(cid)``, ``accept(platform, res, base)``,
``progress(**state)``, ``drain_violations(report, per)``, ``masks``, ``Tracked``. The old
underscore spellings (``_accept``, ``_bounded``, ``_refused``, ``_progress``,
``_violations``, ``_masks``) remain as thin aliases until every caller moved.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from xflwb.bridge.arrays import Array
from xflwb.bridge.manifest import Manifest
from xflwb.errors import DeviceFailure
from xflwb.federation.bounds import Bounds
from xflwb.federation.dp import CentralDP
from xflwb.federation.gate import TENSOR_TYPES, UpdateGate
from xflwb.federation.influence import (
    PeerWindow,
)
from xflwb.federation.report import MAX_REASONS, AllClientsFailed, RoundReport, summarize
from xflwb.federation.rounds import ClientRefused, Failure, Round
from xflwb.flower_legacy import (
    ClientManager,
    ClientProxy,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Strategy,
    ndarrays_to_parameters,
)
from xflwb.sessions.violations import drain_violations as drain_reported

__all__ = ["MAX_REASONS", "TENSOR_TYPES", "AllClientsFailed", "ClientFailure",
           "ClientRefused", "CrossPlatformStrategy", "MissedDeadline", "RoundReport",
           "Scheduler", "Tracked", "failure_reason", "summarize"]

log = logging.getLogger("xflwb.strategy")


class ClientFailure(DeviceFailure):
    """A client's fit raised: carries its platform and id into Flower's failures list (a
    bare exception there names no client)."""

    def __init__(self, platform: str, cid: str, cause: BaseException) -> None:
        super().__init__(f"{platform} client {cid}: {type(cause).__name__}: {cause}")
        self.platform, self.cid, self.cause = platform, cid, cause


class MissedDeadline(ClientFailure):
    """A phone's fit not back within the session's ``deadline``: a straggler of its
    platform, not an error (counted in the round's ``stragglers``)."""


#: the reason a straggler is recorded with
STRAGGLER = "missed the deadline (straggler)"


def _exception_reason(exc: BaseException) -> tuple[str, bool]:
    """(reason, is_error) of an exception a client proxy raised; lost connections and
    timeouts are not errors (a phone may come back), everything else is."""
    name = type(exc).__name__
    if name == "GrpcBridgeClosed":
        return "disconnected mid-fit", False
    if isinstance(exc, TimeoutError) or name == "TimeoutError":
        return "timed out (round_timeout)", False
    text = str(exc)
    # Flower's simulation wraps a ClientApp's exception as "Message contains an Error
    # (reason: <class ...ClientAppException>:<'\nException ... Message: TEXT'>) ..."
    inner = re.search(r"occurred\. Message: (.*?)'>\)", text, re.S)
    if inner:
        return inner.group(1).strip(), True
    return f"{name}: {text}".strip(), True


def failure_reason(failure: Any) -> tuple[str, str, str, bool]:
    """(platform, client id, reason, is_error) of one entry of Flower's ``failures``: a
    ``(client, FitRes)`` with a non-OK status, or an exception."""
    if isinstance(failure, tuple) and len(failure) == 2:
        client, res = failure
        status = getattr(res, "status", None)
        message = str(getattr(status, "message", "") or "").strip()
        code = getattr(getattr(status, "code", None), "name", "not OK")
        reason = message or f"status {code}"
        transient = reason.startswith("dropped out")  # simulated dropouts (drop_prob)
        return (getattr(client, "platform", "unknown"), str(getattr(client, "cid", "?")),
                reason, not transient)
    if isinstance(failure, MissedDeadline):
        return failure.platform, failure.cid, STRAGGLER, False
    if isinstance(failure, ClientFailure):
        reason, is_error = _exception_reason(failure.cause)
        return failure.platform, failure.cid, reason, is_error
    reason, is_error = _exception_reason(failure)
    return "unknown", "?", reason, is_error


class Tracked(ClientProxy):
    """Delegates to a real client proxy, measuring fit time and bytes each way."""

    def __init__(self, inner: ClientProxy, platform: str,
                 deadline: float | None = None) -> None:
        super().__init__(inner.cid)
        #: wall seconds the fit may take (phones' ``deadline``): the wait is cut there
        self.deadline = deadline
        self.inner = inner
        # Flower's workflows address by it (Flower types it int; legacy gRPC proxies lack it)
        self.node_id = getattr(inner, "node_id", None)  # type: ignore[assignment]
        self.platform = platform
        self.seconds = 0.0
        self.bytes_down = 0
        self.bytes_up = 0

    def get_properties(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self.inner.get_properties(ins, timeout, group_id)

    def get_parameters(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self.inner.get_parameters(ins, timeout, group_id)

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        self.bytes_down = sum(len(t) for t in ins.parameters.tensors)
        if self.deadline is not None:
            timeout = self.deadline if timeout is None else min(timeout, self.deadline)
        t0 = time.perf_counter()
        try:
            res = self.inner.fit(ins, timeout, group_id)
        except Exception as exc:
            late = (self.deadline is not None
                    and time.perf_counter() - t0 >= self.deadline * 0.999
                    and _exception_reason(exc)[1] is False)  # timed out / cut at the deadline
            if late:
                raise MissedDeadline(self.platform, self.cid, exc) from exc
            raise ClientFailure(self.platform, self.cid, exc) from exc
        self.seconds = time.perf_counter() - t0
        self.bytes_up = sum(len(t) for t in res.parameters.tensors)
        return res

    def evaluate(self, ins: EvaluateIns, timeout: float | None,
                 group_id: int | None) -> EvaluateRes:
        return self.inner.evaluate(ins, timeout, group_id)

    def reconnect(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self.inner.reconnect(ins, timeout, group_id)


def _cid_key(cid: str) -> tuple[int, int | str]:
    """Simulated clients' cids are partition ids: sorted numerically."""
    return (0, int(cid)) if str(cid).isdigit() else (1, str(cid))


class _FlowerFit:
    """A ``FitRes`` as the core reads it (``FitPayload``): attributes are read lazily, inside
    the core's per-client guard, so a malformed result costs only its client."""

    def __init__(self, client: ClientProxy, res: FitRes) -> None:
        self._client, self._res = client, res
        self.platform = str(getattr(client, "platform", "unknown"))
        self.client = str(client.cid)
        self.fit_seconds = float(getattr(client, "seconds", 0.0))
        self.bytes_up = int(getattr(client, "bytes_up", 0))
        self.bytes_down = int(getattr(client, "bytes_down", 0))

    @property
    def tensors(self) -> Any:
        return self._res.parameters.tensors

    @property
    def num_examples(self) -> Any:
        return self._res.num_examples

    @property
    def metrics(self) -> Any:
        return self._res.metrics


class _FlowerEval:
    """An ``EvaluateRes`` as the core reads it (``Evaluation``), lazily."""

    def __init__(self, client: ClientProxy, res: EvaluateRes) -> None:
        self._res = res
        self.platform = str(getattr(client, "platform", "unknown"))
        self.client = str(client.cid)

    @property
    def loss(self) -> Any:
        return self._res.loss

    @property
    def num_examples(self) -> Any:
        return self._res.num_examples

    @property
    def metrics(self) -> Any:
        return self._res.metrics


Metric = tuple[str, str, float | None]


class Scheduler(Protocol):
    """Who a round samples and in which order its results count, when the host decides it
    (the Simulation Engine: seeded sampling, the virtual clock's round rules); without one,
    Flower's client manager samples (phones)."""

    def sample(self, server_round: int, phase: str, fraction: float,
               client_manager: ClientManager, core: Round) -> list[ClientProxy]:
        """The clients of round ``server_round``'s ``phase`` ("fit" or "evaluate"); a fit
        calls ``core.admit`` first."""
        ...

    def order(self, server_round: int, results: Sequence[tuple[ClientProxy, FitRes]]
              ) -> list[tuple[ClientProxy, FitRes]]:
        """The round's results in the order they are aggregated."""
        ...

    def metrics(self, server_round: int) -> list[Metric]:
        """What the round adds to its report (``sim_seconds``, stragglers, ...)."""
        ...


def _core_attr(name: str, doc: str) -> property:
    """An attribute of the core ``Round`` (read and written through the adapter)."""
    return property(lambda self: getattr(self.core, name),
                    lambda self, value: setattr(self.core, name, value), doc=doc)


class CrossPlatformStrategy(Strategy):
    """A Flower strategy serving Android and iOS clients of one exported model: Flower's
    side of ``xflwb.federation.rounds.Round``."""

    def __init__(self, manifest: Manifest, initial: list[Array], *,
                 on_fit_round: Callable[[RoundReport, list[Array]], None] | None = None,
                 on_evaluate_round: Callable[[RoundReport], None] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 scheduler: Scheduler | None = None, **options: Any) -> None:
        """``options``: the core's (``Round.build`` and ``Round``: strategy,
        strategy_options, fraction_fit, min_clients, max_examples, privacy, secure_sums,
        compression, capable_by_default, over_select, deadline, ...), as a session's
        ``RoundOptions.strategy_arguments()`` gives them; the core's defaults apply to the
        ones not given. ``scheduler``: who samples (a simulation's; may also be set later);
        None: the client manager, with the core's ``over_select`` and ``deadline`` applied
        to the phones' wall clock."""
        super().__init__()
        self.scheduler = scheduler
        #: phones: round → the updates it needs (over-selection samples more)
        self._want: dict[int, int] = {}
        #: the federation core this adapter drives (gate, policy, bounds, global model)
        self.core = Round.build(manifest, initial, on_fit_round=on_fit_round,
                                on_evaluate_round=on_evaluate_round, on_progress=on_progress,
                                **options)
        #: the session's client manager, seen at configure time (FedBuff's loop sets it)
        self._manager: ClientManager | None = None

    def __repr__(self) -> str:
        return f"CrossPlatformStrategy({self.manifest['name']}, {self.policy.describe()})"

    # -- the core's parts, by their public names ---------------------------------------------
    @property
    def gate(self) -> UpdateGate:
        """Decodes, maps, validates and encodes (``xflwb.federation.gate``)."""
        return self.core.gate

    @property
    def bounds(self) -> Bounds:
        """The relative weight and norm bounds (``xflwb.federation.bounds``)."""
        return self.core.bounds

    @property
    def policy(self) -> Any:
        """What aggregates (``xflwb.federation.policies``)."""
        return self.core.policy

    @property
    def manifest(self) -> Manifest:
        return self.core.gate.manifest

    @manifest.setter
    def manifest(self, value: Manifest) -> None:
        self.core.gate.manifest = value

    @property
    def masks(self) -> dict[str, list[bool]]:
        """Each platform's trained mask over the canonical tensors."""
        return self.core.gate.masks

    @property
    def dp(self) -> CentralDP | None:
        """The DP mechanism (its ledger), or None without privacy."""
        return self.core.dp  # type: ignore[no-any-return]

    @property
    def inner(self) -> Any:
        """Flower's strategy of the policy's name (its constructor checked the options)."""
        policy = self.core.policy
        return getattr(getattr(policy, "inner", policy), "flower", None)

    @property
    def norms(self) -> dict[str, PeerWindow]:
        return self.core.bounds.norms

    @property
    def max_weight_ratio(self) -> float | None:
        return self.core.bounds.max_weight_ratio

    @property
    def max_norm_ratio(self) -> float | None:
        return self.core.bounds.max_norm_ratio

    @property
    def max_examples(self) -> int | None:
        return self.core.gate.max_examples

    @property
    def max_update_norm(self) -> float | None:
        return self.core.gate.max_update_norm

    global_ = _core_attr("global_", "The global model (canonical float32 arrays).")
    codec_of = _core_attr("codec_of", "Client id → the tensor encoding it used.")
    min_clients = _core_attr("min_clients", "Clients a round needs before it starts.")
    local_epochs = _core_attr("local_epochs", "Epochs each client trains per round.")
    fraction_fit = _core_attr("fraction_fit", "Fraction of the clients sampled to fit.")
    fraction_evaluate = _core_attr("fraction_evaluate", "Fraction sampled to evaluate.")
    secure_sums = _core_attr("secure_sums", "Results carry SecAgg+'s unmasked sums.")
    on_fit_round = _core_attr("on_fit_round", "Called with each round's report and model.")
    on_evaluate_round = _core_attr("on_evaluate_round", "Called with each evaluation report.")
    on_progress = _core_attr("on_progress", "Called with each change of progress state.")
    #: cid → why its results are refused, or None (``DeviceStreams.refused`` under
    #: device_auth="token"): asked right before each update is used
    refuse = _core_attr("refuse", "Client id → why its results may not count, or None.")

    # -- public steps (FedBuff's loop and the hosts use them) --------------------------------
    def progress(self, **state: Any) -> None:
        """Tell the session what the server is doing (only changes)."""
        self.core.progress(**state)

    def refused(self, cid: str) -> None:
        """``ClientRefused`` when ``refuse`` says ``cid``'s results may not count."""
        self.core.refused(cid)

    def accept(self, platform: str, res: FitRes, base: list[Array] | None = None
               ) -> tuple[list[Array], int, bool, str]:
        """Decode, map to canonical space and check one client's FitRes: (canonical
        arrays, examples it counts for, capped?, its encoding). Raises on anything wrong;
        a KeyError is a manifest fault (ours), every other exception that client's
        rejection. ``base``: the model the client trained from (default: the global model;
        FedBuff passes the older version a late update started from)."""
        update = self.core.gate.accept(
            platform, "", res.parameters.tensors, res.num_examples, res.metrics,
            self.core.global_ if base is None else base)
        return update.tensors, update.examples, update.capped, update.codec

    def attach(self, client_manager: ClientManager) -> None:
        """The session's client manager, for a loop that samples without ``configure_fit``
        (FedBuff): protocol violations are drained from it."""
        self._manager = client_manager

    def drain_violations(self, report: RoundReport,
                         per: dict[str, dict[str, float]]) -> None:
        """Protocol violations reported since the last round (duplicated or out-of-order
        messages, dropped by ``StrictFlowerServicer``) become rejections of this round."""
        if self._manager is not None:
            Round.record_violations(report, per, drain_reported(self._manager))

    # -- compatibility spellings (FedBuff's loop; the lead re-points it after merging) -------
    @property
    def _masks(self) -> dict[str, list[bool]]:
        return self.masks

    def _progress(self, **state: Any) -> None:
        self.progress(**state)

    def _refused(self, cid: str) -> None:
        self.refused(cid)

    def _accept(self, platform: str, res: FitRes, base: list[Array] | None = None
                ) -> tuple[list[Array], int, bool, str]:
        return self.accept(platform, res, base)

    def _examples(self, value: Any) -> tuple[int, bool]:
        return self.core.gate.examples(value)

    def _bounded(self, platform: str, cid: str, canonical: list[Array], n: int,
                 base: list[Array] | None = None, cap: int | None = None,
                 scale: float = 1.0) -> tuple[int, bool]:
        return self.core.bounds.bound(platform, cid, canonical, n,
                                      self.core.global_ if base is None else base, cap, scale)

    def _violations(self, report: RoundReport, per: dict[str, dict[str, float]]) -> None:
        self.drain_violations(report, per)

    # -- Flower's Strategy ---------------------------------------------------------------
    def _sample(self, client_manager: ClientManager, fraction: float, server_round: int,
                phase: str) -> list[ClientProxy]:
        self._manager = client_manager
        core = self.core
        if self.scheduler is not None:
            return self.scheduler.sample(server_round, phase, fraction, client_manager, core)
        # wait for the minimum first, so the fraction applies to everyone then connected;
        # in 1 s steps, reporting how many are connected while waiting
        if client_manager.num_available() < core.min_clients:
            core.progress(phase="waiting", round=server_round,
                          connected=client_manager.num_available(), needed=core.min_clients)
        while not client_manager.wait_for(core.min_clients, timeout=1):
            core.progress(phase="waiting", round=server_round,
                          connected=client_manager.num_available(), needed=core.min_clients)
        available = client_manager.num_available()
        n = core.sample_size(available, fraction)
        if phase == "fit":
            # over-selection: ceil(n·(1 + over_select)) phones, the first n to report count
            self._want[server_round] = min(n, available)
            n = min(available, math.ceil(n * (1.0 + core.over_select) - 1e-9))
            core.admit(server_round, available, n)  # PrivacyBudgetSpent before any training
        clients = client_manager.sample(num_clients=n, min_num_clients=core.min_clients)
        core.progress(phase=phase, round=server_round, connected=available,
                      needed=core.min_clients, selected=len(clients))
        return clients

    def _targets(self, client_manager: ClientManager, fraction: float, server_round: int,
                 phase: str) -> list[tuple[ClientProxy, str, Parameters, dict[str, Any]]]:
        """Sampled clients with their platform, the global model in their layout and
        encoding or negotiated down-link codec (encoded once per platform and encoding, not
        once per client), and the config keys their fit adds (``KEY_UP``). What a client
        declared is its probe's ``codecs`` (``xflwb.server.clients``); none: float32."""
        out: list[tuple[ClientProxy, str, Parameters, dict[str, Any]]] = []
        for client in self._sample(client_manager, fraction, server_round, phase):
            platform = getattr(client, "platform", None)
            if platform is not None and platform in self.manifest["platforms"]:
                tensors, tensor_type, extra = self.core.downlink(
                    client.cid, platform, getattr(client, "codec", "raw"),
                    getattr(client, "codecs", None), fit=phase == "fit")
                out.append((client, platform,
                            Parameters(tensors=tensors, tensor_type=tensor_type), extra))
        return out

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.core.global_)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        targets = self._targets(client_manager, self.core.fraction_fit, server_round, "fit")
        if not targets and self.scheduler is not None:
            # nobody to train (every selected client straggles or drops out): Flower skips
            # the fit, so the round (its counts and clock) is recorded here, model unchanged
            self.core.aggregate_fit(server_round, [], [], [],
                                    self.scheduler.metrics(server_round))
            return []
        config = self.core.fit_config()
        # phones: the deadline cuts each fit's wait (the simulation's is simulated time)
        deadline = self.core.deadline if self.scheduler is None else None
        return [(Tracked(client, platform, deadline),
                 FitIns(parameters=enc, config={**config, **extra}))
                for client, platform, enc, extra in targets]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        violations = drain_reported(self._manager) if self._manager is not None else []
        if self.scheduler is not None:
            results = self.scheduler.order(server_round, results)
            extra = self.scheduler.metrics(server_round)
        else:
            results, failures, extra = self._phone_rules(server_round, results, failures)
        described = [Failure(*failure_reason(f)) for f in failures]
        if self.scheduler is not None:  # the order Flower's threads finished in is not data
            described.sort(key=lambda f: (f.platform, len(f.client), f.client, f.reason))
        self.core.aggregate_fit(server_round, [_FlowerFit(c, r) for c, r in results],
                                described, violations, extra)
        return ndarrays_to_parameters(self.core.global_), {}

    def _phone_rules(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                     failures: list[Any]
                     ) -> tuple[list[tuple[ClientProxy, FitRes]], list[Any], list[Metric]]:
        """Phones under ``over_select`` / ``deadline``: the results in order of measured fit
        time, the first n kept, the later ones and the fits cut at the deadline counted per
        platform as stragglers (not failures). Flower's legacy ``Server`` waits for every
        fit it started (up to the deadline), so over-selection saves no wall time here: it
        makes the round's n less sensitive to slow phones, not shorter."""
        want = self._want.pop(server_round, None)
        core = self.core
        if core.deadline is None and not core.over_select:
            return results, failures, []
        ordered = sorted(results, key=lambda cr: (float(getattr(cr[0], "seconds", 0.0)),
                                                  str(cr[0].cid)))
        keep = ordered if want is None else ordered[:want]
        late = [getattr(c, "platform", "unknown") for c, _ in ordered[len(keep):]]
        late += [f.platform for f in failures if isinstance(f, MissedDeadline)]
        rest = [f for f in failures if not isinstance(f, MissedDeadline)]
        selected = Counter(getattr(c, "platform", "unknown") for c, _ in results)
        selected.update(failure_reason(f)[0] for f in failures)
        stragglers = Counter(late)
        platforms = sorted(set(selected) | set(stragglers))
        extra: list[Metric] = [(p, "selected", float(selected[p])) for p in platforms]
        extra += [(p, "stragglers", float(stragglers[p])) for p in platforms]
        extra += [("all", "selected", float(sum(selected.values()))),
                  ("all", "stragglers", float(len(late)))]
        if late:
            log.info("round %s: %s straggler(s) not aggregated (deadline %s s, over_select "
                     "%s)", server_round, len(late), core.deadline, core.over_select)
        return keep, rest, extra

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy,
                                                                        EvaluateIns]]:
        if self.core.fraction_evaluate <= 0:
            return []
        return [(client, EvaluateIns(parameters=enc, config={}))
                for client, platform, enc, _ in self._targets(client_manager,
                                                           self.core.fraction_evaluate,
                                                           server_round, "evaluate")]

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        if self.scheduler is not None:  # a deterministic order (float sums depend on it)
            results = sorted(results, key=lambda cr: _cid_key(cr[0].cid))
        loss, _ = self.core.aggregate_evaluate(
            server_round, [_FlowerEval(c, r) for c, r in results])  # type: ignore[misc]
        return loss, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


#: the old private spelling (FedBuff's loop imports it until the lead re-points it)
_Tracked = Tracked
