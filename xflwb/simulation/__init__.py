"""Thousands of virtual phones on Flower's Simulation Engine (Ray).

``xflwb.simulate(...)`` runs the exported artifacts — the TFLite interpreter for Android
clients, the Core ML executor for iOS clients — as Flower ``ClientApp`` clients, served by
the same ``CrossPlatformStrategy`` and ``StreamingFedAvg`` as phones. It returns the same
``Session`` handle as ``wb.train``: ``history``, ``global_parameters()``, ``wait()``,
``stop()``, and a live ``Dashboard``.

Nothing is cached here: ``wb.simulate`` runs on the Workbench's own session manager (stopped
and closed by ``wb.stop()``); ``xflwb.simulate`` without a Workbench gives its handle a
manager of its own, closed when the simulation ends, the handle is closed or dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xflwb import _options
from xflwb.errors import SessionFailure
from xflwb.simulation.config import SimulationConfig


class _OwnManager:
    """A registry + session manager made on first use for one ``xflwb.simulate`` call
    (none when the options are refused: bad ones create no directory)."""

    def __init__(self, data_dir: str | os.PathLike[str], db_url: str | None) -> None:
        self.data_dir, self.db_url = data_dir, db_url
        self.manager: Any = None

    def __call__(self) -> Any:
        if self.manager is None:
            from xflwb.sessions.manager import SessionManager
            from xflwb.sessions.registry import Registry

            self.manager = SessionManager(Registry(self.data_dir, self.db_url))
        return self.manager

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def _check_export(name_or_export: Any, cfg: SimulationConfig) -> None:
    """An export (or export directory) lacking a platform or unable to train on the
    dataset is refused before it is published; a registry name is checked by
    ``start_on``."""
    from xflwb.bridge import manifest as manifest_mod
    from xflwb.devices.datasets import check_compatible

    found = getattr(name_or_export, "manifest", None)
    if found is None and not isinstance(name_or_export, str | os.PathLike):
        return
    if found is None and Path(name_or_export).exists():
        try:
            found = manifest_mod.load(name_or_export)
        except (OSError, ValueError):
            return  # publishing says what is wrong with it
    if found is not None:
        cfg.check_platforms(found)
        check_compatible(found, cfg.dataset)


def start_on(manager: Any, model_name: str, cfg: SimulationConfig,
             wait_ready: float = 120.0) -> Any:
    """Run the published ``model_name`` on Flower's Simulation Engine as a session of the
    ``SessionManager`` ``manager`` (its process runs ``xflwb.simulation.server``); the
    model is checked against ``cfg`` before any process starts."""
    from xflwb.devices.datasets import check_compatible

    model = manager.registry.latest_model(model_name)
    cfg.check_platforms(model["manifest"])
    check_compatible(model["manifest"], cfg.dataset)  # before any process starts
    # stored as it is (its JSON): the one validation was the caller's SimulationConfig
    return manager.start_engine(model, cfg, "xflwb.simulation.server", wait_ready)


def start(get_manager: Callable[[], Any], name_or_export: Any, *, wait: bool,
          timeout: float | None, progress: bool = True, **options: Any) -> Any:
    """Start a simulation on the ``SessionManager`` ``get_manager()`` gives; optionally wait
    (with a tqdm bar of rounds unless ``progress=False``).

    The options are validated first: bad ones publish nothing and create no directory."""
    from xflwb import _console

    _options.unknown(SimulationConfig, options, "simulate")
    cfg = SimulationConfig(**options)
    _check_export(name_or_export, cfg)
    manager = get_manager()
    name = manager.registry.resolve(name_or_export)
    session = start_on(manager, name, cfg)
    if wait:
        status = _console.wait(session, cfg.rounds, timeout=timeout, progress=progress)
        if status != "finished":
            info = session.info
            raise SessionFailure(f"simulation {session.id} {status}: {info.get('error') or ''}"
                                 f" (log: {manager.log_dir / f'session-{session.id}.log'})")
    return session


@_options.generated(SimulationConfig)
def simulate(name_or_export: Any, *, data_dir: str | os.PathLike[str] = "xfl-data",
             db_url: str | None = None, wait: bool = True, timeout: float | None = None,
             progress: bool = True, **options: Any) -> Any:
    """Federated training of an export on a simulated fleet; returns a ``Session``.

    Clients ``0..android-1`` run the ``.tflite`` in TF's interpreter, the next ``ios`` run
    the ``.mlmodel`` in xflwb's Core ML executor, each on its partition of ``dataset``.
    Each round samples ``fraction_fit`` of the fleet (at least ``min_clients``) and
    evaluates ``fraction_evaluate``. A sampled client drops out of a fit with probability
    ``drop_prob`` (seeded; counted in the round's ``failures``). ``compression``
    (``xflwb.Compression(up="int8", down="fp16")``) applies to every simulated client: they
    are xflwb's own and speak every codec, so none is negotiated down to float32.

    ``ray_address`` (``"auto"``, ``"ray://host:10001"``) attaches to a running Ray cluster
    whose nodes have xflwb installed; the artifacts travel through Ray's object store.
    Without it Ray starts locally with this machine's CPUs. ``backend_config`` is Flower's
    (``{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}`` by default; its
    ``init_args`` go to ``ray.init``).

    ``wait=True`` (default) blocks until the end with a round progress bar (``progress``)
    and raises if the simulation failed; ``wait=False`` returns the running ``Session`` at
    once (the simulation runs in its own process). The registry lives in ``data_dir``
    (``db_url``: another SQLAlchemy database); the returned handle owns its connection,
    released once the simulation ended (``wait``, ``stop()``), by ``close()`` or when the
    handle is dropped.
    """
    from xflwb.sessions.handle import Session

    own = _OwnManager(data_dir, db_url)
    try:
        session = start(own, name_or_export, wait=wait, timeout=timeout, progress=progress,
                        **options)
    except BaseException:
        own.close()  # no handle to own it: the database is released here
        raise
    # the handle owns the manager (stop() and crash detection need its process)
    handle = Session(own.manager, session.id, owns_manager=True)
    if wait:
        handle.close()  # it ended: the handle stays readable, holding nothing open
    return handle


__all__ = ["SimulationConfig", "simulate"]
