"""Secure aggregation (SecAgg+) of a simulation's fit rounds, with Flower's own protocol.

With ``secagg`` set, the ServerApp runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``
over a ``LegacyContext`` holding the phones' ``CrossPlatformStrategy``, and the ClientApp
runs ``secaggplus_mod``: each client quantises its vector, adds pairwise and private masks,
and the server unmasks only the sum over the round's surviving clients (a client that drops
after sharing its keys is recovered from its neighbours' shares, up to the threshold).

The masked average survives the masking because the weights travel masked too. A client
sends its update in the CANONICAL layout, tensors its platform does not train as zeros,
followed by one scalar per canonical tensor: 1 if it trained it, else 0
(:func:`canonical_payload`). The mod multiplies the whole vector by
``num_examples / max_weight`` and the workflow divides the unmasked sum by the sum of those
ratios, so the strategy receives ``A_k = Σ n_i m_ik x_ik / Σ n_i`` and
``B_k = Σ n_i m_ik / Σ n_i``; the masked average is ``A_k / B_k`` (frozen iOS tensors never
dilute Android's), computed by the federation core (``xflwb.federation.policies.secure_sums``).

Phones cannot take part: Flower's legacy gRPC transport cannot carry the protocol's stages
and no phone SDK implements them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.bridge.arrays import AnyArray
from xflwb.errors import DeviceFailure, SessionFailure
from xflwb.flower_legacy import secagg_api


class SecAggHalted(SessionFailure):
    """Flower's workflow stopped a round (fewer live clients than the threshold, or a stage
    failed): the session fails with this instead of silently running fewer rounds."""


class SimulatedDropout(DeviceFailure):
    """A ``drop_prob`` dropout under SecAgg+: the client must fail its message (a non-OK
    ``FitRes`` would be masked as if it were an update)."""


@_options.declared  # unknown keywords: did you mean
@dataclass
class SecAgg:
    """SecAgg+ parameters (Flower's ``SecAggPlusWorkflow``; its defaults where it has them).

    ``num_shares`` and ``reconstruction_threshold`` are counts when integers, fractions
    when floats in (0, 1] (of the sampled clients, of the shares), as in Flower."""

    num_shares: float = option(3, "shares each client's keys are split into (its neighbours, "
                               "itself included): an integer > 2, or a fraction of the round's"
                               " sampled clients", gt=0)
    reconstruction_threshold: float = option(
        2, "shares that rebuild a key (a dropped client's masks are removed with them): an "
        "integer < num_shares, or a fraction of num_shares", gt=0)
    max_weight: float = option(1000.0, "the largest num_examples a client may weigh (weights "
                               "are num_examples / max_weight, quantised with the update)",
                               gt=0)
    clipping_range: float = option(8.0, "each parameter × num_examples / max_weight must "
                                   "stay within ± this (it is clipped, then quantised)", gt=0)
    quantization_range: int = option(4194304, "integer levels of the quantisation (2**22)",
                                     ge=2)
    modulus_range: int = option(4294967296, "masks are drawn mod this power of 2 (2**32, "
                                "at most)", ge=2, le=4294967296)
    timeout: float | None = option(None, "seconds each stage waits for the clients (none: "
                                   "round_timeout)", gt=0)

    def __post_init__(self) -> None:
        _options.check(self)
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{name} as a fraction must be in (0, 1], got {value!r} "
                                 "(give an integer for a count)")
        try:
            self.workflow()  # Flower's own checks (threshold < shares, power-of-2 modulus)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"secagg: {str(exc).replace('`', '')}") from exc

    def workflow(self, timeout: float | None = None) -> Any:
        """Flower's ``SecAggPlusWorkflow`` with these parameters."""
        kw = dataclasses.asdict(self)
        kw["timeout"] = self.timeout if self.timeout is not None else timeout
        return _workflow_class()(**kw)


@functools.cache
def _workflow_class() -> type:
    """``SecAggPlusWorkflow`` counting each failed client once: its 'collect masked
    vectors' stage files an error reply in two loops (flwr 1.x), so one dropout would count
    as two failures in the round's metrics."""
    base = secagg_api().SecAggPlusWorkflow

    class Workflow(base):  # type: ignore[misc, valid-type]
        def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
            ok = bool(super().collect_masked_vectors_stage(grid, context, state))
            seen: set[int] = set()
            unique = []
            for failure in state.failures:  # Exception(msg.error): one Error per reply
                key = id(failure.args[0]) if failure.args else id(failure)
                if key not in seen:
                    seen.add(key)
                    unique.append(failure)
            state.failures = unique
            return ok

    return Workflow


def normalized(value: Any) -> dict[str, Any]:
    """A ``SecAgg`` or a dict of its fields → the dict of all fields, checked."""
    if isinstance(value, SecAgg):
        return dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValueError(f"secagg must be xflwb.SecAgg(...), a dict of its fields or None, "
                         f"got {value!r}")
    _options.unknown(SecAgg, value, "secagg")
    return dataclasses.asdict(SecAgg(**value))


def neighbourhood(secagg: dict[str, Any], sampled: int) -> tuple[int, int]:
    """(clients each client shares its keys with, itself included; shares needed to rebuild
    one) in a round of ``sampled`` clients, by Flower's own arithmetic (setup stage)."""
    shares, threshold = secagg["num_shares"], secagg["reconstruction_threshold"]
    if isinstance(shares, float) or shares == 1:
        n = round(float(shares) * sampled)
        if n < sampled and n % 2 == 0:
            n += 1
        if n <= 2:
            n = sampled
    else:
        n = int(shares)
    if isinstance(threshold, float) or threshold == 1:
        t = max(round(float(threshold) * n), 2)
    else:
        t = int(threshold)
    if sampled != n and n % 2 == 0:
        n += 1
    return min(2 * (n >> 1) + 1, sampled), t


def check_fleet(secagg: dict[str, Any], sampled: int) -> None:
    """A round of ``sampled`` clients can complete the protocol (else Flower halts it)."""
    if sampled < 2:
        raise ValueError(f"secagg needs at least 2 clients per round, this fleet samples "
                         f"{sampled}: raise min_clients / fraction_fit")
    neighbours, threshold = neighbourhood(secagg, sampled)
    if threshold > neighbours:
        raise ValueError(f"secagg: reconstruction_threshold {threshold} exceeds the "
                         f"{neighbours} clients each key is shared with in a round of "
                         f"{sampled}; lower it or raise num_shares")


def canonical_payload(canonical: Sequence[AnyArray], trained: Sequence[bool]
                      ) -> list[AnyArray]:
    """What a client hands ``secaggplus_mod``: its canonical tensors, untrained ones as zeros,
    then one weight per canonical tensor (1.0 trained, 0.0 not), then a 1.0 for the client
    itself, so the server can divide the weighted sums by the weight each tensor really got
    (``xflwb.federation.policies.secure_sums``) and, under DP, count its clients."""
    sums = [np.asarray(a, np.float32) if t else np.zeros(np.shape(a), np.float32)
            for a, t in zip(canonical, trained, strict=True)]
    return (sums + [np.array([1.0 if t else 0.0], np.float32) for t in trained]
            + [np.ones(1, np.float32)])


def mod_ratio(num_examples: int, secagg: dict[str, Any]) -> float:
    """The factor ``secaggplus_mod`` multiplies a client's vector by (quantised, as it is)."""
    q: float = secagg["quantization_range"]
    max_weight: float = secagg["max_weight"]
    return round(num_examples / max_weight * q) / q


def uniform(payload: Sequence[AnyArray], num_examples: int, secagg: dict[str, Any]
            ) -> list[AnyArray]:
    """Under central DP each clipped update counts once (its sensitivity is the clipping
    norm), not by examples: the payload is divided by the factor the mod multiplies it by."""
    ratio = mod_ratio(num_examples, secagg)
    return [np.asarray(a, np.float64) / ratio for a in payload]


def check_range(payload: Sequence[AnyArray], num_examples: int, secagg: dict[str, Any]
                ) -> None:
    """Refuse (this client's fit fails, naming the fix) a vector SecAgg+ would clip."""
    if num_examples > secagg["max_weight"]:
        raise ValueError(f"this client trained on {num_examples} examples, more than secagg's "
                         f"max_weight {secagg['max_weight']:g}: raise max_weight")
    ratio = mod_ratio(num_examples, secagg)
    peak = ratio * max((float(np.abs(a).max()) for a in payload if a.size), default=0.0)
    if not np.isfinite(peak) or peak > secagg["clipping_range"]:
        raise ValueError(f"num_examples / max_weight × |parameter| reaches {peak:.4g}, beyond "
                         f"secagg's clipping_range {secagg['clipping_range']:g}: SecAgg+ would "
                         "clip it; raise clipping_range (or max_weight)")


#: how often a SecAgg+ stage looks for its clients' replies (Flower's in-memory grid: 0.1 s)
POLL_SECONDS = 0.01


def run_rounds(grid: Any, context: Any, strategy: Any, client_manager: Any, rounds: int,
               round_timeout: float, secagg: dict[str, Any]) -> None:
    """Flower's ``DefaultWorkflow`` with SecAgg+ fit rounds, over ``strategy``; raises
    :class:`SecAggHalted` when the workflow gives a round up."""
    from xflwb.flower_legacy import simulation_api

    sa, api = secagg_api(), simulation_api()
    # Each of the workflow's stages sends every client its message in one batch and then
    # polls for the replies; the in-memory grid's default 0.1-s poll adds up to 0.1 s to
    # every stage (five a round under SecAgg+: four fit stages and evaluation). One poller
    # per stage, so polling faster costs nothing measurable.
    if isinstance(getattr(grid, "pull_interval", None), float):
        grid.pull_interval = min(grid.pull_interval, POLL_SECONDS)
    legacy = sa.LegacyContext(context=context, strategy=strategy,
                              client_manager=client_manager,
                              config=api.ServerConfig(num_rounds=rounds,
                                                      round_timeout=round_timeout))
    secure = SecAgg(**secagg).workflow(timeout=round_timeout)

    def fit_round(grid: Any, ctx: Any) -> None:
        rnd = ctx.state.config_records[sa.MAIN_CONFIGS_RECORD][sa.CURRENT_ROUND]
        before = ctx.state.array_records.get(sa.MAIN_PARAMS_RECORD)
        secure(grid, ctx)
        if ctx.state.array_records.get(sa.MAIN_PARAMS_RECORD) is before:
            raise SecAggHalted(
                f"secure aggregation halted in round {rnd}: fewer clients than "
                f"reconstruction_threshold ({secagg['reconstruction_threshold']}) stayed, or "
                "a stage failed (see the log above)")

    sa.DefaultWorkflow(fit_workflow=fit_round)(grid, legacy)


__all__ = ["SecAgg", "SecAggHalted", "SimulatedDropout", "canonical_payload", "check_fleet",
           "check_range", "mod_ratio", "normalized", "run_rounds", "uniform"]
