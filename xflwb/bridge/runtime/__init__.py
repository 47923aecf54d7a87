"""Executors of exported artifacts: what a phone runs, runnable here.

``load(manifest_or_path, platform)`` picks the runtime from a small registry; ``keras`` is
the reference, ``android`` runs the ``.tflite`` in TF's interpreter, ``ios`` runs the
``.mlmodel`` in xflwb's numpy Core ML executor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xflwb.bridge import manifest as _manifest
from xflwb.bridge.manifest import Manifest
from xflwb.bridge.runtime.base import Runtime, epoch_batches, loss_value


def _android(m: Manifest, **kw: Any) -> Runtime:
    from xflwb.bridge.runtime.tflite import AndroidRuntime

    return AndroidRuntime(m, _manifest.artifact_path(m, "android"), **kw)


def _ios(m: Manifest, **kw: Any) -> Runtime:
    from xflwb.bridge.runtime.coreml import IOSRuntime

    return IOSRuntime(m, _manifest.artifact_path(m, "ios"), **kw)


def _keras(m: Manifest, **kw: Any) -> Runtime:
    from xflwb.bridge.runtime.keras import KerasRuntime

    return KerasRuntime(m, _manifest.artifact_path(m, "keras"), **kw)


RUNTIMES: dict[str, Callable[..., Runtime]] = {"android": _android, "ios": _ios,
                                               "keras": _keras}


def load(manifest_or_path: Any, platform: str, **options: Any) -> Runtime:
    """A runtime for ``platform`` from a manifest dict, a manifest path, an export directory
    or an ``ExportResult``."""
    if platform not in RUNTIMES:
        raise ValueError(f"unknown runtime {platform!r}; use one of {sorted(RUNTIMES)}")
    m = manifest_or_path
    if hasattr(m, "manifest") and not isinstance(m, dict):
        m = m.manifest
    if isinstance(m, str | Path):
        m = _manifest.load(m)
    if not isinstance(m, dict):
        raise TypeError(f"expected a manifest dict, path or ExportResult, got {type(m).__name__}")
    return RUNTIMES[platform](m, **options)


__all__ = ["RUNTIMES", "Runtime", "epoch_batches", "load", "loss_value"]
