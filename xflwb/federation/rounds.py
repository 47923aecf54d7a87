"""``Round``: the synchronous round, transport-free — sample, encode, fit, gate, bound,
aggregate, evaluate — with an injected clock and client source.

One ``Round`` object drives every round of a session: it holds the global model, the gate,
the policy, the relative bounds and each client's encoding. A host gives it clients in one
of two ways:

* ``run(round, source)`` drives a whole round over a ``ClientSource`` (sample n clients,
  fit them, evaluate them): what unit tests do with fakes (no processes, sockets, sleeps);
* the Flower adapter (``xflwb.sessions.flower_strategy``) lets Flower's legacy ``Server``
  sample and fit, and hands the results to ``aggregate_fit`` / ``aggregate_evaluate``.

Either way the same code decides what a round means: a rejected update costs only its
client, a manifest fault fails the round, a tensor one platform does not train never
dilutes one that did, DP clips and noises, the ledger advances.

Compression (``compression``: ``{"up": spec, "down": spec}``): each client gets the
session's codecs it declared (``negotiate``; a host passes what the client announced, and
simulations, whose clients are all xflwb's, say ``capable_by_default=True``). ``downlink``
encodes its model and the fit's extra config and remembers what was asked, so ``accept``
decodes its update against exactly what it received.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from xflwb.bridge.arrays import Array
from xflwb.bridge.manifest import Manifest
from xflwb.errors import InputError, SessionFailure, UpdateRejected
from xflwb.federation.aggregate import DEFAULT_MAX_EXAMPLES
from xflwb.federation.bounds import Bounds
from xflwb.federation.codecs import CODECS, KEY_UP, Codec
from xflwb.federation.compression import FLOAT32_ONLY, Negotiated, compression_dict, negotiate
from xflwb.federation.dp import reported_bit
from xflwb.federation.fairness import fairness_metrics
from xflwb.federation.gate import UpdateGate, tensor_type_of
from xflwb.federation.influence import DEFAULT_MAX_NORM_RATIO, DEFAULT_MAX_WEIGHT_RATIO
from xflwb.federation.policies import add_secure_sums, build
from xflwb.federation.report import AllClientsFailed, Failure, RoundReport, summarize
from xflwb.federation.update import Update

__all__ = ["ClientRefused", "ClientSource", "Evaluation", "Failure", "FitJob", "FitPayload",
           "FitResult", "ManifestFault", "Round", "Target"]

log = logging.getLogger("xflwb.strategy")
Violation = tuple[str, str, str]  # platform, client id, reason


class ClientRefused(UpdateRejected):
    """A client whose results may no longer count (its device token was revoked, expired
    or opened a newer stream: ``Round.refuse``)."""


class ManifestFault(SessionFailure):
    """A manifest lookup failed while mapping an update: the export (or xflwb) is at
    fault, not the client, so the round fails instead of rejecting an honest phone."""


@dataclass
class Target:
    """A sampled client: who, on which platform, reading which tensor encoding, declaring
    which compression codecs (None: it said nothing; see ``Round.negotiate``)."""

    client: str
    platform: str
    codec: str = "raw"
    codecs: frozenset[str] | None = None


@dataclass
class FitJob:
    """What one sampled client is asked to fit: the global model in its layout and
    encoding (``tensor_type`` says which), and the round's config."""

    target: Target
    tensors: list[bytes]
    config: dict[str, Any]
    tensor_type: str = "ND"


class FitPayload(Protocol):
    """One client's fit as the host received it (attributes may raise when read: a broken
    result costs only its client)."""

    platform: str
    client: str
    fit_seconds: float
    bytes_up: int
    bytes_down: int

    # read-only: a host may compute these when the core reads them
    @property
    def tensors(self) -> Sequence[bytes]: ...
    @property
    def num_examples(self) -> Any: ...
    @property
    def metrics(self) -> dict[str, Any] | None: ...


@dataclass
class FitResult:
    """A plain ``FitPayload``."""

    platform: str
    client: str
    tensors: Sequence[bytes]
    num_examples: Any
    metrics: dict[str, Any] | None = field(default_factory=dict)
    fit_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class Evaluation:
    """One client's evaluation as the host received it (attributes may raise when read)."""

    platform: str
    client: str
    loss: Any
    num_examples: Any
    metrics: dict[str, Any] | None = field(default_factory=dict)


class ClientSource(Protocol):
    """Where a ``Round`` gets its clients: a host's connected phones, simulated clients, or
    a test's fakes."""

    def available(self) -> int:
        """Clients connected now."""
        ...

    def sample(self, n: int) -> list[Target]:
        """``n`` of the connected clients, at random."""
        ...

    def fit(self, round: int, jobs: list[FitJob]
            ) -> tuple[Sequence[FitPayload], Sequence[Failure]]:
        """Fit every job; the results that came back and the clients that failed."""
        ...

    def evaluate(self, round: int, jobs: list[FitJob]
                 ) -> tuple[Sequence[Evaluation], Sequence[Failure]]:
        """Evaluate every job (``tensors``: the model to evaluate)."""
        ...


def _accuracy(value: Any) -> float | None:
    """A client's reported accuracy when it is one (a finite number in [0, 1]), else
    None."""
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and bool(np.isfinite(value)) and 0.0 <= value <= 1.0):
        return float(value)
    return None


class Round:
    """The synchronous rounds of one session (see the module docstring).

    ``clock``: seconds, monotonic (``aggregate_seconds``); ``refuse``: client id → why its
    results may not count, or None (device tokens); the callbacks receive each round's
    ``RoundReport`` (``on_fit_round`` also the new global model) and progress states.
    ``compression``: the session's codecs (``RoundOptions.compression``; None: float32);
    ``capable_by_default``: a client that declared nothing is taken as capable of every
    codec (simulations: every client is xflwb's own; phones are never assumed capable).
    """

    def __init__(self, gate: UpdateGate, policy: Any, bounds: Bounds,
                 initial: Sequence[Array], *, min_clients: int = 2,
                 fraction_fit: float = 1.0, fraction_evaluate: float = 1.0,
                 local_epochs: int = 1, secure_sums: bool = False,
                 clock: Callable[[], float] = time.perf_counter,
                 refuse: Callable[[str], str | None] | None = None,
                 on_fit_round: Callable[[RoundReport, list[Array]], None] | None = None,
                 on_evaluate_round: Callable[[RoundReport], None] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 compression: dict[str, str] | None = None,
                 capable_by_default: bool = False) -> None:
        self.gate, self.policy, self.bounds = gate, policy, bounds
        self.global_ = [np.asarray(a, np.float32) for a in initial]
        self.min_clients = max(1, int(min_clients))
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.local_epochs = int(local_epochs)
        #: results carry SecAgg+'s unmasked canonical sums, never one client's update
        self.secure_sums = bool(secure_sums)
        self.clock = clock
        self.refuse = refuse
        self.on_fit_round = on_fit_round
        self.on_evaluate_round = on_evaluate_round
        self.on_progress = on_progress
        self.codec_of: dict[str, str] = {}  # client → the encoding it used
        self._last_progress: dict[str, Any] = {}
        self.compression = compression_dict(compression)
        if self.compression is not None and self.secure_sums:
            raise InputError("SecAgg+ masks quantised vectors already; compression cannot be "
                             "combined with it: drop compression or secagg")
        self.capable_by_default = bool(capable_by_default)
        #: client → the codecs its current fit was asked for (``accept`` decodes with them)
        self.asked: dict[str, Negotiated] = {}

    @classmethod
    def build(cls, manifest: Manifest, initial: Sequence[Array], *,
              strategy: str = "fedavg", strategy_options: dict[str, Any] | None = None,
              max_examples: int | None = DEFAULT_MAX_EXAMPLES,
              max_update_norm: float | None = None,
              max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
              max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO,
              secure_sums: bool = False, privacy: Any = None, **options: Any) -> Round:
        """A ``Round`` from the session options: the gate (its manifest checked on
        ``initial`` first: a broken export fails here), the policy ``strategy`` (wrapped
        in DP when ``privacy``), the bounds. The peers' norm bound applies only where single,
        example-weighted updates are averaged: not under DP (weights are 1 and clipped, and
        a peer-dependent rejection would break the noise's sensitivity), secure sums (no
        single update) or robust rules (they bound outliers themselves)."""
        model = [np.asarray(a, np.float32) for a in initial]
        gate = UpdateGate(manifest, max_examples=max_examples, max_update_norm=max_update_norm)
        gate.check_manifest(model)
        policy = build(strategy, model, strategy_options, privacy)
        gate.check_finite = not policy.checks_finite
        norm_ratio = max_norm_ratio if (policy.relative_norms and privacy is None
                                        and not secure_sums) else None
        bounds = Bounds(gate.masks, max_weight_ratio, norm_ratio)
        return cls(gate, policy, bounds, model, secure_sums=secure_sums, **options)

    @property
    def dp(self) -> Any:
        """The DP mechanism (``CentralDP``) when the policy is private, else None."""
        return getattr(self.policy, "dp", None)

    @property
    def manifest(self) -> Manifest:
        return self.gate.manifest

    # -- before a round ----------------------------------------------------------------------
    def progress(self, **state: Any) -> None:
        """Tell the host what the round is doing (only changes), so waits and dashboards
        can say what a session waits for; a failing report never stops a round."""
        if self.on_progress is not None and state != self._last_progress:
            self._last_progress = state
            try:
                self.on_progress(dict(state))
            except Exception as exc:
                log.warning("progress report failed: %s", exc)

    def sample_size(self, available: int, fraction: float) -> int:
        """Clients to sample from ``available``: the fraction, at least ``min_clients``."""
        return max(int(available * fraction), self.min_clients)

    def admit(self, server_round: int, available: int, n: int) -> None:
        """A fit round is about to sample ``n`` of ``available``: under DP, raise
        ``PrivacyBudgetSpent`` before anyone trains if it would pass ``max_epsilon``."""
        if self.dp is not None:
            self.dp.admit(server_round, available, min(n, available))

    def fit_config(self) -> dict[str, Any]:
        """The config every fit of a round carries."""
        # FedKit reads local_epochs as a sint64 Scalar: a Python int serialises to it
        config: dict[str, Any] = {"local_epochs": self.local_epochs}
        if self.dp is not None:  # the norm clients clip to (Flower's DP mods read this key)
            config.update(self.dp.fit_config())
        return config

    def codec(self, client: str, default: str = "raw") -> str:
        """The encoding ``client`` reads: the one it last sent, else ``default``."""
        return self.codec_of.get(client, default)

    def encode(self, platform: str, codec: str | Codec) -> list[bytes]:
        """The global model in ``platform``'s layout and ``codec`` (raw / npy, or a down-link
        ``Codec``; cached by the gate)."""
        return self.gate.encode(self.global_, platform, codec)

    def negotiate(self, declared: Iterable[str] | None) -> Negotiated:
        """What a client that declared ``declared`` (codec names; None: nothing said) gets:
        the session's codecs it can do, else float32 (``compression.negotiate``)."""
        if declared is None:
            declared = CODECS if self.capable_by_default else ()
        return negotiate(self.compression, declared)

    def downlink(self, client: str, platform: str, native: str,
                 declared: Iterable[str] | None, *, fit: bool
                 ) -> tuple[list[bytes], str, dict[str, Any]]:
        """(the global model for ``client`` — its negotiated down codec, else its own
        encoding ``native`` or the one it last sent —, its ``tensor_type``, the config
        keys its fit adds: ``KEY_UP`` when its up-link is compressed). ``fit``: remember
        what was asked, for ``accept``."""
        n = self.negotiate(declared)
        codec = n.down if n.down is not None else self.codec(client, native)
        extra: dict[str, Any] = {}
        if fit:
            self.asked[client] = n
            if n.up is not None:
                extra[KEY_UP] = n.up.spec
        return self.encode(platform, codec), tensor_type_of(codec), extra

    # -- one update ----------------------------------------------------------------------
    def refused(self, client: str) -> None:
        """``ClientRefused`` when ``refuse`` says ``client``'s results may not count."""
        why = self.refuse(client) if self.refuse is not None else None
        if why:
            raise ClientRefused(why)

    def accept(self, result: FitPayload, base: Sequence[Array] | None = None,
               base_version: int = 0) -> Update:
        """``result`` through the gate, over ``base`` (default: the global model), decoded
        with the codecs its client was asked for."""
        asked = self.asked.get(str(result.client), FLOAT32_ONLY)
        return self.gate.accept(result.platform, result.client, result.tensors,
                                result.num_examples, result.metrics,
                                self.global_ if base is None else base, base_version,
                                up=asked.up, down=asked.down)

    def _cap(self, results: Sequence[FitPayload]) -> int | None:
        """Before a round's updates are added: the weight cap from the round's claims (read
        only: num_examples), and, for a platform with fewer than ``WARM`` clients' norms
        known, every update's norm (decoded once more, then dropped: memory stays
        O(parameters)), so the first round's updates are judged against each other rather
        than against nothing."""
        claims = []
        for r in results:
            try:
                claims.append(self.gate.examples(r.num_examples)[0])
            except Exception:  # its rejection comes with the second pass
                continue
        for r in results:
            try:
                if not self.bounds.warming(str(r.platform)):
                    continue
                self.bounds.observe(self.accept(r), self.global_)
            except Exception:
                continue
        return self.bounds.cap(claims)

    @staticmethod
    def record_violations(report: RoundReport, per: dict[str, dict[str, float]],
                          violations: Iterable[Violation]) -> None:
        """Protocol violations reported since the last round (duplicated or out-of-order
        messages, dropped by the host's transport) become rejections of this round."""
        for platform, cid, why in violations:
            report.rejections.append((platform, cid, why))
            per[platform]["protocol_violations"] += 1

    # -- a round -------------------------------------------------------------------------
    def _add_secure_sums(self, server_round: int, results: Sequence[FitPayload],
                         report: RoundReport, per: dict[str, dict[str, float]]) -> None:
        """SecAgg+ (``secure_sums``): every surviving client's result carries the same
        unmasked aggregate (``xflwb.federation.policies.secure_sums`` decodes it); only
        num_examples and metrics are per client (in clear, as in Flower). A refused
        aggregate is the server's rejection: the global model stays."""
        distinct = {id(r.tensors): r.tensors for r in results}.values()
        payloads = {tuple(bytes(t) for t in p) for p in distinct}
        report.metrics.append(("all", "secure_aggregates", float(len(payloads))))
        counts = []
        for r in results:
            n = int(r.num_examples)
            counts.append(n)
            stats = per[str(r.platform)]
            stats["clients"] += 1
            stats["examples"] += n
        try:
            if len(payloads) != 1:
                raise ValueError(f"{len(payloads)} different aggregates in one round")
            arrays = self.gate.decode_sums(results[0].tensors)
            add_secure_sums(self.policy, arrays, self.global_, counts,
                            [reported_bit(r.metrics) for r in results])
        except Exception as exc:
            why = f"secure aggregate refused: {type(exc).__name__}: {exc}"
            log.warning("round %s: %s", server_round, why)
            report.rejections.append(("all", "server", why))

    def aggregate_fit(self, server_round: int, results: Sequence[FitPayload],
                      failures: Sequence[Failure], violations: Iterable[Violation] = ()
                      ) -> RoundReport:
        """Gate, bound and aggregate a round's results into the next global model; record
        it (``on_fit_round``) and return its report, or raise ``AllClientsFailed`` (after
        recording) when every selected client failed with an error."""
        t_start = self.clock()
        report = RoundReport(server_round)
        per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        base = self.global_
        self.policy.begin(base, server_round)
        private = self.dp is not None
        if self.secure_sums and results:
            self._add_secure_sums(server_round, results, report, per)
        # weights are 1 under DP; secure sums carry no single update to bound
        cap = self._cap(results) if not private and not self.secure_sums else None
        for r in [] if self.secure_sums else results:
            platform = str(r.platform)
            stats = per[platform]
            stats["bytes_up"] += r.bytes_up
            stats["bytes_down"] += r.bytes_down
            if platform in self.gate.masks:  # what float32 would have cost both ways
                f32 = self.gate.float32_bytes(platform)
                stats["bytes_up_float32"] += f32
                stats["bytes_down_float32"] += f32
            try:
                self.refused(r.client)
                update = self.accept(r, base)
                if not private:  # weight ≤ ratio × median claim; norm within bounds
                    self.bounds.apply(update, base, cap)
                self.policy.add(update)
            except KeyError as exc:  # a manifest lookup: client data is never a key
                raise ManifestFault(
                    f"round {server_round}: a lookup failed while mapping {platform} client "
                    f"{r.client}'s update (KeyError: {exc}): the manifest of model "
                    f"'{self.manifest.get('name')}' or xflwb is at fault, not the client; "
                    "re-export the model, and report it if it persists") from exc
            except Exception as exc:  # one client's update, whatever broke: only it is lost
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("round %s: rejected %s update from %s: %s", server_round,
                            platform, r.client, reason)
                report.rejections.append((platform, r.client, reason))
                stats["rejected"] += 1
                continue
            if update.capped:
                log.warning("round %s: %s client %s declared %s examples; counted as %s "
                            "(max_examples / max_weight_ratio × the round's median)",
                            server_round, platform, r.client, r.num_examples, update.examples)
                stats["capped"] += 1
            if update.compression == "float32":  # a compressed one shows no native encoding
                self.codec_of[r.client] = update.codec
            stats["clients"] += 1
            stats["examples"] += update.examples
            stats["fit_seconds"] += r.fit_seconds
        self.record_violations(report, per, violations)
        new = self.policy.result()
        if new is not None:
            new = [np.asarray(a, np.float32) for a in new]
            if all(np.isfinite(a).all() for a in new):
                self.global_ = new
            else:  # e.g. FedAdam's v overflowing float32 on an average of ~1e38 values
                why = (f"the {self.policy.describe()} server update of round "
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
                (platform, "bytes_up_float32", stats.get("bytes_up_float32", 0.0)),
                (platform, "bytes_down_float32", stats.get("bytes_down_float32", 0.0)),
                (platform, "rejected", stats.get("rejected", 0.0))]
            # recorded only when they happen (a round without them looks as it always did)
            report.metrics += [(platform, k, stats[k]) for k in ("capped", "protocol_violations")
                               if stats.get(k)]
        totals = {k: sum(s.get(k, 0.0) for s in per.values())
                  for k in ("clients", "examples", "bytes_up", "bytes_down", "bytes_up_float32",
                            "bytes_down_float32", "rejected")}
        report.metrics += [("all", k, v) for k, v in totals.items()]
        report.metrics.append(("all", "failures", float(len(failures))))
        report.metrics += self.policy.end(len(failures))  # DP: epsilon, noise_std, ...
        if private:
            report.privacy_event = self.dp.last_event
        by_platform = Counter(f.platform for f in failures)
        report.metrics += [(p, "failures", float(n)) for p, n in by_platform.items()
                           if p in self.manifest["platforms"]]
        report.failures = [(f.platform, f.client, f.reason) for f in failures]
        if failures:  # one line per round, not one per client of a large fleet
            log.warning("round %s: %s client(s) failed: %s", server_round, len(failures),
                        summarize([f.reason for f in failures]))
        errors = [f.reason for f in failures if f.is_error]
        if failures and not results and errors:
            lost = len(failures) - len(errors)
            who = (f"all {len(failures)} clients" if len(failures) > 1
                   else "the only client")
            report.failed = (f"{who} selected for round {server_round} failed"
                             f"{f' ({lost} lost their connection)' if lost else ''}: "
                             f"{summarize(errors)}")
        # server-side cost of the round's aggregation (decode, validate, average, optimiser)
        report.metrics.append(("all", "aggregate_seconds", self.clock() - t_start))
        if self.on_fit_round is not None:
            self.on_fit_round(report, self.global_)
        if report.failed:
            raise AllClientsFailed(report.failed)
        return report

    def aggregate_evaluate(self, server_round: int, results: Sequence[Evaluation]
                           ) -> tuple[float | None, RoundReport]:
        """The round's example-weighted loss (and accuracy where clients report it), per
        platform and overall, and the spread of the clients' accuracies (``fairness``:
        p10 / p50 / p90, the worst decile's mean, ``eval_clients``); a bad evaluation costs
        only its own report. Each client's evaluation goes into ``report.evaluations``
        with its accuracy (None: it reported none)."""
        report = RoundReport(server_round)
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        # accuracy only where the client put it in its metrics (simulated clients); FedKit
        # phones report it through telemetry instead, matched in the registry
        accs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in results:
            platform = str(r.platform)
            try:  # an evaluation is a phone's too: a bad one costs only its own report
                loss = float(r.loss)
                n = 0 if r.num_examples == 0 else self.gate.examples(r.num_examples)[0]
                acc = (r.metrics or {}).get("accuracy")
            except Exception as exc:
                reason = f"evaluation ignored: {type(exc).__name__}: {exc}"
                log.warning("round %s: %s client %s: %s", server_round, platform, r.client,
                            reason)
                report.rejections.append((platform, r.client, reason))
                continue
            if n > 0 and np.isfinite(loss * n):
                sums[platform][0] += loss * n
                sums[platform][1] += n
            accuracy = _accuracy(acc) if n > 0 else None
            report.evaluations.append((platform, r.client, loss, n, accuracy))
            if accuracy is not None:
                for key in (platform, "all"):
                    accs[key][0] += accuracy * n
                    accs[key][1] += n
        for platform, (s, total) in sums.items():
            report.metrics += [(platform, "eval_loss", s / total if total else None),
                               (platform, "eval_examples", total)]
        s_all = sum(v[0] for v in sums.values())
        n_all = sum(v[1] for v in sums.values())
        loss_all = s_all / n_all if n_all else None
        report.metrics += [("all", "eval_loss", loss_all), ("all", "eval_examples", n_all)]
        report.metrics += [(key, "accuracy", s / n) for key, (s, n) in accs.items() if n]
        report.metrics += fairness_metrics([e[0] for e in report.evaluations],
                                           [e[4] for e in report.evaluations])
        if self.on_evaluate_round is not None:
            self.on_evaluate_round(report)
        return loss_all, report

    # -- the whole round, over a client source -------------------------------------------
    def _jobs(self, source: ClientSource, fraction: float, server_round: int,
              phase: str, config: dict[str, Any]) -> list[FitJob] | None:
        available = source.available()
        if available < self.min_clients:
            self.progress(phase="waiting", round=server_round, connected=available,
                          needed=self.min_clients)
            return None
        n = self.sample_size(available, fraction)
        if phase == "fit":
            self.admit(server_round, available, n)
        targets = source.sample(min(n, available))
        self.progress(phase=phase, round=server_round, connected=available,
                      needed=self.min_clients, selected=len(targets))
        jobs = []
        for t in targets:
            if t.platform not in self.manifest["platforms"]:
                continue
            tensors, tensor_type, extra = self.downlink(t.client, t.platform, t.codec,
                                                        t.codecs, fit=phase == "fit")
            jobs.append(FitJob(t, tensors, {**config, **extra}, tensor_type))
        return jobs

    def run(self, server_round: int, source: ClientSource) -> RoundReport | None:
        """One whole round over ``source``: sample, fit, aggregate, then evaluate the new
        model (``fraction_evaluate`` > 0). None, with a "waiting" progress, when fewer than
        ``min_clients`` are connected (the host retries when more are)."""
        jobs = self._jobs(source, self.fraction_fit, server_round, "fit", self.fit_config())
        if jobs is None:
            return None
        results, failures = source.fit(server_round, jobs)
        report = self.aggregate_fit(server_round, results, failures)
        if self.fraction_evaluate > 0:
            ev_jobs = self._jobs(source, self.fraction_evaluate, server_round, "evaluate", {})
            if ev_jobs:
                evaluations, _ = source.evaluate(server_round, ev_jobs)
                self.aggregate_evaluate(server_round, evaluations)
        return report
