"""What the routes share: the registry, the session manager, the operator's settings and
the telemetry rate limiters (``AppState``, kept on ``app.state.xfl``)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from xflwb.server.http.limits import BODY_FLOOR
from xflwb.server.phone_sessions import PhoneSessionManager
from xflwb.sessions.registry import Registry

#: telemetry per device token: a burst, then a sustained rate (a phone posts two per round)
TELEMETRY_BURST = 60
TELEMETRY_RATE = 10.0
#: telemetry per client address when device_auth is off (one address may be a NAT or a
#: virtual fleet in front of many phones; the body's device_id is the client's own claim)
ADDRESS_TELEMETRY_BURST = 300
ADDRESS_TELEMETRY_RATE = 30.0
#: new device rows telemetry may create per client address when device_auth is off:
#: a burst, then this many per hour (with tokens: one per issued token)
NEW_DEVICES_BURST = 200
NEW_DEVICES_PER_HOUR = 200


class RateLimiter:
    """A token bucket per key (a device token, a client address): ``burst`` posts at once,
    ``rate`` per second sustained. Thread-safe; remembers at most ``max_keys`` keys (the
    least recently used are forgotten, i.e. start with a full bucket again)."""

    def __init__(self, rate: float = TELEMETRY_RATE, burst: float = TELEMETRY_BURST,
                 max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max_keys
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """Spend one token for ``key``: 0.0 when allowed, else the seconds until one is."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if not wait else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


def client_key(host: str | None) -> str:
    """The rate-limit key of a client address: the address itself, but an IPv6 client's
    /64 network (one host usually holds a whole /64 and could rotate through it)."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


@dataclass
class AppState:
    registry: Registry
    sessions: PhoneSessionManager
    admin_token: str
    auto_start: bool = False
    session_defaults: dict[str, Any] = field(default_factory=dict)
    #: largest HTTP request body; None derives it from the largest published model
    max_body_bytes: int | None = None
    #: honour ``start_fresh`` from a phone's ``train/server`` (otherwise it is ignored and
    #: logged: a phone must not throw away the operator's checkpointed progress)
    allow_phone_start_fresh: bool = False
    #: None: the device API is open (FedKit); "token": phones present an issued token
    device_auth: str | None = None
    #: the device token store (``xflwb.server.security.TokenStore``), made by create_app
    tokens: Any = field(default=None, repr=False)
    #: telemetry posts per device token (device_auth="token") ...
    telemetry_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(),
                                           repr=False)
    #: ... or per client address (open device API); never keyed on a body field
    address_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(
        ADDRESS_TELEMETRY_RATE, ADDRESS_TELEMETRY_BURST), repr=False)
    #: device rows telemetry may create per client address (open device API)
    new_device_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(
        NEW_DEVICES_PER_HOUR / 3600.0, NEW_DEVICES_BURST), repr=False)
    _start_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _locks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def body_limit(self) -> int:
        """``max_body_bytes``, else twice the largest published model file plus 1 MiB (at
        least 1 MiB): no route takes a body near a model's size, so this is generous."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(BODY_FLOOR, 2 * self.registry.largest_artifact_bytes() + BODY_FLOOR)

    def start_lock(self, model_name: str) -> threading.Lock:
        """Serialises this process's auto-starts of one model (the registry's unique index
        settles races with other processes)."""
        with self._locks_lock:
            return self._start_locks.setdefault(model_name, threading.Lock())
