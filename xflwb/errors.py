"""One error tree: every error xflwb raises on purpose derives from ``XflwbError``.

Catch ``xflwb.XflwbError`` to handle anything xflwb refused or could not do, or one of the
categories below to handle one kind. Each category also keeps the builtin base callers
relied on before the tree existed (``ValueError`` for bad input, ``RuntimeError`` for a
failed run, ``TimeoutError`` for a wait), so ``except ValueError`` still works.

The concrete classes live beside the code that raises them (``xflwb.bridge.graph.
ExportError``, ``xflwb.federation.StaleUpdate``, ...) and derive from a category here; this
module imports nothing from xflwb, so every layer can use it.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "DeviceFailure",
    "ExportFailure",
    "InputError",
    "PrivacyError",
    "SessionFailure",
    "UpdateRejected",
    "XflwbError",
]


class XflwbError(Exception):
    """The root: anything xflwb refused or could not do, with the reason and the fix."""


class InputError(XflwbError, ValueError):
    """Bad input from the caller: an option, a command line, a manifest, a data set."""


class ExportFailure(XflwbError):
    """A Keras model could not be exported, or its runtimes disagree (parity)."""


class SessionFailure(XflwbError, RuntimeError):
    """A training session or simulation could not start, run or finish."""


class UpdateRejected(XflwbError, ValueError):
    """One client's update was refused (it costs only that client): malformed, too stale,
    too large, from a revoked device."""


class PrivacyError(XflwbError):
    """The privacy guarantee would be broken: the ε budget is spent, or a lineage mixes
    private and non-private rounds."""


class BackendError(XflwbError, RuntimeError):
    """The backend (registry, HTTP API, admin client, token store) refused a request."""


class DeviceFailure(XflwbError, RuntimeError):
    """A (virtual) device could not run: its model, its data, its connection."""


# Public as ``xflwb.<Name>`` in every process (tracebacks, pickles), also in one that never
# asked the facade for the name (a phone, a session process: see ``xflwb/__init__.py``)
for _cls in (XflwbError, InputError, ExportFailure, SessionFailure, UpdateRejected,
             PrivacyError, BackendError, DeviceFailure):
    _cls.__module__ = "xflwb"
del _cls
