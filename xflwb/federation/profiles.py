"""``xflwb.DeviceProfiles``: what the phones of a simulated fleet are like — how fast they
compute, their bandwidth and latency, when they are available — and the seeded, vectorised
draws that turn a profile into a fleet (``xflwb.federation.fleet``'s ``Capacities`` and an
``Availability``).

* Distributions are spelt ``"const:X"`` (or just ``"X"``), ``"uniform:A,B"``,
  ``"lognormal:MEDIAN,SIGMA"`` or ``"pareto:XM,ALPHA"``; each field of each client is drawn
  from its own seeded stream, so changing one field's distribution changes only that
  field's draws, and a larger fleet keeps the first clients' draws.
* Availability: ``"always"``, ``"diurnal"`` (a time-zone mix, a nightly charging/Wi-Fi
  window in local time, sessions inside it calibrated to ``available_fraction``) or an
  availability trace CSV; a device-capacity CSV (``devices``) overrides the draws of the
  clients it names. Both file formats are in docs/profiles.md.

Transport-free, like the rest of ``xflwb.federation``: the simulation's hosts read what
these functions return.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from xflwb import _options
from xflwb._options import OptionError, did_you_mean, option
from xflwb.errors import InputError
from xflwb.federation.fleet import (
    AlwaysAvailable,
    Availability,
    Capacities,
    NoClientAvailable,
    Windows,
)

__all__ = [
    "DeviceProfiles",
    "DeviceTable",
    "Distribution",
    "TraceError",
    "availability",
    "check",
    "check_deadline",
    "distribution",
    "diurnal",
    "profiles_dict",
    "read_availability_trace",
    "read_devices",
    "sample_capacities",
]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

DAY = 86400.0
PLATFORMS = ("android", "ios")
KINDS = ("slowdown", "uplink", "downlink", "latency")
_DIST_FIX = ('write "const:X" (or just X), "uniform:A,B", "lognormal:MEDIAN,SIGMA" or '
             '"pareto:XM,ALPHA", e.g. "lognormal:4,0.6"')
#: a "key=value,…" profile spelling: a word, then "=" (values may hold commas)
_PAIRS = re.compile(r",(?=\s*\w+\s*=)")
#: FedScale's augmentation factor: training one sample costs 3 × its ``computation``
#: (its per-sample inference latency in ms), forward plus backward
FEDSCALE_AUGMENTATION = 3.0
#: FedScale's kbps: its model sizes are bytes × 8 / 1024 "kbit", so 1 kbps = 128 bytes/s
FEDSCALE_KBPS_BYTES = 128.0


class TraceError(InputError):
    """A trace or device-capacity CSV file that cannot be read as documented
    (docs/profiles.md): the message names the file, the row and the fix."""


# -- distributions -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Distribution:
    """One parsed distribution spelling; ``spec`` is its canonical form."""

    kind: str  # const | uniform | lognormal | pareto
    params: tuple[float, ...]

    @property
    def spec(self) -> str:
        return f"{self.kind}:{','.join(_number(p) for p in self.params)}"

    def sample(self, rng: np.random.Generator, size: int) -> Floats:
        """``size`` draws (vectorised)."""
        p = self.params
        if self.kind == "const":
            return np.full(size, p[0], np.float64)
        if self.kind == "uniform":
            return rng.uniform(p[0], p[1], size)
        out: Floats
        if self.kind == "lognormal":
            out = p[0] * np.exp(p[1] * rng.standard_normal(size))
        else:  # classical Pareto (XM × (1 + Lomax)): inverse transform of one uniform
            out = p[0] * (1.0 - rng.random(size)) ** (-1.0 / p[1])
        return out

    @property
    def mean(self) -> float:
        """The distribution's mean (``inf`` for a Pareto with ALPHA ≤ 1)."""
        p = self.params
        if self.kind == "const":
            return p[0]
        if self.kind == "uniform":
            return (p[0] + p[1]) / 2
        if self.kind == "lognormal":
            return p[0] * math.exp(p[1] ** 2 / 2)
        return math.inf if p[1] <= 1 else p[1] * p[0] / (p[1] - 1)

    @property
    def log10_max(self) -> float:
        """log10 of the largest value it can draw (lognormal: 8 σ above the median; Pareto:
        at the smallest uniform numpy draws, 2^-53)."""
        p = self.params
        scale = p[-1] if self.kind == "uniform" else p[0]
        if scale <= 0:
            return -math.inf
        top = math.log10(scale)
        if self.kind == "lognormal":
            top += 8 * p[1] / math.log(10)
        elif self.kind == "pareto":
            top += 53 / p[1] * math.log10(2)
        return top


def _number(x: float) -> str:
    """The shortest spelling that reads back as ``x`` (``1250000``, ``0.1``, ``1e+20``)."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)


_ARITY = {"const": 1, "uniform": 2, "lognormal": 2, "pareto": 2}


def distribution(spec: Any, name: str, *, positive: bool = True) -> Distribution:
    """``spec`` parsed, or ``OptionError`` naming the field ``name`` and the fix; values
    must be > 0 (``positive``) or ≥ 0."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str):
        raise OptionError(f"{name} must be a distribution string, got {spec!r}; {_DIST_FIX}")
    text = spec.strip().lower()
    kind, sep, args = text.partition(":")
    if not sep:  # a bare number: a constant
        kind, args = "const", text
    if kind not in _ARITY:
        raise OptionError(f"{name}: {spec!r} is not a distribution;"
                          f"{did_you_mean(kind, _ARITY) or ''} {_DIST_FIX}")
    try:
        values = tuple(float(a) for a in args.split(","))
    except ValueError:
        raise OptionError(f"{name}: {spec!r}: {args!r} is not a list of numbers; "
                          f"{_DIST_FIX}") from None
    if len(values) != _ARITY[kind] or not all(math.isfinite(v) for v in values):
        raise OptionError(f"{name}: {spec!r}: {kind} takes {_ARITY[kind]} finite "
                          f"number(s); {_DIST_FIX}")
    bound = "> 0" if positive else ">= 0"
    scale = values[0]
    if scale < 0 or (positive and scale == 0):
        what = {"const": "its value", "uniform": "A", "lognormal": "MEDIAN",
                "pareto": "XM"}[kind]
        raise OptionError(f"{name}: {spec!r}: {what} must be {bound}; {_DIST_FIX}")
    if kind == "uniform" and values[1] < values[0]:
        raise OptionError(f"{name}: {spec!r}: uniform:A,B needs A <= B")
    if kind == "lognormal" and values[1] < 0:
        raise OptionError(f"{name}: {spec!r}: lognormal SIGMA must be >= 0")
    if kind == "pareto" and values[1] <= 0:
        raise OptionError(f"{name}: {spec!r}: pareto ALPHA must be > 0 (heavier tails "
                          "are smaller; 1.5 is heavy, 3 is light)")
    dist = Distribution(kind, values)
    if dist.log10_max > 300:
        raise OptionError(f"{name}: {spec!r} draws values up to about 1e{dist.log10_max:.0f}, "
                          "too large to simulate; use a smaller SIGMA, a larger ALPHA or a "
                          "smaller scale")
    return dist


def _window(spec: Any) -> tuple[float, float]:
    """``"22-7"`` → (22.0, 7.0) local hours, or ``OptionError``."""
    fix = 'write the local hours "START-END" in 0..24, e.g. "22-7" (22:00 to 07:00)'
    if not isinstance(spec, str):
        raise OptionError(f"window must be a string, got {spec!r}; {fix}")
    parts = spec.split("-")
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise OptionError(f"window {spec!r} is not understood; {fix}") from None
    if not (0 <= a <= 24 and 0 <= b <= 24):
        raise OptionError(f"window {spec!r}: hours must be in 0..24; {fix}")
    return a, b


def _window_hours(spec: str) -> float:
    a, b = _window(spec)
    length = (b - a) % 24
    return 24.0 if length == 0 else length


def _timezones(spec: Any) -> Floats:
    """``"-8,0,1,8"`` → offsets in hours (a repeated offset weighs more)."""
    fix = 'write UTC offsets in hours separated by commas, e.g. "-8,-5,0,1,8" (repeat one ' \
          'to weigh it more)'
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise OptionError(f"timezones must be a string, got {spec!r}; {fix}")
    try:
        out = np.array([float(p) for p in spec.split(",")], np.float64)
    except ValueError:
        raise OptionError(f"timezones {spec!r} is not understood; {fix}") from None
    if not (np.isfinite(out).all() and (np.abs(out) <= 14).all()):
        raise OptionError(f"timezones {spec!r}: offsets lie in -14..14 hours; {fix}")
    return out


# -- the option set ----------------------------------------------------------------------------
@_options.declared  # unknown keywords: did you mean
@dataclass
class DeviceProfiles:
    """What the simulated phones are like (``xflwb.simulate(..., profiles=...)``): per
    platform, distributions of compute slowdown, bandwidth and latency, and when clients
    are available. The defaults are illustrative orders of magnitude, not measurements
    (docs/profiles.md says where they come from)."""

    android_slowdown: str = option("lognormal:4,0.6", "Android compute time × the cost "
                                  "measured on this machine's TFLite interpreter "
                                  '(distribution: "const:X", "uniform:A,B", '
                                  '"lognormal:MEDIAN,SIGMA", "pareto:XM,ALPHA")')
    ios_slowdown: str = option("lognormal:2.5,0.4", "iOS compute time × the cost measured on "
                              "this machine's Core ML executor (distribution)")
    android_uplink: str = option("lognormal:250000,0.8", "Android upload bandwidth, bytes/s "
                                "(distribution; 250000 ≈ 2 Mbit/s)")
    ios_uplink: str = option("lognormal:375000,0.7", "iOS upload bandwidth, bytes/s "
                            "(distribution)")
    android_downlink: str = option("lognormal:1250000,0.8", "Android download bandwidth, "
                                  "bytes/s (distribution; 1250000 ≈ 10 Mbit/s)")
    ios_downlink: str = option("lognormal:1875000,0.7", "iOS download bandwidth, bytes/s "
                              "(distribution)")
    android_latency: str = option("lognormal:0.15,0.5", "Android latency, seconds per "
                                 "message (distribution)")
    ios_latency: str = option("lognormal:0.1,0.5", "iOS latency, seconds per message "
                             "(distribution)")
    availability: str = option("always", 'when clients can train: "always", "diurnal" '
                               "(time zones, a nightly window, sessions) or the path of an "
                               "availability trace CSV (client, available_from, "
                               "available_to)", path=True)
    available_fraction: float = option(0.2, "diurnal: mean share of the fleet available "
                                       "over a day", gt=0, le=1)
    timezones: str = option("-8,-5,-3,0,1,2,5.5,8,9", "diurnal: UTC offsets (hours) the "
                            "clients spread over evenly; repeat one to weigh it more")
    window: str = option("22-7", 'diurnal: local hours a phone may be on charger and Wi-Fi, '
                         '"START-END"')
    session_minutes: str = option("lognormal:45,0.8", "diurnal: length of one availability "
                                 "session in minutes (distribution)")
    devices: str | None = option(None, "path of a device-capacity CSV (client, slowdown or "
                                 "FedScale's computation, uplink, downlink, latency or "
                                 "FedScale's communication) overriding the draws of the "
                                 "clients it names; none: draws only", path=True)

    def __post_init__(self) -> None:
        _options.check(self)
        for plat in PLATFORMS:
            for kind in KINDS:
                name = f"{plat}_{kind}"
                dist = distribution(getattr(self, name), name, positive=kind != "latency")
                setattr(self, name, dist.spec)
        session = distribution(self.session_minutes, "session_minutes")
        self.session_minutes = session.spec
        _window(self.window)
        self.timezones = ",".join(_number(float(t)) for t in _timezones(self.timezones))
        self.availability = os.fspath(self.availability)
        if self.availability.strip().lower() in ("always", "diurnal"):
            self.availability = self.availability.strip().lower()
        else:
            self.availability = _existing(self.availability, "availability",
                                          '"always", "diurnal" or the path of an '
                                          "availability trace CSV")
        if self.devices is not None:
            self.devices = _existing(os.fspath(self.devices), "devices",
                                     "the path of a device-capacity CSV, or None")
        if self.availability == "diurnal":
            share = _window_hours(self.window) / 24
            if self.available_fraction > share + 1e-12:
                raise OptionError(
                    f"available_fraction {self.available_fraction:g} cannot be reached inside "
                    f"the window {self.window!r} ({share:.3g} of the day): widen the window "
                    f"or lower available_fraction to at most {share:.3g}")


def _existing(path: str, name: str, what: str) -> str:
    """``path`` made absolute (the simulation process may run elsewhere), or an error."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        words = ("always", "diurnal") if name == "availability" else ()
        hint = did_you_mean(path, words) if words else ""
        raise OptionError(f"{name}: no file {path!r};{hint} {name} takes {what}"
                          if hint else f"{name}: no file {path!r}; {name} takes {what}")
    return full


def profiles_dict(value: Any) -> dict[str, Any] | None:
    """``SimulationConfig.profiles`` normalised: a ``DeviceProfiles``, its dict (``{}``: the
    defaults), a JSON object or a ``"key=value,…"`` string → the dict of ALL its fields
    (canonical spellings, absolute paths); ``None`` → ``None``; ``OptionError`` naming the
    field (did you mean) otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _parse_text(value)
    if isinstance(value, dict):
        try:
            value = DeviceProfiles(**value)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"profiles: {exc}") from None
    if not isinstance(value, DeviceProfiles):
        raise OptionError(
            "profiles must be xflwb.DeviceProfiles(...), its dict, a JSON object or "
            f"'android_slowdown=lognormal:4,0.6,availability=diurnal', or None; got {value!r}")
    return dataclasses.asdict(value)


def _parse_text(text: str) -> dict[str, Any]:
    """A command line's ``--profiles``: a JSON object or ``key=value,…`` (values may hold
    commas: a new pair starts at ``,word=``)."""
    body = text.strip()
    if body.startswith("{"):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            raise OptionError(f"profiles {text!r} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise OptionError(f"profiles {text!r} must be a JSON object")
        return value
    out: dict[str, Any] = {}
    if not body:
        return out
    kinds = {o.name: o for o in _options.options(DeviceProfiles)}
    for part in _PAIRS.split(body):
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key:
            raise OptionError(f"profiles {text!r}: {part.strip()!r} is not key=value; write "
                              "e.g. 'availability=diurnal,android_slowdown=lognormal:4,0.6'")
        if key in out:
            raise OptionError(f"profiles {text!r} gives {key!r} twice")
        o = kinds.get(key)
        if o is not None and o.nullable and val.lower() in ("none", "null"):
            out[key] = None
        elif o is not None and o.kind is float:
            try:
                out[key] = float(val)
            except ValueError:
                raise OptionError(f"profiles: {key} must be a number, got {val!r}") from None
        else:
            out[key] = val  # unknown keys are refused by name by DeviceProfiles
    return out


def _profiles(profiles: Mapping[str, Any]) -> dict[str, Any]:
    """A stored profile (the dict of all fields ``profiles_dict`` made: trusted, as a
    stored config is, not validated again) or a partial one (completed and checked)."""
    try:
        return dataclasses.asdict(_options.restore(DeviceProfiles, dict(profiles)))
    except (TypeError, ValueError) as exc:
        raise OptionError(f"profiles: {exc}") from None


def check(profiles: Mapping[str, Any] | None, n: int, seed: int) -> None:
    """Everything about ``profiles`` that needs the fleet (``n`` clients), before a
    simulation starts: trace files parsed against the fleet, somebody available at the
    start."""
    if profiles is None:
        return
    if profiles.get("devices"):
        read_devices(str(profiles["devices"]), n)
    avail = availability(profiles, n, seed)
    _someone_at_start(avail, profiles)


def _someone_at_start(avail: Availability, profiles: Mapping[str, Any]) -> None:
    if avail.available(0.0).any():
        return
    source = profiles.get("availability")
    if source == "diurnal":
        fix = ("at 00:00 UTC every client is outside its window or between sessions: use "
               "more clients, a larger available_fraction, a window or timezones that "
               "cover 00:00 UTC, or another seed")
    else:
        fix = "give some client a window starting at 0 (available_from 0)"
    raise NoClientAvailable(f"no client of the {avail.n}-client fleet is available at the "
                            f"start (t=0) under availability {source!r}; {fix}")


# -- seeded draws --------------------------------------------------------------------------------
#: each stream of draws has its own number: a field's draws never depend on another's
_STREAMS = {(plat, kind): 100 + 10 * i + j for i, plat in enumerate(PLATFORMS)
            for j, kind in enumerate(KINDS)}
_TZ_STREAM, _SESSION_STREAM, _GAP_STREAM = 1, 2, 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0x5052, stream])  # 0x5052: "PR"ofiles


def sample_capacities(profiles: Mapping[str, Any], platforms: Sequence[str],
                      train_cost: Mapping[str, float], evaluate_cost: Mapping[str, float],
                      seed: int) -> Capacities:
    """Each client's capacities drawn from its platform's distributions (client ``i`` has
    ``platforms[i]``), then the rows of the ``devices`` CSV put over the draws."""
    p = _profiles(profiles)
    plats = np.asarray(list(platforms), dtype=object)
    n = len(plats)
    unknown = sorted(set(plats.tolist()) - set(PLATFORMS))
    if unknown:
        raise ValueError(f"device profiles cover {PLATFORMS}, not {unknown}")
    arrays: dict[str, Floats] = {}
    for kind in KINDS:
        out = np.zeros(n, np.float64)
        for plat in PLATFORMS:
            mask = plats == plat
            if mask.any():
                dist = distribution(p[f"{plat}_{kind}"], f"{plat}_{kind}",
                                    positive=kind != "latency")
                # n draws, kept where the platform is: client i's draw depends on i alone
                out[mask] = dist.sample(_rng(seed, _STREAMS[plat, kind]), n)[mask]
        arrays[kind] = out
    if p.get("devices"):
        table = read_devices(str(p["devices"]), n)
        table.apply(arrays, plats, train_cost)
    return Capacities(platform=tuple(str(x) for x in plats), slowdown=arrays["slowdown"],
                      uplink=arrays["uplink"], downlink=arrays["downlink"],
                      latency=arrays["latency"], train_cost=dict(train_cost),
                      evaluate_cost=dict(evaluate_cost))


def availability(profiles: Mapping[str, Any], n: int, seed: int) -> Availability:
    """The fleet's availability under ``profiles``: always, the seeded diurnal generator, or
    a trace file's windows."""
    p = _profiles(profiles)
    source = p["availability"]
    if source == "always":
        return AlwaysAvailable(int(n))
    if source == "diurnal":
        return diurnal(int(n), seed, fraction=float(p["available_fraction"]),
                       timezones=p["timezones"], window=p["window"],
                       session_minutes=p["session_minutes"])
    return read_availability_trace(source, int(n))


def diurnal(n: int, seed: int, *, fraction: float, timezones: str, window: str,
            session_minutes: str) -> Windows:
    """Daily availability windows (``period`` one day, t=0 is 00:00 UTC).

    Each client gets a UTC offset from ``timezones``; inside its local ``window`` it
    alternates gaps and sessions (lengths from ``session_minutes``, cut at the window's end).
    The gaps' scale is calibrated (bisection over the fixed draws) so that the mean share of
    the fleet available over the day is ``fraction``; all draws are seeded."""
    if n < 1:
        raise ValueError("a fleet needs at least one client")
    w0, _ = _window(window)
    span = _window_hours(window) * 3600.0
    target = fraction * DAY * n  # client-seconds available per day
    if target > span * n * (1 + 1e-9):
        raise OptionError(f"available_fraction {fraction:g} cannot be reached inside the "
                          f"window {window!r}: widen it or lower available_fraction")
    offsets = _timezones(timezones)
    tz = offsets[_rng(seed, _TZ_STREAM).integers(len(offsets), size=n)]
    dist = distribution(session_minutes, "session_minutes")
    sessions, gaps = _session_draws(dist, n, span, seed)

    def covered(scale: float) -> tuple[Floats, Floats]:
        """(start, end) within the window, per client and session, at gap scale ``scale``
        (a session wholly past the window has start == end == span)."""
        start = np.cumsum(gaps * scale, axis=1)
        start[:, 1:] += np.cumsum(sessions, axis=1)[:, :-1]
        start = np.minimum(start, span)
        return start, np.minimum(start + sessions, span)

    def total(scale: float) -> float:
        start, end = covered(scale)
        return float((end - start).sum())

    lo, hi = 0.0, max(dist.mean if math.isfinite(dist.mean) else span, 1.0) * 60.0
    while total(hi) > target:  # grows the gaps until too little is covered
        hi *= 2
        if hi > 1e12:
            break
    if total(lo) <= target:
        hi = lo
    for _ in range(60):  # total() decreases with the scale: bisect to the target
        mid = (lo + hi) / 2
        if total(mid) > target:
            lo = mid
        else:
            hi = mid
    start, end = covered(hi)
    keep = end > start
    client = np.broadcast_to(np.arange(n)[:, None], start.shape)[keep]
    origin = np.mod((w0 - tz) * 3600.0, DAY)[client]  # the window's start in UTC seconds
    a = np.mod(origin + start[keep], DAY)
    b = a + (end[keep] - start[keep])
    wraps = b > DAY
    # a session across 24:00 UTC is two windows: [a, DAY) and [0, b - DAY)
    c = np.concatenate([client, client[wraps]])
    s = np.concatenate([a, np.zeros(int(wraps.sum()))])
    e = np.concatenate([np.minimum(b, DAY), b[wraps] - DAY])
    c, s, e = _merge(c, s, e)
    return Windows(n, c, s, e, period=DAY)


def _session_draws(dist: Distribution, n: int, span: float,
                   seed: int) -> tuple[Floats, Floats]:
    """(session lengths in seconds, unit exponential gaps), ``n × K`` with enough columns
    that every client's sessions alone fill its window."""
    k = max(4, math.ceil(2 * span / max(min(dist.mean, span / 60.0) * 60.0, 1.0)) + 4)
    while True:
        if n * k > 40_000_000:
            raise OptionError(
                f"session_minutes {dist.spec!r}: sessions this short need too many draws "
                f"to fill the window; use sessions of a few minutes or more")
        sessions = np.minimum(dist.sample(_rng(seed, _SESSION_STREAM), n * k)
                              .reshape(n, k) * 60.0, span)
        if (sessions.sum(axis=1) >= span).all():
            break
        k *= 2
    gaps = _rng(seed, _GAP_STREAM).standard_exponential(n * k).reshape(n, k)
    return sessions, gaps


def _merge(c: Ints, s: Floats, e: Floats) -> tuple[Ints, Floats, Floats]:
    """Windows of one client that touch (``[a, b)``, ``[b, c)``) merged into one, so a
    client available throughout is not cut at the seam."""
    order = np.lexsort((s, c))
    c, s, e = c[order], s[order], e[order]
    if len(c) < 2:
        return c, s, e
    new = np.ones(len(c), bool)
    new[1:] = (c[1:] != c[:-1]) | (s[1:] > e[:-1])
    first = np.flatnonzero(new)
    ends = np.maximum.reduceat(e, first)
    return c[first], s[first], ends


# -- trace files ---------------------------------------------------------------------------------
def _read_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV, or ``TraceError`` for an empty one."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(i + 1, row) for i, row in enumerate(csv.reader(fh))
                    if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file; pass an existing CSV path") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{path}: not a readable CSV ({exc}); save it as UTF-8 text with "
                         "a header row") from None
    if not rows:
        raise TraceError(f"{path} is empty; it needs a header row and one row per window "
                         "(docs/profiles.md)")
    header = [h.strip().lower() for h in rows[0][1]]
    return header, rows[1:]


def _columns(path: str, header: list[str], required: Sequence[str],
             optional: Sequence[str]) -> dict[str, int]:
    known = [*required, *optional]
    for name in header:
        if name not in known:
            raise TraceError(f"{path}, row 1: unknown column {name!r};"
                             f"{did_you_mean(name, known) or ''} the columns are "
                             f"{', '.join(known)}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise TraceError(f"{path}, row 1: column {dup[0]!r} appears twice; keep one")
    missing = [r for r in required if r not in header]
    if missing:
        raise TraceError(f"{path}, row 1: missing column(s) {', '.join(missing)}; the header "
                         f"needs {', '.join(required)}")
    return {h: i for i, h in enumerate(header)}


def _numbers(path: str, rows: list[tuple[int, list[str]]], col: int, name: str,
             width: int) -> Floats:
    out = np.empty(len(rows), np.float64)
    for k, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise TraceError(f"{path}, row {line}: {len(cells)} cells for {width} columns; "
                             "give every row one value per column")
        try:
            out[k] = float(cells[col])
        except ValueError:
            raise TraceError(f"{path}, row {line}: {name} {cells[col]!r} is not a number; "
                             "write a plain number") from None
        if not math.isfinite(out[k]):
            raise TraceError(f"{path}, row {line}: {name} {cells[col]!r} is not finite; "
                             "write a plain number")
    return out


def _clients(path: str, rows: list[tuple[int, list[str]]], col: int, width: int,
             n: int) -> Ints:
    values = _numbers(path, rows, col, "client", width)
    bad = (values != np.round(values)) | (values < 0) | (values >= n)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{path}, row {rows[k][0]}: client {rows[k][1][col]!r} is not a client "
                         f"of the fleet; write a partition id, an integer in 0..{n - 1}")
    return values.astype(np.int64)


def read_availability_trace(path: str, n: int) -> Windows:
    """An availability trace (columns ``client, available_from, available_to``, seconds
    since the simulation's start; one row per window) as ``Windows(period=None)``: a client
    is unavailable outside its rows, and after its last one."""
    header, rows = _read_rows(path)
    cols = _columns(path, header, ("client", "available_from", "available_to"), ())
    if not rows:
        raise TraceError(f"{path} has a header but no rows; add one row per window")
    width = len(header)
    client = _clients(path, rows, cols["client"], width, n)
    start = _numbers(path, rows, cols["available_from"], "available_from", width)
    end = _numbers(path, rows, cols["available_to"], "available_to", width)
    neg = np.flatnonzero(start < 0)
    if neg.size:
        line = rows[int(neg[0])][0]
        raise TraceError(f"{path}, row {line}: available_from {start[neg[0]]:g} is negative; "
                         "times are seconds since the simulation's start (>= 0)")
    empty = np.flatnonzero(start >= end)
    if empty.size:
        k = int(empty[0])
        raise TraceError(f"{path}, row {rows[k][0]}: available_from {start[k]:g} is not "
                         f"before available_to {end[k]:g}; each window must end after it "
                         "starts")
    order = np.lexsort((start, client))
    c, s, e = client[order], start[order], end[order]
    clash = np.flatnonzero((c[1:] == c[:-1]) & (s[1:] < e[:-1]))
    if clash.size:
        k = int(clash[0])
        first, second = rows[int(order[k])][0], rows[int(order[k + 1])][0]
        raise TraceError(f"{path}, rows {min(first, second)} and {max(first, second)}: "
                         f"client {int(c[k])}'s windows [{s[k]:g}, {e[k]:g}) and "
                         f"[{s[k + 1]:g}, {e[k + 1]:g}) overlap; merge them into one row")
    c, s, e = _merge(c, s, e)
    return Windows(n, c, s, e, period=None)


#: device CSV columns: ours, and FedScale's device-info fields where they map
DEVICE_COLUMNS = ("slowdown", "computation", "uplink", "downlink", "latency",
                  "communication", "ul_kbps", "dl_kbps")
_CONFLICTS = (("slowdown", "computation"), ("uplink", "communication"),
              ("uplink", "ul_kbps"), ("downlink", "communication"),
              ("downlink", "dl_kbps"), ("communication", "ul_kbps"),
              ("communication", "dl_kbps"))


@dataclass(frozen=True)
class DeviceTable:
    """A device-capacity CSV: its client ids and, per column given, the values."""

    client: Ints
    values: dict[str, Floats]

    def apply(self, arrays: dict[str, Floats], platforms: npt.NDArray[np.object_],
              train_cost: Mapping[str, float]) -> None:
        """Put the table's values over the drawn ``arrays`` (slowdown, uplink, downlink,
        latency), converting FedScale's units."""
        i, v = self.client, self.values
        if "slowdown" in v:
            arrays["slowdown"][i] = v["slowdown"]
        if "computation" in v:  # ms per sample of inference; training costs 3× that
            cost = np.array([float(train_cost[str(p)]) for p in platforms[i]], np.float64)
            arrays["slowdown"][i] = FEDSCALE_AUGMENTATION * v["computation"] / 1000.0 / cost
        for ours, theirs in (("uplink", "ul_kbps"), ("downlink", "dl_kbps")):
            if ours in v:
                arrays[ours][i] = v[ours]
            elif theirs in v:
                arrays[ours][i] = v[theirs] * FEDSCALE_KBPS_BYTES
            elif "communication" in v:
                arrays[ours][i] = v["communication"] * FEDSCALE_KBPS_BYTES
        if "latency" in v:
            arrays["latency"][i] = v["latency"]


def read_devices(path: str, n: int) -> DeviceTable:
    """A device-capacity CSV (docs/profiles.md) for a fleet of ``n``, checked."""
    header, rows = _read_rows(path)
    cols = _columns(path, header, ("client",), DEVICE_COLUMNS)
    given = [h for h in header if h != "client"]
    if not given:
        raise TraceError(f"{path}, row 1: missing column(s): no capacity column besides "
                         f"client; add some of {', '.join(DEVICE_COLUMNS)}")
    for a, b in _CONFLICTS:
        if a in given and b in given:
            raise TraceError(f"{path}, row 1: columns {a!r} and {b!r} say the same thing; "
                             "keep one")
    if not rows:
        raise TraceError(f"{path} has a header but no rows; add one row per client")
    width = len(header)
    client = _clients(path, rows, cols["client"], width, n)
    seen, first = np.unique(client, return_index=True)
    if len(seen) != len(client):
        dup_pos = np.setdiff1d(np.arange(len(client)), first)[0]
        raise TraceError(f"{path}, row {rows[int(dup_pos)][0]}: client "
                         f"{int(client[dup_pos])} appears twice; keep one row per client")
    values: dict[str, Floats] = {}
    for name in given:
        arr = _numbers(path, rows, cols[name], name, width)
        bad = arr < 0 if name == "latency" else arr <= 0
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            bound = ">= 0" if name == "latency" else "> 0"
            raise TraceError(f"{path}, row {rows[k][0]}: {name} {arr[k]:g} must be {bound}")
        values[name] = arr
    return DeviceTable(client, values)


# -- deadlines -----------------------------------------------------------------------------------
def check_deadline(caps: Capacities, deadline: float, examples: Any, epochs: int,
                   bytes_down: Any, bytes_up: Any) -> None:
    """``InputError`` when no client of the fleet could report within ``deadline`` seconds
    (even at once and always available), naming the fastest client's time and the fix."""
    n = len(caps)
    if n == 0:
        return
    secs = caps.fit_seconds(np.arange(n), examples, epochs, bytes_down, bytes_up)
    best = int(np.argmin(secs))
    if secs[best] > deadline:
        raise InputError(
            f"deadline {deadline:g} s: no client can report in time; the fastest "
            f"({caps.platform[best]} client {best}) needs {secs[best]:.4g} s for a fit "
            f"(download, {epochs} epoch(s), upload). Raise deadline above {secs[best]:.4g}, "
            "or make the profile faster (lower slowdown, more bandwidth)")

