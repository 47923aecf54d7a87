"""Import a module of a package whose ``__init__`` costs seconds the module does not need.

Three packages load far more than a phone, a Ray worker or a session process uses, in
every such process (a test run starts hundreds):

- ``import tensorflow`` loads the whole Python API (about 5 s of CPU) where a virtual
  Android phone needs only TFLite's interpreter and the TensorFlow kernels its Flex delegate
  runs (0.4 s);
- ``import flwr_datasets`` loads its plots (seaborn, scipy.stats: about 1.2 s) where
  partitioning (a fleet, a simulation's driver) needs only ``flwr_datasets.partitioner``;
- ``flwr.simulation``'s ``__init__`` loads the Simulation Engine's server side (SuperLink
  state, SQLAlchemy, Alembic: about 0.8 s) where a Ray worker needs only the actor class.

None offers a lighter entry point (``tflite_runtime`` and LiteRT lack the Flex delegate),
so `skipping_package_init` imports the module with a bare package object standing in for
the package while it loads: the other packages' ``__init__`` files run as usual, only that
one is skipped. The stand-in is removed afterwards, so a later ``import tensorflow``
runs the real ``__init__`` and finds the very same modules (``tf.lite.Interpreter`` is the
class loaded here). When the package is imported already, this is a plain import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_lock = threading.Lock()


def skipping_package_init(module: str, *first: str, package: str | None = None
                          ) -> types.ModuleType:
    """``import module`` (after the modules ``first``), without running the ``__init__`` of
    ``package`` (its top-level package unless named) unless that package is imported
    already."""
    package = package or module.partition(".")[0]
    if not module.startswith(package + "."):
        raise ValueError(f"{module!r} is not inside the package {package!r}")
    with _lock:
        if module in sys.modules:
            return sys.modules[module]
        if package in sys.modules:
            for name in first:
                importlib.import_module(name)
            return importlib.import_module(module)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)
        bare = types.ModuleType(package)
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__spec__ = spec
        sys.modules[package] = bare
        try:
            for name in first:
                importlib.import_module(name)
            return importlib.import_module(module)
        finally:
            if sys.modules.get(package) is bare:
                del sys.modules[package]
