"""What one simulation needs, validated up front and stored as JSON in the registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xflwb import _options
from xflwb._options import option
from xflwb.bridge.params import PLATFORMS
from xflwb.errors import InputError
from xflwb.sessions.options import RoundOptions
from xflwb.simulation import secagg as secagg_mod


def platform_of(partition_id: int, android: int) -> str:
    """Clients ``0..android-1`` are Android, the rest iOS (``wb.spawn_devices``' order)."""
    return "android" if partition_id < android else "ios"


@contextlib.contextmanager
def _secagg_input() -> Iterator[None]:
    """``xflwb.simulation.secagg``'s checks raise a bare ``ValueError``: the same message as
    an ``InputError`` (an xflwb error, which the magics show as one line)."""
    try:
        yield
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(str(exc)) from None


@_options.declared  # unknown keywords: did you mean
@dataclass
class SimulationConfig(RoundOptions):
    """A simulated fleet: ``android`` + ``ios`` clients on partitions of one dataset.

    Clients ``0 .. android-1`` are Android and the rest iOS, on partitions in that order —
    the same pairing as ``wb.spawn_devices(android=…, ios=…)``, so a simulation and a
    process fleet with the same seed train on the same data.
    """

    android: int = option(0, "simulated Android clients (run the .tflite)", ge=0)
    ios: int = option(0, "simulated iOS clients (run the .mlmodel in the Core ML executor)",
                      ge=0)
    dataset: str = option("digits", "dataset the clients train on (see "
                          "xflwb.devices.datasets.SPECS)")
    partition: str = option("iid", "how the dataset is split: iid | dirichlet:ALPHA | "
                            "shards:K")
    seed: int = option(0, "seed of the partitions, client sampling and dropouts")
    test_fraction: float = option(0.2, "per-client share of its partition held out for "
                                  "evaluation", ge=0, lt=1)
    #: a failure for that round, as a phone that loses its connection is
    drop_prob: float = option(0.0, "chance that a sampled client drops out of a fit (seeded "
                              "per client and attempt)", ge=0, lt=1)
    backend_config: dict[str, Any] | None = option(
        None, "Flower's backend config, e.g. {\"client_resources\": {\"num_cpus\": 1}}; its "
        "init_args go to ray.init")
    ray_address: str | None = option(None, 'attach to a running Ray cluster ("auto", '
                                     '"ray://host:10001") instead of starting one')
    #: Flower's SecAgg+ workflow; stored as the dict of all ``SecAgg`` fields
    secagg: dict[str, Any] | None = option(
        None, "secure aggregation (Flower's SecAgg+) of the fit rounds: xflwb.SecAgg(...) or "
        "a dict of its fields ({}: its defaults); none: plain aggregation")
    #: stored as the dict of all ``DeviceProfiles`` fields (``xflwb.federation.profiles``);
    #: None: the ideal fleet (no slowdown, always available) on the virtual clock
    profiles: dict[str, Any] | None = option(
        None, "what the simulated phones are like (compute, bandwidth, latency, "
        "availability): xflwb.DeviceProfiles(...), its dict ({}: its defaults) or "
        "'availability=diurnal,android_slowdown=lognormal:4,0.6'; none: an ideal fleet, "
        "always available", text=True, metavar="SPEC")
    #: server threads with a message in flight (Flower's default of 6 would leave the
    #: actors idle while replies are polled)
    max_workers: int = option(256, "server threads with a message in flight", ge=1,
                              front=False)
    engine: str = option("simulation", "marks the registry row: phones never join it",
                         choices=("simulation",), front=False)

    def __post_init__(self) -> None:
        from xflwb.devices import datasets, partition
        from xflwb.federation import profiles as profiles_mod

        # a DeviceProfiles, its dict or a spec string → the dict of all fields (did you mean)
        self.profiles = profiles_mod.profiles_dict(self.profiles)
        if self.secagg is not None:
            with _secagg_input():
                self.secagg = secagg_mod.normalized(self.secagg)
        self._check_rounds()
        from xflwb.sessions.options import is_asynchronous

        if is_asynchronous(self) and self.secagg is not None:
            raise InputError(
                f"strategy {self.strategy!r} applies each update as it arrives, which "
                "SecAgg+ hides (it reveals only the sum of a round's clients): use "
                "secagg=None with fedbuff, or a synchronous strategy (fedavg, ...) with "
                "secagg")
        if self.num_clients < 1:
            raise InputError("a simulation needs clients: pass android=N and/or ios=M")
        if self.min_clients is None:
            self.min_clients = min(2, self.num_clients)
        if not 1 <= self.min_clients <= self.num_clients:
            raise InputError(f"min_clients must be in 1..{self.num_clients} (the fleet), "
                             f"got {self.min_clients!r}")
        partition.parse(self.partition)  # clear errors now, not in every Ray worker
        datasets.parse_name(self.dataset)
        # trace files against this fleet, somebody available at the start: now, not later
        profiles_mod.check(self.profiles, self.num_clients, self.seed)
        if self.secagg is not None:
            self._check_secagg()

    def _check_secagg(self) -> None:
        """SecAgg+ hides each client's update: what needs one cannot run, and a round must
        be able to complete the protocol."""
        from xflwb.federation.policies import ROBUST

        assert self.secagg is not None and self.min_clients is not None
        if self.compression is not None:
            shown = ",".join(f"{k}={v}" for k, v in self.compression.items())
            raise InputError(
                "SecAgg+ masks quantised vectors already; compression "
                f"{shown!r} cannot be combined with it: use compression=None or secagg=None")
        if self.strategy in ROBUST:
            raise InputError(f"strategy {self.strategy!r} needs every client's update, which "
                             "secagg hides; use fedavg or a server optimiser (fedadam, ...)")
        if self.max_update_norm is not None:
            raise InputError("max_update_norm rejects single updates, which secagg hides; "
                             "pass one or the other")
        if self.privacy is not None and not self.privacy.get("client_clipping", True):
            raise InputError("privacy with secagg needs client_clipping: the server cannot "
                             "clip a masked update, the clients clip their own (fl-dp-sa)")
        sampled = min(max(int(self.num_clients * self.fraction_fit), self.min_clients),
                      self.num_clients)
        with _secagg_input():
            secagg_mod.check_fleet(self.secagg, sampled)

    @property
    def num_clients(self) -> int:
        return int(self.android) + int(self.ios)

    def platform_of(self, partition_id: int) -> str:
        return platform_of(partition_id, self.android)

    def check_platforms(self, manifest: dict[str, Any]) -> None:
        """Every platform asked for must have been exported."""
        for plat in PLATFORMS:
            if getattr(self, plat) and plat not in manifest["platforms"]:
                raise InputError(f"{manifest['name']} v{manifest['version']} has no {plat} "
                                 f"artifact; export it with platforms=(…, {plat!r}) or pass "
                                 f"{plat}=0")
