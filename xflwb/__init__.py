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
Heavy libraries (TensorFlow, coremltools) load lazily on first use so ``%load_ext xflwb``
stays quick.
"""

from __future__ import annotations

from typing import Any

# First, before anything can import TensorFlow: importing _quiet sets TF's C++ log level
# (TF reads it once, at import; a level the user set is kept). See xflwb/_quiet.py.
from xflwb import _quiet  # noqa: F401  (isort keeps it first: "xflwb" < "xflwb.bridge")
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

# Public classes live in ``xflwb`` as far as users see: ``repr``, tracebacks (``xflwb.ExportError``)
# and pickles name ``xflwb.<Name>``, which resolves to the same object, so configs still pickle
# (multiprocessing, Ray). Annotations resolve where they were written (``_options.type_hints``).
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
