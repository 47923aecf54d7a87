"""xflwb: a Jupyter-native workbench for cross-platform (Android + iOS) federated learning.

Public API: ``export``, ``SGD``, ``Adam``, ``Workbench``, ``simulate``, ``Dashboard``,
``report``, the IPython extension hook, and the types they return (``ExportResult``,
``Session``, ``Fleet``) or take (``SessionConfig``, ``SimulationConfig``, ``DeviceOptions``:
each option set declared once), and ``AdminClient`` for a backend in another process.
Heavy libraries (TensorFlow, coremltools) load lazily on first use so ``%load_ext xflwb``
stays quick.
"""

from __future__ import annotations

from typing import Any

# First, before anything can import TensorFlow: importing _quiet sets TF's C++ log level
# (TF reads it once, at import; a level the user set is kept). See xflwb/_quiet.py.
from xflwb import _quiet  # noqa: F401  (isort keeps it first: "xflwb" < "xflwb.bridge")
from xflwb._options import OptionError, UnknownOptionError
from xflwb.admin import AdminClient
from xflwb.bridge.export import DropoutWarning, ExportResult
from xflwb.bridge.graph import ExportError
from xflwb.bridge.health import ExportWarning
from xflwb.bridge.manifest import ManifestError
from xflwb.bridge.optim import SGD, Adam
from xflwb.bridge.parity import ParityError
from xflwb.devices.device import DeviceOptions
from xflwb.devices.fleet import Fleet
from xflwb.exporting import export
from xflwb.federation.dp import DP
from xflwb.server.config import SessionConfig
from xflwb.server.fedbuff import FedBuff
from xflwb.server.session import Session
from xflwb.simulation import simulate
from xflwb.simulation.config import SimulationConfig
from xflwb.simulation.secagg import SecAgg
from xflwb.widgets.dashboard import Dashboard, report
from xflwb.workbench import Workbench

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext xflwb``: register the xflwb magics."""
    from xflwb.magics import register

    register(ipython)


__all__ = [
    "DP",
    "SGD",
    "Adam",
    "AdminClient",
    "Dashboard",
    "DeviceOptions",
    "DropoutWarning",
    "ExportError",
    "ExportResult",
    "ExportWarning",
    "FedBuff",
    "Fleet",
    "ManifestError",
    "OptionError",
    "ParityError",
    "SecAgg",
    "Session",
    "SessionConfig",
    "SimulationConfig",
    "UnknownOptionError",
    "Workbench",
    "__version__",
    "export",
    "load_ipython_extension",
    "report",
    "simulate",
]
