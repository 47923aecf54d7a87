"""Core ML's protobuf classes without importing the ``coremltools`` package.

``import coremltools`` pulls in TensorFlow, Keras, scikit-learn and sympy (~5 s, ~500 MiB):
too much for a virtual iPhone process that only needs to parse a ``.mlmodel``. The generated
``*_pb2`` modules inside ``coremltools/proto`` only import each other, so we load that folder
as a package of its own. If ``coremltools.proto`` is already imported (the exporter used it),
that one is reused, so one process never holds two copies of the descriptors.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_PACKAGE = "xflwb._coremltools_proto"


def model_pb2() -> Any:
    """The ``Model_pb2`` module (``Model`` is the top-level message of a ``.mlmodel``)."""
    if "coremltools.proto.Model_pb2" in sys.modules:
        return sys.modules["coremltools.proto.Model_pb2"]
    if f"{_PACKAGE}.Model_pb2" not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("coremltools is not installed")
        folder = Path(next(iter(spec.submodule_search_locations))) / "proto"
        pkg = types.ModuleType(_PACKAGE)
        pkg.__path__ = [str(folder)]  # relative imports between the pb2 files resolve here
        sys.modules[_PACKAGE] = pkg
    return importlib.import_module(f"{_PACKAGE}.Model_pb2")


def load_spec(path: str | Path) -> Any:
    """Parse a ``.mlmodel`` file into a ``Model`` message."""
    spec = model_pb2().Model()
    spec.ParseFromString(Path(path).read_bytes())
    return spec
