"""Imported at start-up by every Python process a test run starts (the root ``conftest.py``
puts this folder first on ``PYTHONPATH``): session processes, the Ray head and its workers,
benchmark scripts, notebook kernels. Not part of xflwb; a user's processes never see it.

Why: ``jsonschema``, which Ray imports in every Ray process and driver, imports the optional
``rfc3987_syntax`` when it is installed (Jupyter's ``jsonschema[format-nongpl]`` installs
it), and that import builds an Earley parser from the RFC 3987 grammar: 1.4 s of CPU per
process, about 200 processes per ``make test`` (~5 CPU-minutes on 2 cores). Nothing in
xflwb or its tests validates an IRI. Here the module is a stand-in whose functions load the
real one on first use, so a validation that does happen behaves exactly as before; only the
parser is not built in the processes that never need it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

_NAME = "rfc3987_syntax"


class _Deferred(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``rfc3987_syntax`` first and loads the stand-in, until ``_real`` turns it off."""

    active = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _NAME or not self.active:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        def is_valid_syntax(*args: Any, **kwargs: Any) -> Any:
            return _real().is_valid_syntax(*args, **kwargs)

        module.__deferred__ = True
        module.is_valid_syntax = is_valid_syntax
        module.__getattr__ = _attribute


def _attribute(name: str) -> Any:
    """Any other public name loads the real module; dunder lookups (``__path__``, which
    every ``from … import`` asks for) do not."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_real(), name)


_FINDER = _Deferred()


def _real() -> Any:
    """The real module, imported now (once) in place of the stand-in."""
    module = sys.modules.get(_NAME)
    if module is not None and not getattr(module, "__deferred__", False):
        return module
    _FINDER.active = False
    sys.modules.pop(_NAME, None)
    return importlib.import_module(_NAME)


# only where the real module is installed: elsewhere the import must keep failing
if importlib.util.find_spec(_NAME) is not None:
    sys.meta_path.insert(0, _FINDER)
