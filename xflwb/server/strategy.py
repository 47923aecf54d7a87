"""The cross-platform layer around aggregation: decode → canonical → validate → aggregate →
server optimiser → per-platform encode.

It wraps, rather than edits, the pieces it composes (STYLE.md): the masked average is
``StreamingFedAvg`` (which knows nothing of platforms or wire formats) and the server-side
optimiser is Flower's own strategy (FedAvgM, FedAdam, FedYogi, FedAdagrad) fed the masked
average as a single result, so it acts on the canonical pseudo-gradient exactly as Flower
defines it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xflwb.bridge import params
from xflwb.federation.aggregate import (
    DEFAULT_MAX_EXAMPLES,
    StreamingFedAvg,
    aggregate_robust,
    update_norm,
)
from xflwb.federation.influence import (
    DEFAULT_MAX_NORM_RATIO,
    DEFAULT_MAX_WEIGHT_RATIO,
    WARM,
    PeerWindow,
    weight_cap,
)
from xflwb.server.flower_legacy import (
    ROBUST_RULES,
    SERVER_STRATEGIES,
    ClientManager,
    ClientProxy,
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    Parameters,
    Status,
    Strategy,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from xflwb.server.privacy import CentralDP, reported_bit
from xflwb.server.protocol import drain_violations

log = logging.getLogger("xflwb.strategy")
TENSOR_TYPES = {"raw": "ND", "npy": "ndarray"}
#: how many distinct failure reasons a session's error quotes (the rest are counted)
MAX_REASONS = 3


class AllClientsFailed(RuntimeError):
    """Every client selected for a round failed, at least one with an error (not a lost
    connection): the next round would fail the same way, so the session fails with the
    clients' reasons instead of waiting for clients that will not come."""


class ClientRefused(PermissionError):
    """A client whose results may no longer count (its device token was revoked, expired
    or opened a newer stream: ``CrossPlatformStrategy.refuse``)."""


class ClientFailure(Exception):
    """A client's fit raised: carries its platform and id into Flower's failures list (a
    bare exception there names no client)."""

    def __init__(self, platform: str, cid: str, cause: BaseException) -> None:
        super().__init__(f"{platform} client {cid}: {type(cause).__name__}: {cause}")
        self.platform, self.cid, self.cause = platform, cid, cause


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
    if isinstance(failure, ClientFailure):
        reason, is_error = _exception_reason(failure.cause)
        return failure.platform, failure.cid, reason, is_error
    reason, is_error = _exception_reason(failure)
    return "unknown", "?", reason, is_error


_NUMBER = re.compile(r"\d+(\.\d+)?")


def summarize(reasons: list[str], limit: int = MAX_REASONS) -> str:
    """Distinct reasons, most frequent first, each with its count; the rest counted.

    Reasons that differ only in numbers (each device's sample count in the same shape
    error) count as one, quoted as the first of them."""
    first: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for r in reasons:
        key = _NUMBER.sub("#", r)
        first.setdefault(key, r)
        counts[key] += 1
    parts = [f"{first[k]} (×{n})" if n > 1 else first[k] for k, n in counts.most_common(limit)]
    rest = sum(n for _, n in counts.most_common()[limit:])
    if rest:
        parts.append(f"and {rest} more")
    return "; ".join(parts)


def wire_codec(res: Any) -> str:
    """The tensor encoding a client reads, from its GetParametersRes: the bytes say it when
    there are tensors (``.npy`` magic or raw float32), else the ``tensor_type`` ("ND" is
    FedKit's raw; Flower's SDKs write "numpy.ndarray" / "ndarray"), else the status (only
    Flower's SDKs answer GET_PARAMETERS_NOT_IMPLEMENTED, and they read ``.npy``); raw (FedKit)
    when nothing says."""
    parameters = getattr(res, "parameters", None)
    tensors = list(getattr(parameters, "tensors", None) or [])
    if tensors:
        return params.detect_codec(bytes(tensors[0]))
    kind = str(getattr(parameters, "tensor_type", "") or "").lower()
    if "ndarray" in kind or "numpy" in kind:
        return "npy"
    code = getattr(getattr(getattr(res, "status", None), "code", None), "name", "")
    return "npy" if code == "GET_PARAMETERS_NOT_IMPLEMENTED" else "raw"


class PlatformClientManager(ClientManager):
    """One per gRPC port: tags each client with the platform of the port it joined on, and
    registers it with the session's shared manager (DESIGN §4.3: never guess from sizes).

    With ``probe_timeout`` (sessions set it) a joining client is first asked for its
    parameters (GetParameters, which FedKit and every Flower SDK answer) and offered to the
    strategy only once the reply said which tensor encoding it reads: a stock Flower client
    cannot read raw float32, a FedKit phone cannot read ``.npy``, and the server must not
    guess before the first FitIns. A client that leaves or stays silent is never offered."""

    def __init__(self, shared: ClientManager, platform: str,
                 probe_timeout: float | None = None) -> None:
        self.shared = shared
        self.platform = platform
        self.probe_timeout = probe_timeout
        self._lock = threading.Lock()
        self._probing: set[str] = set()
        self._gone: set[str] = set()  # left while being probed

    def register(self, client: ClientProxy) -> bool:
        client.platform = self.platform  # type: ignore[attr-defined]
        if self.probe_timeout is None:
            return self.shared.register(client)
        with self._lock:
            self._probing.add(client.cid)
        threading.Thread(target=self._admit, args=(client,), daemon=True,
                         name=f"probe-{client.cid[:8]}").start()
        return True

    def _admit(self, client: ClientProxy) -> None:
        codec = None
        try:
            res = client.get_parameters(GetParametersIns(config={}),
                                        timeout=self.probe_timeout, group_id=None)
            codec = client.codec = wire_codec(res)  # type: ignore[attr-defined]
        except Exception as exc:  # it left, timed out or broke: it never trains
            log.info("%s client %s did not answer GetParameters at join (%s: %s)",
                     self.platform, client.cid, type(exc).__name__, exc)
        with self._lock:
            self._probing.discard(client.cid)
            gone = client.cid in self._gone
            self._gone.discard(client.cid)
            if codec is not None and not gone:
                log.info("%s client %s joined; it reads %s tensors", self.platform,
                         client.cid, codec)
                self.shared.register(client)

    def unregister(self, client: ClientProxy) -> None:
        with self._lock:
            if client.cid in self._probing:
                self._gone.add(client.cid)  # still being probed: never register it
                return
        self.shared.unregister(client)

    def num_available(self) -> int:
        return self.shared.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return self.shared.all()

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.shared.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Any = None) -> list[ClientProxy]:
        return self.shared.sample(num_clients, min_num_clients, criterion)


class _Tracked(ClientProxy):
    """Delegates to a real client proxy, measuring fit time and bytes each way."""

    def __init__(self, inner: ClientProxy, platform: str) -> None:
        super().__init__(inner.cid)
        self.inner = inner
        self.node_id = getattr(inner, "node_id", None)  # Flower's workflows address by it
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
        t0 = time.perf_counter()
        try:
            res = self.inner.fit(ins, timeout, group_id)
        except Exception as exc:
            raise ClientFailure(self.platform, self.cid, exc) from exc
        self.seconds = time.perf_counter() - t0
        self.bytes_up = sum(len(t) for t in res.parameters.tensors)
        return res

    def evaluate(self, ins: EvaluateIns, timeout: float | None,
                 group_id: int | None) -> EvaluateRes:
        return self.inner.evaluate(ins, timeout, group_id)

    def reconnect(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self.inner.reconnect(ins, timeout, group_id)


@dataclass
class RoundReport:
    """What one round produced, handed to the session for persistence."""

    round: int
    metrics: list[tuple[str, str, float | None]] = field(default_factory=list)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)  # platform, cid, why
    evaluations: list[tuple[str, str, float, int]] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # platform, cid, why
    #: set when every selected client failed with an error: the session fails after this
    #: round's record (no checkpoint, the round does not count)
    failed: str | None = None
    #: with DP, the round's ``PrivacyEvent`` when it released a model (persisted before
    #: the model is: the lineage's ledger, ``xflwb.sessions.lineage``)
    privacy_event: Any = None


def server_optimizer(name: str, initial: list[np.ndarray], **options: Any) -> Strategy:
    """Flower's strategy named ``name``, used only for its server-side update rule."""
    key = name.lower()
    if key not in SERVER_STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; use one of {sorted(SERVER_STRATEGIES)}")
    return SERVER_STRATEGIES[key](initial_parameters=ndarrays_to_parameters(initial),
                                  min_fit_clients=1, min_evaluate_clients=1,
                                  min_available_clients=1, **options)


class CrossPlatformStrategy(Strategy):
    """A Flower strategy serving Android and iOS clients of one exported model."""

    def __init__(self, manifest: dict[str, Any], initial: list[np.ndarray], *,
                 strategy: str = "fedavg", strategy_options: dict[str, Any] | None = None,
                 fraction_fit: float = 1.0, fraction_evaluate: float = 1.0,
                 min_clients: int = 2, local_epochs: int = 1,
                 max_examples: int | None = DEFAULT_MAX_EXAMPLES,
                 max_update_norm: float | None = None,
                 max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
                 max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO,
                 secure_sums: bool = False,
                 privacy: dict[str, Any] | None = None,
                 on_fit_round: Callable[[RoundReport, list[np.ndarray]], None] | None = None,
                 on_evaluate_round: Callable[[RoundReport], None] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.manifest = manifest
        self.global_ = [np.asarray(a, np.float32) for a in initial]
        self._check_manifest(manifest)
        # robust rules (ROBUST_RULES) replace the average; Flower's class still checks
        # their options (FedTrimmedAvg's beta range, Krum's counts)
        self.inner = server_optimizer(strategy, self.global_, **(strategy_options or {}))
        #: fit rounds run Flower's SecAgg+ workflow (``_add_secure_sums``): results carry
        #: the unmasked canonical sums, never one client's update
        self.secure_sums = bool(secure_sums)
        self.rule = strategy.lower() if strategy.lower() in ROBUST_RULES else None
        self.plain = strategy.lower() == "fedavg" or self.rule is not None
        #: central DP (``xflwb.server.privacy``): clipped, uniformly weighted, noised mean.
        #: A robust rule is no mean to noise (and selects on raw updates); secure sums
        #: hide the single updates the server clips, so the clients clip (``_add_secure_sums``)
        if privacy is not None and self.rule is not None:
            raise ValueError(f"privacy (central DP) cannot be combined with strategy "
                             f"{strategy!r}: use fedavg or a server optimiser")
        self.dp = CentralDP(privacy) if privacy is not None else None
        #: one update counts for at most this many examples (capped, counted as "capped")
        self.max_examples = None if max_examples is None else int(max_examples)
        #: updates whose canonical L2 distance to the global model exceeds this are
        #: rejected (not clipped: a clipped attack still moves the model by the bound)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        #: relative bounds (``xflwb.federation.influence``): weight ≤ ratio × the median claim;
        #: norm ≤ ratio × the median of recent norms (else rejected). Under DP every update
        #: weighs 1 and is clipped, and a peer-dependent rejection would break the noise's
        #: sensitivity; secure sums hide single updates; robust rules bound outliers
        #: themselves. ``norms`` holds each recent client's latest norm, across rounds, per
        #: platform: a platform's norm is over the tensors it trains (an Android update of a
        #: transfer model moves adapter, BatchNorm and head; an iOS one only the head), so
        #: its peers are the clients of the same platform.
        self.max_weight_ratio = None if max_weight_ratio is None else float(max_weight_ratio)
        self.max_norm_ratio = (None if (max_norm_ratio is None or privacy is not None
                                        or self.secure_sums or self.rule is not None)
                               else float(max_norm_ratio))
        self.norms: defaultdict[str, PeerWindow] = defaultdict(PeerWindow)
        self._manager: ClientManager | None = None  # the session's, seen at configure
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.min_clients = max(1, int(min_clients))
        self.local_epochs = int(local_epochs)
        self.on_fit_round = on_fit_round
        self.on_evaluate_round = on_evaluate_round
        self.on_progress = on_progress
        self._last_progress: dict[str, Any] = {}
        self.codec_of: dict[str, str] = {}  # cid → the encoding that client used
        #: cid → why its results are refused, or None (``DeviceStreams.refused`` under
        #: device_auth="token"): asked right before each update is used
        self.refuse: Callable[[str], str | None] | None = None
        self._lock = threading.Lock()
        self._masks = {p: params.trained_mask(manifest, p) for p in manifest["platforms"]}
        self._frozen = manifest.get("frozen", {}).get("sha256")

    def __repr__(self) -> str:
        return f"CrossPlatformStrategy({self.manifest['name']}, {self.inner.__class__.__name__})"

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        """Map the initial model to every platform and back, so a broken manifest (our
        export's fault) fails here, at session start, and is never taken for a client's
        bad update in a round."""
        for platform in manifest["platforms"]:
            try:
                params.from_platform(params.to_platform(self.global_, manifest, platform),
                                     manifest, platform, base=self.global_)
                params.trained_mask(manifest, platform)
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(
                    f"manifest of model {manifest.get('name')!r} is malformed for platform "
                    f"{platform!r} ({type(exc).__name__}: {exc}); re-export the model with "
                    "xflwb.export") from exc

    # -- helpers ---------------------------------------------------------------------------
    def _encoded(self, platform: str, codec: str,
                 cache: dict[tuple[str, str], Parameters]) -> Parameters:
        key = (platform, codec)
        if key not in cache:
            tensors = params.encode_tensors(
                params.to_platform(self.global_, self.manifest, platform), codec)
            cache[key] = Parameters(tensors=tensors, tensor_type=TENSOR_TYPES[codec])
        return cache[key]

    def _progress(self, **state: Any) -> None:
        """Tell the session what the server is doing (only changes), so ``wait`` and the
        dashboard can say what a session waits for."""
        if self.on_progress is not None and state != self._last_progress:
            self._last_progress = state
            try:
                self.on_progress(dict(state))
            except Exception as exc:  # reporting must never stop a round
                log.warning("progress report failed: %s", exc)

    def _sample(self, client_manager: ClientManager, fraction: float, server_round: int,
                phase: str) -> list[ClientProxy]:
        self._manager = client_manager
        # wait for the minimum first, so the fraction applies to everyone then connected;
        # in 1 s steps, reporting how many are connected while waiting
        if client_manager.num_available() < self.min_clients:
            self._progress(phase="waiting", round=server_round,
                           connected=client_manager.num_available(), needed=self.min_clients)
        while not client_manager.wait_for(self.min_clients, timeout=1):
            self._progress(phase="waiting", round=server_round,
                           connected=client_manager.num_available(), needed=self.min_clients)
        available = client_manager.num_available()
        n = max(int(available * fraction), self.min_clients)
        if phase == "fit" and self.dp is not None:
            # raises PrivacyBudgetSpent before anyone trains: the session ends "finished"
            self.dp.admit(server_round, available, min(n, available))
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_clients)
        self._progress(phase=phase, round=server_round, connected=available,
                       needed=self.min_clients, selected=len(clients))
        return clients

    def _targets(self, client_manager: ClientManager, fraction: float, server_round: int,
                 phase: str) -> list[tuple[ClientProxy, str, Parameters]]:
        """Sampled clients with their platform and the global model in their layout and
        encoding (encoded once per platform and encoding, not once per client)."""
        cache: dict[tuple[str, str], Parameters] = {}
        out = []
        for client in self._sample(client_manager, fraction, server_round, phase):
            platform = getattr(client, "platform", None)
            if platform in self.manifest["platforms"]:
                enc = self._encoded(platform, self.codec_of.get(
                    client.cid, getattr(client, "codec", "raw")), cache)
                out.append((client, platform, enc))
        return out

    # -- Strategy --------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        # FedKit reads local_epochs as a sint64 Scalar: a Python int serialises to it
        config: dict[str, Any] = {"local_epochs": self.local_epochs}
        targets = self._targets(client_manager, self.fraction_fit, server_round, "fit")
        if self.dp is not None:  # the norm clients clip to (Flower's DP mods read this key)
            config.update(self.dp.fit_config())
        return [(_Tracked(client, platform), FitIns(parameters=enc, config=config))
                for client, platform, enc in targets]

    def _refused(self, cid: str) -> None:
        """``ClientRefused`` when ``refuse`` says ``cid``'s results may not count."""
        why = self.refuse(cid) if self.refuse is not None else None
        if why:
            raise ClientRefused(why)

    def _examples(self, value: Any) -> tuple[int, bool]:
        """(examples the update counts for, whether it was capped), or ValueError."""
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"num_examples must be a positive integer, got {value!r}")
        n = int(value)
        if n <= 0:
            raise ValueError(f"num_examples must be positive, got {n}")
        if self.max_examples is not None and n > self.max_examples:
            return self.max_examples, True
        return n, False

    def _accept(self, platform: str, res: FitRes, base: list[np.ndarray] | None = None
                ) -> tuple[list[np.ndarray], int, bool, str]:
        """Decode, map to canonical space and check one client's FitRes: (canonical
        arrays, examples it counts for, capped?, its encoding). Raises on anything wrong;
        the caller turns it into that client's rejection, except a KeyError: only a
        manifest lookup raises one (our fault, not the client's), so it fails the round.

        ``base``: the model the client trained from (default: the global model; FedBuff
        passes the older version a late update started from)."""
        base = self.global_ if base is None else base
        frozen = (res.metrics or {}).get("frozen_sha256")
        if frozen is not None and self._frozen and frozen != self._frozen:
            raise ValueError(
                f"update computed on an artifact with different frozen weights "
                f"(frozen_sha256 {str(frozen)[:12]}…, this session's model has "
                f"{str(self._frozen)[:12]}…): the phone must download this session's "
                "model")
        if platform not in self._masks:
            raise ValueError(f"client joined as platform {platform!r}, which model "
                             f"'{self.manifest['name']}' was not exported for")
        n, capped = self._examples(res.num_examples)
        arrays, codec = params.decode_tensors(res.parameters.tensors)
        # tensors a platform does not hold are masked out: base fills them
        canonical = params.from_platform(arrays, self.manifest, platform, base=base)
        mask = self._masks[platform]
        if self.rule is not None:  # the streamed average checks this itself
            for k, (a, t) in enumerate(zip(canonical, mask, strict=True)):
                if t and not np.isfinite(a).all():
                    raise ValueError(f"parameter {k} contains NaN or inf (in float32)")
        if self.max_update_norm is not None:
            norm = update_norm(canonical, base, mask)
            if not np.isfinite(norm):
                raise ValueError("update contains NaN or inf (in float32)")
            if norm > self.max_update_norm:
                raise ValueError(
                    f"update norm {norm:.4g} exceeds max_update_norm "
                    f"{self.max_update_norm:g} (L2 distance to the global model over the "
                    f"tensors {platform} trains, canonical space); rejected, not clipped")
        return canonical, n, capped, codec

    def _bounded(self, platform: str, cid: str, canonical: list[np.ndarray], n: int,
                 base: list[np.ndarray] | None = None, cap: int | None = None,
                 scale: float = 1.0) -> tuple[int, bool]:
        """The relative bounds on one accepted update (``xflwb.federation.influence``):
        (examples it counts for, whether ``cap`` cut them), or ``UpdateTooLarge`` when its
        norm exceeds ``max_norm_ratio`` × the median of recent clients' norms. Its norm is
        remembered first, rejected or not: one entry per client moves no median, and a
        fleet whose updates all grow is followed instead of rejected for ever. ``scale``:
        FedBuff's staleness weight, so what is judged is the step the update will make (a
        stale update from an early, steep model is larger, and counts for less)."""
        if self.max_norm_ratio is not None:
            base = self.global_ if base is None else base
            norm = update_norm(canonical, base, self._masks[platform]) * scale
            if not np.isfinite(norm):
                raise ValueError("update contains NaN or inf (in float32)")
            peers = self.norms[platform]
            peers.observe(cid, norm)
            peers.check(norm, self.max_norm_ratio, platform)
        if cap is not None and n > cap:
            return cap, True
        return n, False

    def _round_bounds(self, results: list[tuple[ClientProxy, FitRes]]) -> int | None:
        """Before a round's updates are added: the weight cap from the round's claims (read
        only: num_examples), and, for a platform with fewer than ``WARM`` clients' norms
        known, every update's norm (decoded once more, then dropped: memory stays
        O(parameters)), so the first round's updates are judged against each other rather
        than against nothing."""
        claims = []
        for _, res in results:
            try:
                claims.append(self._examples(res.num_examples)[0])
            except Exception:  # its rejection comes with the second pass
                continue
        if self.max_norm_ratio is not None:
            for client, res in results:
                platform = str(getattr(client, "platform", "unknown"))
                if platform not in self._masks or len(self.norms[platform]) >= WARM:
                    continue
                try:
                    canonical = self._accept(platform, res)[0]
                    norm = update_norm(canonical, self.global_, self._masks[platform])
                except Exception:
                    continue
                self.norms[platform].observe(client.cid, norm)
        return weight_cap(claims, self.max_weight_ratio)

    def _violations(self, report: RoundReport,
                    per: dict[str, dict[str, float]]) -> None:
        """Protocol violations reported since the last round (duplicated or out-of-order
        messages, dropped by ``StrictFlowerServicer``) become rejections of this round."""
        if self._manager is None:
            return
        for platform, cid, why in drain_violations(self._manager):
            report.rejections.append((platform, cid, why))
            per[platform]["protocol_violations"] += 1

    def _add_secure_sums(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                         agg: StreamingFedAvg, report: RoundReport,
                         per: dict[str, dict[str, float]]) -> None:
        """SecAgg+ (``secure_sums``): every surviving client's FitRes carries the workflow's
        one unmasked aggregate (``xflwb.simulation.secagg``), over clients i with weights
        w_i (num_examples; 1 each under DP): per canonical tensor ``A_k = Σ w·m_k·x_k / W``,
        per tensor ``B_k = Σ w·m_k / W``, then ``U = Σ w / W``. The masked average is
        ``A_k / B_k`` over the tensors someone trained; it enters the average as one update
        (per tensor: under DP, weighted by its count of clients ``N·B_k/U``, which the noise
        is calibrated to), so its validation and the server optimiser apply to it. Only
        num_examples and metrics are per client (in clear, as in Flower); DP clients
        clipped their update themselves (Flower's fl-dp-sa)."""
        distinct = {id(res.parameters): res.parameters for _, res in results}.values()
        payloads = {tuple(bytes(t) for t in p.tensors) for p in distinct}
        report.metrics.append(("all", "secure_aggregates", float(len(payloads))))
        counts = []
        for client, res in results:
            n = int(res.num_examples)
            counts.append(n)
            stats = per[str(getattr(client, "platform", "unknown"))]
            stats["clients"] += 1
            stats["examples"] += n
        try:
            if len(payloads) != 1:
                raise ValueError(f"{len(payloads)} different aggregates in one round")
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            k = len(self.global_)
            if len(arrays) != 2 * k + 1:
                raise ValueError(f"expected {2 * k + 1} tensors (sums, weights, count), got "
                                 f"{len(arrays)}")
            total = float(np.asarray(arrays[2 * k]).reshape(-1)[0])
            # share of the weight behind each tensor; a tensor trained by the lightest
            # client alone has min(w) / Σw, below half of that it is quantisation noise
            shares = [float(np.asarray(w).reshape(-1)[0]) / total for w in arrays[k:2 * k]]
            lightest = 1 / len(counts) if self.dp is not None else min(counts) / sum(counts)
            mask = [s > 0.5 * lightest for s in shares]
            average = [np.asarray(a, np.float64).reshape(g.shape) / (s * total) if t else g
                       for a, s, t, g in zip(arrays[:k], shares, mask, self.global_,
                                             strict=True)]
            average = [np.asarray(a, np.float32) for a in average]
            if self.dp is None:
                agg.add(average, 1, mask)
                return
            clients = [round(s * len(counts)) if t else 0 for s, t in zip(shares, mask,
                                                                         strict=True)]
            for c in sorted(set(clients) - {0}):  # one update per count: the noise's c_k
                agg.add(average, c, [n == c for n in clients])
            for _, res in results:  # the bits the clients reported (they clipped)
                bit = reported_bit(res.metrics)
                self.dp.counted(1.0 if bit is None else bit)
        except Exception as exc:  # the aggregate is refused: the global model stays
            why = f"secure aggregate refused: {type(exc).__name__}: {exc}"
            log.warning("round %s: %s", server_round, why)
            report.rejections.append(("all", "server", why))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        t_start = time.perf_counter()
        report = RoundReport(server_round)
        agg = StreamingFedAvg(self.global_)
        kept: list[tuple[list[np.ndarray], int, list[bool]]] = []  # for a robust rule
        per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        if self.dp is not None:
            self.dp.begin()
        if self.secure_sums and results:
            self._add_secure_sums(server_round, results, agg, report, per)
        # weights are 1 under DP; secure sums carry no single update to bound
        cap = (self._round_bounds(results) if self.dp is None and not self.secure_sums
               else None)
        for client, res in [] if self.secure_sums else results:
            platform = str(getattr(client, "platform", "unknown"))
            stats = per[platform]
            stats["bytes_up"] += getattr(client, "bytes_up", 0)
            stats["bytes_down"] += getattr(client, "bytes_down", 0)
            try:
                self._refused(client.cid)
                canonical, n, capped, codec = self._accept(platform, res)
                if self.dp is None:  # weight ≤ ratio × median claim; norm within bounds
                    n, cut = self._bounded(platform, client.cid, canonical, n, cap=cap)
                    capped = capped or cut
                if self.dp is not None:  # its clipped delta, one vote (sensitivity C)
                    clipped, bit = self.dp.clip(canonical, self.global_,
                                                self._masks[platform], res.metrics)
                    agg.add(clipped, 1, self._masks[platform])
                    self.dp.counted(bit)
                elif self.rule is None:
                    agg.add(canonical, n, self._masks[platform])
                else:
                    kept.append((canonical, n, self._masks[platform]))
            except KeyError as exc:  # a manifest lookup: client data is never a key
                raise RuntimeError(
                    f"round {server_round}: a lookup failed while mapping {platform} client "
                    f"{client.cid}'s update (KeyError: {exc}): the manifest of model "
                    f"'{self.manifest.get('name')}' or xflwb is at fault, not the client; "
                    "re-export the model, and report it if it persists") from exc
            except Exception as exc:  # one client's update, whatever broke: only it is lost
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("round %s: rejected %s update from %s: %s", server_round,
                            platform, client.cid, reason)
                report.rejections.append((platform, client.cid, reason))
                stats["rejected"] += 1
                continue
            if capped:
                log.warning("round %s: %s client %s declared %s examples; counted as %s "
                            "(max_examples / max_weight_ratio × the round's median)",
                            server_round, platform, client.cid, res.num_examples, n)
                stats["capped"] += 1
            self.codec_of[client.cid] = codec
            stats["clients"] += 1
            stats["examples"] += n
            stats["fit_seconds"] += getattr(client, "seconds", 0.0)
        self._violations(report, per)
        new: list[np.ndarray] | None = None
        noise_std = 0.0
        if self.rule is not None and kept:
            # the options as Flower's constructor accepted them
            new = aggregate_robust(
                self.global_, kept, self.rule, beta=getattr(self.inner, "beta", 0.2),
                num_malicious_clients=getattr(self.inner, "num_malicious_clients", 0),
                num_clients_to_keep=getattr(self.inner, "num_clients_to_keep", 0))
        elif agg.count:
            average = agg.result()
            if self.dp is not None:  # the noised mean, before any server optimiser
                noise_std = self.dp.add_noise(average, agg.examples_per_parameter)
            if self.plain:
                new = average
            else:
                total = int(sum(s["examples"] for s in per.values()))
                fake = FitRes(status=Status(code=Code.OK, message=""),
                              parameters=ndarrays_to_parameters(average), num_examples=total,
                              metrics={})
                out, _ = self.inner.aggregate_fit(server_round, [(results[0][0], fake)], [])
                new = parameters_to_ndarrays(out)
        if new is not None:
            new = [np.asarray(a, np.float32) for a in new]
            if all(np.isfinite(a).all() for a in new):
                self.global_ = new
            else:  # e.g. FedAdam's v overflowing float32 on an average of ~1e38 values
                why = (f"the {self.inner.__class__.__name__} server update of round "
                       f"{server_round} produced NaN or inf; the global model keeps its "
                       "previous value")
                log.warning(why)
                report.rejections.append(("all", "server", why))
        for platform, stats in per.items():
            n = stats.get("clients", 0.0)
            report.metrics += [
                (platform, "clients", n), (platform, "examples", stats.get("examples", 0.0)),
                (platform, "fit_seconds", stats["fit_seconds"] / n if n else None),
                (platform, "bytes_up", stats["bytes_up"]),
                (platform, "bytes_per_update", stats["bytes_up"] / n if n else None),
                (platform, "bytes_down", stats["bytes_down"]),
                (platform, "rejected", stats.get("rejected", 0.0))]
            # recorded only when they happen (a round without them looks as it always did)
            report.metrics += [(platform, k, stats[k]) for k in ("capped", "protocol_violations")
                               if stats.get(k)]
        totals = {k: sum(s.get(k, 0.0) for s in per.values())
                  for k in ("clients", "examples", "bytes_up", "bytes_down", "rejected")}
        report.metrics += [("all", k, v) for k, v in totals.items()]
        report.metrics.append(("all", "failures", float(len(failures))))
        if self.dp is not None:  # epsilon, noise_std, clipping_norm
            report.metrics += self.dp.end_round(agg.count > 0, noise_std, len(failures))
            report.privacy_event = self.dp.last_event
        described = [failure_reason(f) for f in failures]
        by_platform = Counter(p for p, _, _, _ in described)
        report.metrics += [(p, "failures", float(n)) for p, n in by_platform.items()
                           if p in self.manifest["platforms"]]
        report.failures = [(p, cid, why) for p, cid, why, _ in described]
        if described:  # one line per round, not one per client of a large fleet
            log.warning("round %s: %s client(s) failed: %s", server_round, len(described),
                        summarize([why for _, _, why, _ in described]))
        errors = [why for _, _, why, is_error in described if is_error]
        if failures and not results and errors:
            lost = len(failures) - len(errors)
            who = (f"all {len(failures)} clients" if len(failures) > 1
                   else "the only client")
            report.failed = (f"{who} selected for round {server_round} failed"
                             f"{f' ({lost} lost their connection)' if lost else ''}: "
                             f"{summarize(errors)}")
        # server-side cost of the round's aggregation (decode, validate, average, optimiser)
        report.metrics.append(("all", "aggregate_seconds", time.perf_counter() - t_start))
        if self.on_fit_round is not None:
            self.on_fit_round(report, self.global_)
        if report.failed:
            raise AllClientsFailed(report.failed)
        return ndarrays_to_parameters(self.global_), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy,
                                                                        EvaluateIns]]:
        if self.fraction_evaluate <= 0:
            return []
        return [(client, EvaluateIns(parameters=enc, config={}))
                for client, platform, enc in self._targets(client_manager,
                                                           self.fraction_evaluate,
                                                           server_round, "evaluate")]

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        report = RoundReport(server_round)
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        # accuracy only where the client put it in EvaluateRes.metrics (simulated clients);
        # FedKit phones report it through telemetry instead, matched in the registry
        accs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for client, res in results:
            platform = str(getattr(client, "platform", "unknown"))
            try:  # an EvaluateRes is a phone's too: a bad one costs only its own report
                loss = float(res.loss)
                n = 0 if res.num_examples == 0 else self._examples(res.num_examples)[0]
                acc = (res.metrics or {}).get("accuracy")
            except Exception as exc:
                reason = f"evaluation ignored: {type(exc).__name__}: {exc}"
                log.warning("round %s: %s client %s: %s", server_round, platform, client.cid,
                            reason)
                report.rejections.append((platform, client.cid, reason))
                continue
            report.evaluations.append((platform, client.cid, loss, n))
            if n > 0 and np.isfinite(loss * n):
                sums[platform][0] += loss * n
                sums[platform][1] += n
            if (n > 0 and isinstance(acc, int | float) and not isinstance(acc, bool)
                    and np.isfinite(acc) and 0.0 <= acc <= 1.0):
                for key in (platform, "all"):
                    accs[key][0] += float(acc) * n
                    accs[key][1] += n
        for platform, (s, n) in sums.items():
            report.metrics += [(platform, "eval_loss", s / n if n else None),
                               (platform, "eval_examples", n)]
        s_all = sum(v[0] for v in sums.values())
        n_all = sum(v[1] for v in sums.values())
        loss_all = s_all / n_all if n_all else None
        report.metrics += [("all", "eval_loss", loss_all), ("all", "eval_examples", n_all)]
        report.metrics += [(key, "accuracy", s / n) for key, (s, n) in accs.items() if n]
        if self.on_evaluate_round is not None:
            self.on_evaluate_round(report)
        return loss_all, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None
