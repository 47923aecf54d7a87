"""FedBuff's one adapter over the session's strategy, shared by its hosts.

Phone sessions (``xflwb.server.fedbuff``) and the Simulation Engine
(``xflwb.simulation.fedbuff``) host the same ``xflwb.federation.versions.VersionDriver``; what
a round does per client (screen, decode, map, validate; the relative bounds; recording;
evaluation reports) is the session's ``CrossPlatformStrategy``'s, reached only through
``StrategyPort``, so both hosts apply the very same per-update rules as a synchronous round.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from xflwb.bridge.arrays import Array
from xflwb.bridge.manifest import Manifest
from xflwb.federation.codecs import Codec
from xflwb.federation.compression import FLOAT32_ONLY, Negotiated
from xflwb.federation.gate import tensor_type_of
from xflwb.federation.report import AllClientsFailed, RoundReport, summarize
from xflwb.federation.update import Update
from xflwb.federation.versions import AllFitsFailed, Failure, VersionMade
from xflwb.flower_legacy import ClientManager, ClientProxy
from xflwb.sessions.flower_strategy import CrossPlatformStrategy, Tracked, failure_reason

__all__ = ["StrategyPort"]


class StrategyPort:
    """Everything FedBuff's host and driver need from the session's strategy, and nothing
    else: the one place that touches ``CrossPlatformStrategy`` (and its module). It is also
    the driver's ``Bounds`` (bounded influence, ``xflwb.federation.influence``)."""

    def __init__(self, strategy: CrossPlatformStrategy) -> None:
        self.strategy = strategy
        #: client → the codecs its running fit was asked for (one job per client at once)
        self.asked: dict[str, Negotiated] = {}

    # -- what the session set --------------------------------------------------------------
    @property
    def model(self) -> list[Array]:
        """The global model (canonical); follows the newest version."""
        model: list[Array] = self.strategy.global_
        return model

    def set_model(self, model: list[Array]) -> None:
        self.strategy.global_ = model

    @property
    def manifest(self) -> Manifest:
        return self.strategy.manifest

    @property
    def masks(self) -> dict[str, list[bool]]:
        """Per platform served: the canonical tensors it trains."""
        return self.strategy.masks

    @property
    def min_clients(self) -> int:
        n: int = self.strategy.min_clients
        return n

    @property
    def local_epochs(self) -> int:
        epochs: int = self.strategy.local_epochs
        return epochs

    @property
    def fraction_evaluate(self) -> float:
        fraction: float = self.strategy.fraction_evaluate
        return fraction

    # -- one update ------------------------------------------------------------------------
    def screen(self, client: str) -> None:
        """``ClientRefused`` when the client's results may no longer count (a revoked
        device token)."""
        self.strategy.refused(client)

    def accept(self, platform: str, client: str, result: Any,
               base: list[Array]) -> Update:
        """Decode, map and check one FitRes against ``base`` (the version it started from;
        the synchronous round's rules), with the codecs its fit was asked for; the client's
        next model goes back in the encoding it used."""
        asked = self.asked.get(client, FLOAT32_ONLY)
        update = self.strategy.core.gate.accept(
            platform, client, result.parameters.tensors, result.num_examples,
            result.metrics, base, up=asked.up, down=asked.down)
        if update.compression == "float32":
            self.strategy.codec_of[client] = update.codec
        return update

    @property
    def max_weight_ratio(self) -> float | None:
        return self.strategy.core.bounds.max_weight_ratio

    @property
    def judges_norms(self) -> bool:
        return self.strategy.core.bounds.max_norm_ratio is not None

    def observe_norm(self, platform: str, client: str, norm: float) -> None:
        self.strategy.core.bounds.norms[platform].observe(client, norm)

    def bound(self, platform: str, client: str, tensors: list[Array], examples: int,
              base: list[Array], cap: int | None, scale: float) -> tuple[int, bool]:
        return self.strategy.core.bounds.bound(platform, client, tensors, examples, base, cap,
                                               scale)

    # -- the wire --------------------------------------------------------------------------
    def attach(self, client_manager: ClientManager) -> None:
        """The session's client manager (protocol violations are drained from it)."""
        self.strategy.attach(client_manager)

    def codec(self, client: ClientProxy) -> str:
        """The tensor encoding ``client`` reads (the one it last sent, else the probe's)."""
        codec: str = self.strategy.codec_of.get(client.cid, getattr(client, "codec", "raw"))
        return codec

    def negotiate(self, client: ClientProxy) -> Negotiated:
        """The session's codecs ``client`` declared at its probe (none: float32)."""
        return self.strategy.core.negotiate(getattr(client, "codecs", None))

    def down(self, client: ClientProxy) -> str | Codec:
        """What ``client``'s model goes down in: its down-link codec, else its encoding."""
        down = self.negotiate(client).down
        return down if down is not None else self.codec(client)

    def encode(self, model: list[Array], platform: str, codec: str | Codec) -> list[bytes]:
        """A version in ``platform``'s layout and ``codec`` (the session's gate)."""
        return self.strategy.core.gate.encode(model, platform, codec, cache=False)

    def float32_bytes(self, platform: str) -> int:
        return self.strategy.core.gate.float32_bytes(platform)

    @staticmethod
    def tensor_type(codec: str | Codec) -> str:
        return tensor_type_of(codec)

    @staticmethod
    def track(client: ClientProxy, platform: str) -> Tracked:
        """``client`` measuring its fit's seconds and bytes (its failure names it)."""
        return Tracked(client, platform)

    @staticmethod
    def describe(failure: BaseException | tuple[Any, Any]) -> Failure:
        """A failed fit as the driver records it: an exception, or (client, a FitRes with a
        non-OK status)."""
        platform, cid, why, is_error = failure_reason(failure)
        return Failure(platform, cid, why, is_error)

    @staticmethod
    def summarize(reasons: list[str]) -> str:
        return summarize(reasons)

    @staticmethod
    def all_failed(exc: AllFitsFailed) -> AllClientsFailed:
        return AllClientsFailed(str(exc))

    # -- reports ---------------------------------------------------------------------------
    def progress(self, **state: Any) -> None:
        self.strategy.progress(**state)

    def record_version(self, made: VersionMade) -> None:
        """A version as a round's report (rejections, failures, per-platform metrics and
        the protocol violations since the last one), handed to the session."""
        report = RoundReport(made.number)
        if made.error:
            report.rejections.append(("all", "server", made.error))
        report.rejections += [(a.platform, a.client, a.reason) for a in made.rejected]
        report.metrics += made.metrics
        report.failures = [(f.platform, f.client, f.reason) for f in made.failures]
        violations: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.strategy.drain_violations(report, violations)  # duplicated / out-of-order messages
        report.metrics += [(p, "protocol_violations", v["protocol_violations"])
                           for p, v in violations.items()]
        report.metrics += made.totals
        if self.strategy.on_fit_round is not None:
            self.strategy.on_fit_round(report, self.strategy.global_)

    def record_evaluation(self, number: int, results: list[Any], failures: list[Any]) -> None:
        self.strategy.aggregate_evaluate(number, results, failures)
