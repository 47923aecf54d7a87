"""Keras → phone formats and back. Imports none of the server/devices/widgets packages."""

from xflwb.bridge.export import DropoutWarning, ExportResult, export
from xflwb.bridge.graph import ExportError
from xflwb.bridge.health import ExportWarning
from xflwb.bridge.optim import SGD, Adam
from xflwb.bridge.parity import ParityError

__all__ = ["SGD", "Adam", "DropoutWarning", "ExportError", "ExportResult",
           "ExportWarning", "ParityError",
           "export"]
