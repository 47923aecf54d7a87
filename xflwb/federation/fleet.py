"""A simulated fleet on a virtual clock: each client's capacities, when it is available, and
how long a fit takes it. Transport-free: what ``xflwb.federation.profiles`` samples and the
virtual-clock hosts (synchronous rounds and FedBuff on the Simulation Engine) read.

* ``Capacities``: per client (index ``0..n-1``, a simulation's partition id) its platform, compute
  slowdown, up/down bandwidth and latency, and per platform the measured per-example cost of
  training and evaluating on this machine's runtime; ``fit_seconds`` / ``evaluate_seconds``
  are download + compute + upload, vectorised over clients.
* ``Availability``: who is available at a time, until when, and when that next changes.
  ``AlwaysAvailable`` (no profile) and ``Windows`` (intervals per client, optionally repeating
  with a period: a day for the diurnal generator, none for a trace file).
* ``VirtualClock``: simulated seconds since the start, advanced by the host only.

Written here, not taken from FedScale/NVFlare: theirs are tied to their own runtimes; the
model is the same (FedScale's completion time = compute + communication; Bonawitz et al.
2019's selection from clients that are idle, charging and on an unmetered network).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from xflwb.errors import InputError

__all__ = ["AlwaysAvailable", "Availability", "Capacities", "NoClientAvailable", "VirtualClock",
           "Windows", "fit_outcomes"]

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]


class NoClientAvailable(InputError):
    """No client of the fleet is ever available (at the start, or from some time on)."""


@dataclass(frozen=True)
class Capacities:
    """Each client's capacities (arrays of length ``n``) and the measured per-example costs.

    ``slowdown`` multiplies the cost measured on this machine (a phone 4× slower than the
    server's CPU has 4.0); ``uplink``/``downlink`` are bytes per second; ``latency`` is
    seconds per message (paid once each way). ``train_cost``/``evaluate_cost``: seconds per
    example (and epoch) of the export on each platform's runtime, measured here
    (``xflwb.simulation.costs``)."""

    platform: tuple[str, ...]
    slowdown: Floats
    uplink: Floats
    downlink: Floats
    latency: Floats
    train_cost: Mapping[str, float]
    evaluate_cost: Mapping[str, float]
    _train: Floats = field(init=False, repr=False, compare=False)
    _evaluate: Floats = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.platform)
        for name in ("slowdown", "uplink", "downlink", "latency"):
            arr = np.asarray(getattr(self, name), np.float64)
            if arr.shape != (n,):
                raise ValueError(f"Capacities.{name} has shape {arr.shape}, expected ({n},)")
            if not (np.isfinite(arr).all() and (arr >= 0).all()):
                raise ValueError(f"Capacities.{name} must be finite and >= 0")
            if name in ("uplink", "downlink", "slowdown") and (arr <= 0).any():
                raise ValueError(f"Capacities.{name} must be > 0")
            object.__setattr__(self, name, arr)
        for costs in (self.train_cost, self.evaluate_cost):
            missing = set(self.platform) - set(costs)
            if missing:
                raise ValueError(f"no measured cost for platform(s) {sorted(missing)}")
        plats = np.asarray(self.platform, dtype=object)
        object.__setattr__(self, "_train", self._per_client(self.train_cost, plats))
        object.__setattr__(self, "_evaluate", self._per_client(self.evaluate_cost, plats))

    @staticmethod
    def _per_client(costs: Mapping[str, float], plats: npt.NDArray[np.object_]) -> Floats:
        out = np.zeros(len(plats), np.float64)
        for p, c in costs.items():
            out[plats == p] = float(c)
        return out

    def __len__(self) -> int:
        return len(self.platform)

    def fit_seconds(self, clients: Ints | Sequence[int], examples: Floats | Sequence[int],
                    epochs: int, bytes_down: Floats | Sequence[int] | float,
                    bytes_up: Floats | Sequence[int] | float) -> Floats:
        """Seconds from the model being sent to the update received, per client: latency
        and ``bytes_down`` / downlink, ``examples × epochs × cost × slowdown``, latency and
        ``bytes_up`` / uplink."""
        i = np.asarray(clients, np.int64)
        compute = (np.asarray(examples, np.float64) * float(epochs) * self._train[i]
                   * self.slowdown[i])
        out: Floats = (2.0 * self.latency[i]
                       + np.asarray(bytes_down, np.float64) / self.downlink[i]
                       + compute + np.asarray(bytes_up, np.float64) / self.uplink[i])
        return out

    def evaluate_seconds(self, clients: Ints | Sequence[int],
                         examples: Floats | Sequence[int],
                         bytes_down: Floats | Sequence[int] | float) -> Floats:
        """Seconds of an evaluation: the model down, the examples, a small answer up."""
        i = np.asarray(clients, np.int64)
        out: Floats = (2.0 * self.latency[i]
                       + np.asarray(bytes_down, np.float64) / self.downlink[i]
                       + np.asarray(examples, np.float64) * self._evaluate[i]
                       * self.slowdown[i])
        return out


class Availability(Protocol):
    """When each client (``0..n-1``) of a fleet can be given work."""

    n: int

    def available(self, t: float) -> Bools:
        """Who is available at simulated time ``t``."""
        ...

    def until(self, t: float) -> Floats:
        """Per client: when its availability at ``t`` ends (``inf``: never; ``t`` itself for
        a client not available at ``t``). A fit still running then is lost (a drop-out)."""
        ...

    def next_change(self, t: float) -> float:
        """The first time after ``t`` at which anyone's availability changes (``inf``:
        never)."""
        ...


@dataclass
class AlwaysAvailable:
    """Every client, all the time (no availability profile)."""

    n: int

    def available(self, t: float) -> Bools:
        return np.ones(self.n, bool)

    def until(self, t: float) -> Floats:
        return np.full(self.n, math.inf)

    def next_change(self, t: float) -> float:
        return math.inf


class Windows:
    """Availability as half-open windows ``[start, end)`` per client, non-overlapping;
    with a ``period`` (seconds) they repeat (``start``/``end`` then lie in ``[0, period]``,
    and a window reaching ``period`` continues into one starting at 0: a night across
    midnight), without one a client is unavailable after its last window (a trace).

    Arrays: ``client``, ``start``, ``end`` of equal length (one row per window)."""

    def __init__(self, n: int, client: Sequence[int] | Ints, start: Sequence[float] | Floats,
                 end: Sequence[float] | Floats, period: float | None = None) -> None:
        self.n = int(n)
        c = np.asarray(client, np.int64)
        s = np.asarray(start, np.float64)
        e = np.asarray(end, np.float64)
        if not (c.shape == s.shape == e.shape) or c.ndim != 1:
            raise ValueError("client, start and end must be 1-D arrays of one length")
        if len(c) and (c.min() < 0 or c.max() >= self.n):
            raise ValueError(f"window client ids must be in 0..{self.n - 1}")
        if not (np.isfinite(s).all() and np.isfinite(e).all()) or (s < 0).any():
            raise ValueError("window times must be finite and >= 0")
        if (e <= s).any():
            raise ValueError("every window must end after it starts")
        if period is not None:
            if not period > 0:
                raise ValueError("period must be > 0")
            if (e > period).any():
                raise ValueError(f"windows of a period of {period} s must lie in [0, {period}]")
        order = np.lexsort((s, c))
        c, s, e = c[order], s[order], e[order]
        same = c[1:] == c[:-1]
        if (same & (s[1:] < e[:-1])).any():
            k = int(np.flatnonzero(same & (s[1:] < e[:-1]))[0])
            raise ValueError(f"client {int(c[k])}: windows [{s[k]:g}, {e[k]:g}) and "
                             f"[{s[k + 1]:g}, {e[k + 1]:g}) overlap")
        self.client, self.start, self.end, self.period = c, s, e, period
        self._bounds = np.unique(np.concatenate([s, e]))
        #: per window reaching the period's end: how long it goes on into the client's
        #: window starting at 0 (inf: all period long, it never ends), else NaN
        self._carry = np.full(len(c), np.nan)
        if period is not None and len(c):
            first = np.searchsorted(c, c)  # each client's first (earliest) window
            wraps = (e == period) & (s[first] == 0)
            self._carry[wraps] = np.where(e[first][wraps] == period, math.inf,
                                          e[first][wraps])

    def _phase(self, t: float) -> tuple[float, float]:
        """(time within the period, the period's start) — (t, 0) without a period."""
        if self.period is None:
            return t, 0.0
        base = math.floor(t / self.period) * self.period
        return t - base, base

    def _open(self, tt: float) -> npt.NDArray[np.int64]:
        """Rows of the windows open at phase ``tt``."""
        return np.flatnonzero((self.start <= tt) & (tt < self.end))

    def available(self, t: float) -> Bools:
        out = np.zeros(self.n, bool)
        out[self.client[self._open(self._phase(t)[0])]] = True
        return out

    def until(self, t: float) -> Floats:
        tt, base = self._phase(t)
        out = np.full(self.n, float(t))
        rows = self._open(tt)
        ends = self.end[rows] + base
        if self.period is not None:  # a night across the period's end goes on
            ends = np.where(np.isnan(self._carry[rows]), ends, ends + self._carry[rows])
        out[self.client[rows]] = ends
        return out

    def next_change(self, t: float) -> float:
        tt, base = self._phase(t)
        later = self._bounds[self._bounds > tt]
        if self.period is not None:
            # the period's end counts too: a window ending there goes on only into one
            # starting at 0 (then nothing changes there, which costs a caller one more step)
            if later.size:
                return float(base + later[0])
            # the next period's first boundary (0 itself when a window starts there)
            return float(base + self.period + (self._bounds[0] if self._bounds.size else 0))
        return float(base + later[0]) if later.size else math.inf


class VirtualClock:
    """Simulated seconds since the simulation started; only the host moves it forwards."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        if t < self.now:
            raise ValueError(f"the virtual clock cannot go back from {self.now} to {t}")
        self.now = float(t)


def fit_outcomes(availability: Availability, clients: Ints | Sequence[int], start: float,
                 seconds: Floats) -> tuple[Floats, Bools]:
    """For fits started at ``start`` lasting ``seconds``: (when each ends — its report, or
    the moment its client became unavailable —, whether it dropped out)."""
    i = np.asarray(clients, np.int64)
    finish = start + np.asarray(seconds, np.float64)
    ends = availability.until(start)[i]
    dropped = finish > ends
    return np.where(dropped, ends, finish), dropped
