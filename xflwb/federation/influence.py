"""Bounded influence: how much one update may weigh, and how far it may move the model,
relative to its peers (issue 20; the threat model is docs/security.md).

An absolute bound cannot be right for every model and fleet (a norm of 5 is tiny for one
model and huge for another; 10 examples are a lot for one app and nothing for another), so
the defaults are relative:

* **weight**: ``num_examples`` counts for at most ``max_weight_ratio`` × the *lower* median
  of the peers' claims. The lower median, not the mean of the middle two: with one honest
  phone (10) and one liar (10**15) it is 10, so the liar counts for 2 × 10, not 5 × 10**14.
  With ``H`` honest updates beside one liar at least ⌈H/2⌉ honest claims are ≥ that median,
  so the liar's share of the weight is at most ``r / (r + ⌈H/2⌉)`` (tests/test_influence.py
  checks this bound on arbitrary claims).
* **norm**: an update whose L2 distance to its base model exceeds ``max_norm_ratio`` × the
  lower median of its peers' norms is *rejected* (docs/security.md says why not clipped).

"Peers" are the latest value of each of the last ``WINDOW`` distinct clients (``PeerWindow``)
— for norms, of the same platform (its norm is over the tensors it trains):
one value per client, so a phone that answers fast or often still counts once, and a new
value replaces the old (norms shrink as training converges; a fleet whose updates all grow
is followed after one round instead of being rejected for ever). The windows live as long
as the strategy (across rounds and FedBuff versions; a restarted session warms up again).

Hand-written: Flower's strategies have no relative weight or norm bound (its DP wrappers
clip to a fixed or adaptive norm, which is the DP path's job here).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterable

from xflwb.errors import UpdateRejected

__all__ = ["DEFAULT_MAX_NORM_RATIO", "DEFAULT_MAX_WEIGHT_RATIO", "WARM", "WINDOW",
           "PeerWindow", "UpdateTooLarge", "lower_median", "weight_cap"]

#: default ``max_weight_ratio``: an honest phone with twice the median data still counts
#: fully, a liar counts as two median phones at most
DEFAULT_MAX_WEIGHT_RATIO = 2.0
#: default ``max_norm_ratio``: honest phones of one platform differ from their median by
#: up to ~1.4× on iid digits and ~3.1× on dirichlet:0.1 (1 local epoch, sizes 10–226;
#: measured 2026-12-06), more with more data per phone or later joiners; 10× leaves them
#: a wide margin (a rejected honest phone biases the model as surely as an attacker)
#: while a step 100× an honest one, the attack of issue 20, is still refused
DEFAULT_MAX_NORM_RATIO = 10.0
#: distinct clients remembered per window (bounded memory whatever the fleet)
WINDOW = 256
#: distinct clients a norm judgement needs (fewer: judged against the round / held, FedBuff)
WARM = 3


class UpdateTooLarge(UpdateRejected):
    """An update farther from its base model than its peers allow (a rejection)."""


def lower_median(values: Iterable[float]) -> float:
    """The lower median (element ``(n − 1) // 2`` of the sorted values): an actual value,
    and one liar among ``n ≥ 2`` values can never raise it above every honest one."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the median of no values")
    return ordered[(len(ordered) - 1) // 2]


def weight_cap(claims: Iterable[int], ratio: float | None) -> int | None:
    """The most examples one update may count for: ``⌊ratio × lower median⌋`` (≥ 1), or
    None when there is no cap (``ratio`` None or no claims)."""
    if ratio is None:
        return None
    values = list(claims)
    if not values:
        return None
    return max(1, math.floor(ratio * lower_median(values)))


class PeerWindow:
    """The latest value of each of the last ``size`` distinct clients (least recently seen
    forgotten first).

    The values are also kept sorted, so the median every update is judged against is a
    lookup, not a sort of the whole window per update (a round of N clients sorted the
    window N times)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = int(size)
        self._values: OrderedDict[str, float] = OrderedDict()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._values)

    def _forget(self, value: float) -> None:
        del self._sorted[bisect.bisect_left(self._sorted, value)]

    def observe(self, client: str, value: float) -> None:
        """Record ``client``'s newest value (ignored when not finite)."""
        if not math.isfinite(value):
            return
        old = self._values.pop(client, None)
        if old is not None:
            self._forget(old)
        self._values[client] = float(value)
        bisect.insort(self._sorted, float(value))
        while len(self._values) > self.size:
            self._forget(self._values.popitem(last=False)[1])

    def values(self) -> list[float]:
        return list(self._values.values())

    def median(self) -> float | None:
        """The lower median of the remembered values (None when empty)."""
        return self._sorted[(len(self._sorted) - 1) // 2] if self._sorted else None

    def check(self, norm: float, ratio: float, platform: str) -> None:
        """Raise ``UpdateTooLarge`` when ``norm`` exceeds ``ratio`` × the median."""
        median = self.median()
        if median is None or norm <= ratio * median:
            return
        raise UpdateTooLarge(
            f"update norm {norm:.4g} exceeds max_norm_ratio {ratio:g} × the median norm "
            f"{median:.4g} of the last {len(self)} clients' updates (L2 distance to the "
            f"model it trained from, over the tensors {platform} trains); rejected, not "
            "clipped")
