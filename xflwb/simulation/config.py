"""What one simulation needs, validated up front and stored as JSON in the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLATFORMS = ("android", "ios")


def platform_of(partition_id: int, android: int) -> str:
    """Clients ``0..android-1`` are Android, the rest iOS (``wb.spawn_devices``' order)."""
    return "android" if partition_id < android else "ios"


@dataclass
class SimulationConfig:
    """A simulated fleet: ``android`` + ``ios`` clients on partitions of one dataset.

    Clients ``0 .. android-1`` are Android and the rest iOS, on partitions in that order —
    the same pairing as ``wb.spawn_devices(android=…, ios=…)``, so a simulation and a
    process fleet with the same seed train on the same data.
    """

    engine: str = "simulation"  # marks the registry row: phones never join it
    android: int = 0
    ios: int = 0
    dataset: str = "digits"
    partition: str = "iid"
    rounds: int = 10
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    fraction_fit: float = 1.0
    fraction_evaluate: float | None = None  # None: same as fraction_fit
    min_clients: int | None = None  # None: 2, or the fleet if smaller
    local_epochs: int = 1
    seed: int = 0
    test_fraction: float = 0.2
    #: chance that a sampled client drops out of a fit (seeded per client and attempt):
    #: a failure for that round, as a phone that loses its connection is
    drop_prob: float = 0.0
    backend_config: dict[str, Any] | None = None
    ray_address: str | None = None
    round_timeout: float = 3600.0
    #: server threads with a message in flight (Flower's default of 6 would leave the
    #: actors idle while replies are polled)
    max_workers: int = 256

    def __post_init__(self) -> None:
        from xflwb.devices import datasets, partition
        from xflwb.flower_legacy import SERVER_STRATEGIES

        if self.engine != "simulation":
            raise ValueError(f"engine must be 'simulation', got {self.engine!r}")
        for name in ("android", "ios"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.num_clients < 1:
            raise ValueError("a simulation needs clients: pass android=N and/or ios=M")
        for name in ("rounds", "local_epochs", "max_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.fraction_evaluate is None:
            self.fraction_evaluate = self.fraction_fit
        for name in ("fraction_fit", "fraction_evaluate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.fraction_fit == 0:
            raise ValueError("fraction_fit=0 would train nobody; use a value in (0, 1]")
        if self.min_clients is None:
            self.min_clients = min(2, self.num_clients)
        if (isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int)
                or not 1 <= self.min_clients <= self.num_clients):
            raise ValueError(f"min_clients must be in 1..{self.num_clients} (the fleet), "
                             f"got {self.min_clients!r}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if (isinstance(self.drop_prob, bool) or not isinstance(self.drop_prob, int | float)
                or not 0 <= self.drop_prob < 1):
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if str(self.strategy).lower() not in SERVER_STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of "
                             f"{sorted(SERVER_STRATEGIES)}")
        self.strategy = str(self.strategy).lower()
        if self.backend_config is not None and not isinstance(self.backend_config, dict):
            raise ValueError("backend_config must be a dict like "
                             "{'client_resources': {'num_cpus': 1, 'num_gpus': 0.0}}")
        partition.parse(self.partition)  # clear errors now, not in every Ray worker
        datasets.parse_name(self.dataset)

    @property
    def num_clients(self) -> int:
        return int(self.android) + int(self.ios)

    def platform_of(self, partition_id: int) -> str:
        return platform_of(partition_id, self.android)

    def check_platforms(self, manifest: dict[str, Any]) -> None:
        """Every platform asked for must have been exported."""
        for plat in PLATFORMS:
            if getattr(self, plat) and plat not in manifest["platforms"]:
                raise ValueError(f"{manifest['name']} v{manifest['version']} has no {plat} "
                                 f"artifact; export it with platforms=(…, {plat!r}) or pass "
                                 f"{plat}=0")
