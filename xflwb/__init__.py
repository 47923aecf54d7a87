"""xflwb: a Jupyter-native workbench for cross-platform (Android + iOS) federated learning.

Public API: ``export``, ``SGD``, ``Adam``, ``Workbench``, ``simulate``, ``Dashboard``,
``report``, the IPython extension hook, and the types they return (``ExportResult``,
``Session``, ``Fleet``) or take (``SessionConfig``, ``SimulationConfig``, ``DeviceOptions``,
``DP``, ``FedBuff``, ``SecAgg``, ``Compression``, ``DeviceProfiles``: each option set
declared once), and ``AdminClient`` for a backend in another process.
What notebooks need around them: ``load_dataset`` (the offline datasets), ``demo_model``
(the demo CNN), ``partition_table`` (how a dataset splits across devices), ``load_runtime``
(run an export as a phone would), ``make_dev_ca`` (development TLS) and
``PLATFORM_COLORS``. ``__all__`` is the whole public surface: shipped notebooks, docs and
the README use nothing else (``tests/test_public_surface.py``), and public classes say
``xflwb`` as their ``__module__`` (their pickles name ``xflwb.<Name>``, which resolves).
Each public name is imported on first use (PEP 562), so ``import xflwb`` and
``%load_ext xflwb`` stay quick, and a process that uses one part of xflwb loads only that part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# First, before anything can import TensorFlow: importing _quiet sets TF's C++ log level
# (TF reads it once, at import; a level the user set is kept). See xflwb/_quiet.py.
from xflwb import _quiet  # noqa: F401  (before any TensorFlow import)

# The public names, for readers and type checkers. At run time each is imported on first use
# (``__getattr__``, PEP 562) from the module these lines name: ``import xflwb`` costs little,
# and a process that uses one part of xflwb (a virtual phone, a Ray worker, a session
# process: a test run starts hundreds) loads only that part.
if TYPE_CHECKING:
    from xflwb._models import demo_model
    from xflwb._options import OptionError, UnknownOptionError
    from xflwb.admin import AdminClient
    from xflwb.bridge.export import DropoutWarning, ExportResult
    from xflwb.bridge.graph import ExportError
    from xflwb.bridge.health import ExportWarning
    from xflwb.bridge.manifest import ManifestError
    from xflwb.bridge.optim import SGD, Adam
    from xflwb.bridge.parity import ParityError
    from xflwb.bridge.runtime import load as load_runtime
    from xflwb.devices.datasets import load as load_dataset
    from xflwb.devices.device import DeviceOptions
    from xflwb.devices.fleet import Fleet
    from xflwb.devices.partition import partition_table
    from xflwb.errors import (
        BackendError,
        DeviceFailure,
        ExportFailure,
        InputError,
        PrivacyError,
        SessionFailure,
        UpdateRejected,
        XflwbError,
    )
    from xflwb.exporting import export
    from xflwb.federation.compression import Compression
    from xflwb.federation.dp import DP
    from xflwb.federation.fedbuff import FedBuff
    from xflwb.federation.profiles import DeviceProfiles
    from xflwb.server.config import SessionConfig
    from xflwb.server.security import make_dev_ca
    from xflwb.sessions.handle import Session
    from xflwb.simulation import simulate
    from xflwb.simulation.config import SimulationConfig
    from xflwb.simulation.secagg import SecAgg
    from xflwb.style import PLATFORM_COLORS
    from xflwb.widgets.dashboard import Dashboard, report
    from xflwb.workbench import Workbench


def _public_table() -> dict[str, tuple[str, str]]:
    """``name: (module, attribute)`` for each public name, read from the ``TYPE_CHECKING``
    imports above (declared once; the file is parsed once, on the first lazy name)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    return {alias.asname or alias.name: (node.module, alias.name) for node in block.body
            if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}


_PUBLIC: dict[str, tuple[str, str]] = {}

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext xflwb``: register the xflwb magics."""
    from xflwb.magics import register

    register(ipython)


__all__ = [
    "DP",
    "PLATFORM_COLORS",
    "SGD",
    "Adam",
    "AdminClient",
    "BackendError",
    "Compression",
    "Dashboard",
    "DeviceFailure",
    "DeviceOptions",
    "DeviceProfiles",
    "DropoutWarning",
    "ExportError",
    "ExportFailure",
    "ExportResult",
    "ExportWarning",
    "FedBuff",
    "Fleet",
    "InputError",
    "ManifestError",
    "OptionError",
    "ParityError",
    "PrivacyError",
    "SecAgg",
    "Session",
    "SessionConfig",
    "SessionFailure",
    "SimulationConfig",
    "UnknownOptionError",
    "UpdateRejected",
    "Workbench",
    "XflwbError",
    "__version__",
    "demo_model",
    "export",
    "load_dataset",
    "load_ipython_extension",
    "load_runtime",
    "make_dev_ca",
    "partition_table",
    "report",
    "simulate",
]


def __getattr__(name: str) -> Any:
    """A public name, imported on first use. Public classes live in ``xflwb`` as far as users
    see: ``repr``, tracebacks (``xflwb.ExportError``) and pickles name ``xflwb.<Name>``, which
    resolves here to the same object, so configs still pickle (multiprocessing, Ray).
    Annotations resolve where they were written (``_options.type_hints``)."""
    if not _PUBLIC:
        _PUBLIC.update(_public_table())
    import importlib

    try:
        module, attribute = _PUBLIC[name]
    except KeyError:
        import importlib.util

        # a submodule (``xflwb.workbench``), found as when every name was imported eagerly
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'xflwb' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    if isinstance(value, type):
        value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
