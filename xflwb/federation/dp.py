"""Central differential privacy in canonical space, with a per-round ε ledger.

``DP`` declares the options once (``xflwb._options``); ``RoundOptions.privacy`` carries its
dict. ``CentralDP`` is the mechanism's state across rounds; the ``Private`` policy wrapper
(``xflwb.federation.policies.private``) and the round driver (``xflwb.federation.rounds``)
call it at four points of a round:

1. ``admit`` (when the round samples): refuse the round (``PrivacyBudgetSpent``) if composing it
   would take ε past ``max_epsilon``; otherwise note how the round samples;
2. ``fit_config``: the current ``clipping_norm`` in the FitIns config, so clients that can
   clip do (Flower's mods read the same key);
3. ``clip`` per accepted client: its delta to the global model clipped over the tensors its
   platform trains (idempotent: a phone that ignored the key is clipped here);
4. ``add_noise`` to the masked mean, then ``end_round``: the ledger and the adaptive norm.

Why not Flower's wrappers (``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``),
which wrap a strategy and noise its aggregate: the canonical, masked average differs in
ways a wrapper cannot see from outside.

* Per-tensor counts: tensor k is averaged over the clients whose platform trains it (an
  iOS client does not train BatchNorm, say), so its sum gets noise of std z·C and is
  divided by *its* count c_k; Flower's noise std z·C/n assumes one n for the whole model.
* Uniform weights: each clipped delta counts once (sensitivity C per client); example
  weights would let one client's weight, hence its influence, exceed the bound.
* Failures never void the round: Flower's wrappers return no model when any client
  failed; here the clients that took part are the counts the noise is calibrated to
  (the noise on each sum is z·C whoever came, so each participant stays covered).
* Noise before the server optimiser: FedAdam & co. see the noised mean (post-processing);
  a wrapper would noise their output, whose scale is not the clipped mean's.
* The clipping norm a round was clipped with is the one its noise uses (Flower's adaptive
  wrapper updates the norm first and noises with the new one).
* ``norm_bit`` is Andrew et al.'s b: 1 when the update was *not* clipped (Flower's
  ``adaptive_clip_inputs_inplace`` returns the opposite, True when it clipped). A client's
  reported bit is a claim: where the server sees the update it checks it (``clip``); under
  SecAgg+ it sees only sums and takes the bits as reported.

Flower's helpers are used where they fit: ``compute_stdv`` (noise scale) and
``compute_adaptive_noise_params`` (how adaptive clipping splits the noise between the
updates and the count of unclipped ones). Clipping is ``xflwb.bridge.params.clip_update``
(float64 norm; Flower's float32 ``clip_inputs_inplace`` divides by zero on a zero update
and its norm overflows to inf on a huge one), shared with the clients. Noise comes from a
generator seeded by the OS, not numpy's global one (which any library may seed).

The ledger composes each round that released a model as the session really samples:
Flower samples a fixed number of clients without replacement from those available, so
``SampledWithoutReplacementDpEvent(available, sampled, GaussianDpEvent(z))``, with
dp-accounting's RDP accountant (which supports that event under replace-one adjacency
only). With adaptive clipping z is the configured multiplier: the updates' larger noise
and the noised count together are that Gaussian mechanism (Andrew et al., §3). A resumed
session's ledger starts from its model lineage's released rounds (``restore``; the host's
lineage module finds them in the registry), so ε and ``max_epsilon`` are the lineage's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.bridge.arrays import Array
from xflwb.bridge.params import clip_update, update_norm
from xflwb.errors import PrivacyError

__all__ = ["DP", "KEY_CLIPPING_NORM", "KEY_NORM_BIT", "CentralDP", "Ledger",
           "PrivacyBudgetSpent", "PrivacyEvent", "privacy_dict", "reported_bit"]

log = logging.getLogger("xflwb.privacy")


def _flower_dp() -> Any:
    """Flower's DP helpers (``xflwb.flower_legacy.dp_api``)."""
    from xflwb.flower_legacy import dp_api

    return dp_api()


#: the FitIns config key and FitRes metric key Flower's DP mods use
KEY_CLIPPING_NORM = "clipping_norm"
KEY_NORM_BIT = "norm_bit"
#: a client's own clipping lands this close above the norm (float32 rounding): its
#: reported norm_bit stands
_TOLERANCE = 1e-5
#: float32's unit roundoff (2^-24) times 4: rounding a clipped model (base + scaled delta)
#: to float32 moves each weight by at most 2^-24 of itself, so the delta's norm lands
#: within 2^-24·‖model‖ of the clipping norm; 4× that is the margin a claim gets
_F32_SLACK = 4 * 2.0**-24


def reported_bit(metrics: dict[str, Any] | None) -> float | None:
    """The ``norm_bit`` a client reported, if it is one (0 or 1); anything else from a
    client is ignored, never trusted into the count."""
    reported = (metrics or {}).get(KEY_NORM_BIT)
    if isinstance(reported, int | float) and not isinstance(reported, bool) \
            and reported in (0, 1):
        return float(reported)
    return None


@_options.declared  # unknown keywords: did you mean
@dataclass
class DP:
    """Central differential privacy: ``xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5)``
    (fixed clipping) or ``target_quantile=0.5`` instead of ``clipping_norm`` (adaptive)."""

    noise_multiplier: float = option(
        help="Gaussian noise std on each clipped sum, in units of the clipping norm", ge=0)
    clipping_norm: float | None = option(
        None, "L2 bound of each client's update (canonical space, over the tensors its "
        "platform trains); none: adaptive (target_quantile)", gt=0)
    target_quantile: float | None = option(
        None, "adaptive clipping: fraction of updates the norm should leave unclipped",
        gt=0, lt=1)
    clip_learning_rate: float = option(0.2, "adaptive clipping: geometric step of the norm",
                                       gt=0)
    clipped_count_stddev: float | None = option(
        None, "adaptive clipping: noise std on the count of unclipped updates (none: "
        "sampled clients / 20, Flower's rule)", ge=0)
    initial_clipping_norm: float = option(0.1, "adaptive clipping: the first round's norm",
                                          gt=0)
    target_delta: float = option(1e-5, "δ at which the ledger states ε", gt=0, lt=1)
    max_epsilon: float | None = option(
        None, "stop the session before a round would take ε past this; none: no limit", gt=0)
    client_clipping: bool = option(True, "clients that can clip locally do (the server "
                                   "clips every update anyway)")

    def __post_init__(self) -> None:
        _options.check(self)
        if (self.clipping_norm is None) == (self.target_quantile is None):
            raise ValueError("give exactly one of clipping_norm (fixed clipping) and "
                             "target_quantile (adaptive clipping)")
        if self.max_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("max_epsilon needs noise: with noise_multiplier 0, ε is infinite")
        if (self.adaptive and self.noise_multiplier > 0
                and self.clipped_count_stddev is not None
                and self.noise_multiplier >= 2 * self.clipped_count_stddev):
            raise ValueError(
                f"clipped_count_stddev must exceed noise_multiplier / 2 "
                f"({self.noise_multiplier / 2:g}) for adaptive clipping to reach "
                f"noise_multiplier {self.noise_multiplier:g}, got {self.clipped_count_stddev:g}")

    @property
    def adaptive(self) -> bool:
        return self.clipping_norm is None


def privacy_dict(value: Any) -> dict[str, Any] | None:
    """``RoundOptions.privacy`` normalised: a ``DP`` or its dict → the full dict (defaults
    filled, JSON-able), validated; ``ValueError`` naming the option otherwise."""
    if value is None:
        return None
    if isinstance(value, DP):
        return dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValueError(f"privacy must be xflwb.DP(...), its dict or None, got {value!r}")
    try:
        return dataclasses.asdict(DP(**value))
    except (TypeError, ValueError) as exc:  # one line naming the option (OptionError)
        raise _options.OptionError(f"privacy: {exc}") from None


class PrivacyBudgetSpent(PrivacyError):
    """Raised when a round samples (``CentralDP.admit``): one more round would take ε past
    ``max_epsilon``. The session ends ``finished``; ``metrics`` (recorded at round
    ``round``, the last one run) say why."""

    def __init__(self, round: int, epsilon: float, next_epsilon: float,
                 max_epsilon: float) -> None:
        super().__init__(f"privacy budget spent: ε = {epsilon:.4g} after round {round}; "
                         f"round {round + 1} would reach {next_epsilon:.4g} > max_epsilon "
                         f"{max_epsilon:g}")
        self.round = round
        self.epsilon = epsilon
        self.metrics: list[tuple[str, str, float | None]] = [
            ("all", "privacy_budget_spent", 1.0),
            ("all", "epsilon_next_round", next_epsilon)]


class Ledger:
    """ε of the rounds composed so far, at ``delta`` (dp-accounting's RDP accountant).

    A round's RDP curve costs dp-accounting about 0.4 s to compute (sampling without
    replacement, over its ~60 orders), and a session asks for it twice a round (the budget
    check, then the ledger). Rounds repeat the same event (population, sample, noise), and
    RDP composes by addition: each distinct event's curve is computed once, by
    dp-accounting's own accountant, and summed; ε comes from dp-accounting's
    ``compute_epsilon`` over the sum — the same numbers as composing every round
    (tests/test_privacy.py checks it against a plain ``RdpAccountant``)."""

    def __init__(self, delta: float) -> None:
        import dp_accounting
        from dp_accounting import rdp

        self._dp = dp_accounting
        self._rdp = rdp
        self.delta = float(delta)
        self.events: list[Any] = []
        self._infinite = False  # a round without noise was composed: ε = ∞ from then on
        self._curves: dict[tuple[int, int, float], Any] = {}
        self._orders: Any = None
        self._total: Any = None

    def event(self, population: int, sample_size: int, noise_multiplier: float) -> Any:
        """One round: ``sample_size`` of ``population`` clients, without replacement."""
        return self._dp.SampledWithoutReplacementDpEvent(
            int(population), int(sample_size), self._dp.GaussianDpEvent(noise_multiplier))

    def _curve(self, event: Any) -> Any:
        """The RDP curve of one ``event`` (cached), from a fresh accountant composing it."""
        key = (int(event.source_dataset_size), int(event.sample_size),
               float(event.event.noise_multiplier))
        if key not in self._curves:
            one = self._rdp.RdpAccountant(
                neighboring_relation=self._dp.NeighboringRelation.REPLACE_ONE)
            one.compose(event)
            # the accountant keeps its orders and curve privately; dp-accounting is pinned
            # (<0.7) and tests/test_privacy.py compares the result with its public API
            self._orders = one._orders
            self._curves[key] = one._rdp.copy()
        return self._curves[key]

    def _epsilon_of(self, total: Any) -> float:
        eps, _ = self._rdp.rdp_privacy_accountant.compute_epsilon(self._orders, total,
                                                                   self.delta)
        return float(eps)

    @property
    def epsilon(self) -> float:
        if self._infinite:
            return math.inf
        return self._epsilon_of(self._total) if self._total is not None else 0.0

    @staticmethod
    def _noiseless(event: Any) -> bool:
        return float(event.event.noise_multiplier) == 0.0

    def epsilon_with(self, event: Any) -> float:
        """ε if ``event`` were composed too (the ledger is left as it is)."""
        if self._infinite or self._noiseless(event):
            return math.inf
        curve = self._curve(event)
        return self._epsilon_of(curve if self._total is None else self._total + curve)

    def compose(self, event: Any) -> float:
        if self._noiseless(event):  # the accountant would divide by zero on its way to ∞
            self._infinite = True
        else:
            curve = self._curve(event)
            self._total = curve.copy() if self._total is None else self._total + curve
        self.events.append(event)
        return self.epsilon

    def restore(self, records: Sequence[PrivacyEvent]) -> float:
        """Compose the released rounds of the sessions a resumed session continues (its
        lineage). Each record is composed as recorded (its population, sample and noise);
        RDP curves add whatever δ each session stated ε at, so ε comes out at this ledger's
        δ over all of them. A record without noise makes ε infinite."""
        for r in records:
            self.compose(self.event(r.population, r.sample_size, r.noise_multiplier))
        return self.epsilon


@dataclass(frozen=True)
class PrivacyEvent:
    """One released round as the registry keeps it (``privacy_events``): what composing it
    needs. ``noise_multiplier`` 0 (population and sample 0): a round released without DP."""

    population: int
    sample_size: int
    noise_multiplier: float
    target_delta: float | None = None  # the δ its session stated ε at (informative)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0


@dataclass
class _Round:
    """How the current round sampled and noises (set by ``admit``)."""

    population: int
    sampled: int
    noise_multiplier: float  # on the updates (adaptive: larger than the configured one)
    count_stddev: float  # on the count of unclipped updates (adaptive only)


class CentralDP:
    """The DP mechanism's state across a session's rounds (see the module docstring)."""

    def __init__(self, config: DP | dict[str, Any]) -> None:
        self.config = config if isinstance(config, DP) else DP(**config)
        self.clipping_norm = float(self.config.clipping_norm if self.config.clipping_norm
                                   is not None else self.config.initial_clipping_norm)
        self.ledger = Ledger(self.config.target_delta)
        self.rng = np.random.default_rng()  # OS entropy: nothing in the process can seed it
        self._round: _Round | None = None
        self._bits: list[float] = []
        self._overruled = 0  # this round's norm_bit=0 claims the server saw were false
        #: the event ``end_round`` composed (None: the round released no model); the
        #: session persists it before the model that contains it is released
        self.last_event: PrivacyEvent | None = None

    def restore(self, records: Sequence[PrivacyEvent]) -> float:
        """Start the ledger from the lineage's released rounds (a resumed session): ε and
        ``max_epsilon`` then count every round the model's lineage released."""
        return self.ledger.restore(records)

    # -- before the round ----------------------------------------------------------------
    def _noise_params(self, sampled: int) -> tuple[float, float]:
        """(noise multiplier on the updates, std on the unclipped count)."""
        z = float(self.config.noise_multiplier)
        if not self.config.adaptive:
            return z, 0.0
        try:
            stddev, z_updates = _flower_dp().compute_adaptive_noise_params(
                z, sampled, self.config.clipped_count_stddev)
        except ValueError as exc:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {z:g} and {sampled} sampled "
                f"clients: Flower's default clipped_count_stddev ({sampled}/20) is too "
                f"small; set privacy clipped_count_stddev above {z / 2:g}") from exc
        return float(z_updates), float(stddev)

    def admit(self, server_round: int, population: int, sampled: int) -> None:
        """The round is about to sample ``sampled`` of ``population`` clients: raise
        ``PrivacyBudgetSpent`` if that would take ε past ``max_epsilon``."""
        z_updates, stddev = self._noise_params(max(1, sampled))
        limit = self.config.max_epsilon
        if limit is not None:
            nxt = self.ledger.epsilon_with(self.ledger.event(
                population, sampled, self.config.noise_multiplier))
            if nxt > limit:
                raise PrivacyBudgetSpent(server_round - 1, self.ledger.epsilon, nxt, limit)
        self._round = _Round(int(population), int(sampled), z_updates, stddev)

    def fit_config(self) -> dict[str, Any]:
        """What the FitIns config carries for clients that clip locally."""
        return {KEY_CLIPPING_NORM: float(self.clipping_norm)} if self.config.client_clipping \
            else {}

    # -- during the round ----------------------------------------------------------------
    def begin(self) -> None:
        self._bits = []
        self._overruled = 0

    def clip(self, canonical: Sequence[Array], global_: Sequence[Array],
             trained: Sequence[bool], metrics: dict[str, Any] | None = None
             ) -> tuple[list[Array], float]:
        """(``canonical`` with its delta to ``global_`` clipped to the round's norm over the
        ``trained`` tensors, the client's norm bit: 1 when not clipped); ``counted`` it
        once the update is in.

        A reported bit is a claim checked against the update the server sees: above the
        norm the bit is 0 whatever was reported; a reported 0 ("I clipped locally") stands
        only when the norm is within float32 rounding of C, where local clipping lands it
        (``_slack``). Below that the update was certainly not clipped: the bit is 1 and
        the claim is counted as overruled (a client could otherwise push an adaptive
        norm up by claiming 0 for small updates)."""
        c = self.clipping_norm
        clipped, norm = clip_update(canonical, global_, trained, c)
        bit = 1.0 if norm <= c * (1 + _TOLERANCE) else 0.0
        if bit and reported_bit(metrics) == 0.0:
            if norm >= c - self._slack(canonical, trained, c):
                bit = 0.0  # at the norm: clipped locally, as it says
            else:
                self._overruled += 1
        return clipped, bit

    @staticmethod
    def _slack(canonical: Sequence[Array], trained: Sequence[bool], c: float) -> float:
        """How far below C a locally clipped update's norm can land: C·1e-5 plus float32
        rounding of the clipped model (2^-24 of each weight, ×4)."""
        zeros = [np.zeros((), np.float64)] * len(canonical)
        size = update_norm(canonical, zeros, trained)
        return c * _TOLERANCE + _F32_SLACK * (size if math.isfinite(size) else 0.0)

    def counted(self, bit: float) -> None:
        """An update clipped by ``clip`` entered the sums: its bit joins the count."""
        self._bits.append(bit)

    def add_noise(self, mean: list[Array], counts: Sequence[int]) -> float:
        """Noise the masked mean of the clipped updates in place: tensor k, averaged over
        ``counts[k]`` clients, gets N(0, z·C) on its sum, i.e. std z·C/c_k on its mean
        (Flower's ``compute_stdv``); tensors nobody trained hold no client's data and stay.
        Returns the std on each sum."""
        compute_stdv = _flower_dp().compute_stdv
        z = self._round.noise_multiplier if self._round else self._noise_params(
            max(1, len(self._bits)))[0]
        for k, n in enumerate(counts):
            if n > 0 and z > 0:
                std = compute_stdv(z, self.clipping_norm, int(n))
                noise = self.rng.normal(0.0, std, mean[k].shape)
                mean[k] = (mean[k] + noise).astype(np.float32)
        return z * self.clipping_norm

    def end_round(self, released: bool, noise_std: float, failures: int
                  ) -> list[tuple[str, str, float | None]]:
        """Compose the round into the ledger (if it released a model), move an adaptive
        norm (Andrew et al.'s geometric update on the noised unclipped fraction) and return
        the round's metrics: epsilon, noise_std, clipping_norm (the one it clipped with)."""
        used = self.clipping_norm
        self.last_event = None
        rnd = self._round or _Round(len(self._bits) + failures, len(self._bits) + failures,
                                    *self._noise_params(max(1, len(self._bits) + failures)))
        if released:
            self.last_event = PrivacyEvent(rnd.population, rnd.sampled,
                                           float(self.config.noise_multiplier),
                                           float(self.config.target_delta))
            self.ledger.compose(self.ledger.event(rnd.population, rnd.sampled,
                                                  self.config.noise_multiplier))
            if self.config.adaptive and self._bits:
                noised = float(self.rng.normal(sum(self._bits), rnd.count_stddev)) \
                    if rnd.count_stddev > 0 else float(sum(self._bits))
                fraction = noised / len(self._bits)
                self.clipping_norm *= math.exp(-self.config.clip_learning_rate
                                               * (fraction - float(self.config.target_quantile
                                                                   or 0.0)))
        self._round = None
        eps = self.ledger.epsilon
        out: list[tuple[str, str, float | None]] = [
            ("all", "epsilon", eps if math.isfinite(eps) else None),
            ("all", "noise_std", noise_std if released else None),
            ("all", "clipping_norm", used)]
        if self._overruled:  # recorded only when it happens (like ``capped``)
            out.append(("all", "norm_bit_overruled", float(self._overruled)))
        return out
