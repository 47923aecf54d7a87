"""``xflwb.export``: the bridge's export, plus the check only the public layer can make.

The bridge knows nothing of datasets (it imports no engine), so whether ``data_type`` names
a registered dataset the model cannot train on is checked here, one layer up. A data type of
the user's own (not a registered dataset's name) is not checked.
"""

from __future__ import annotations

import functools
from typing import Any

from xflwb.bridge.export import ExportResult, build_export, issue
from xflwb.bridge.export import export as bridge_export
from xflwb.bridge.health import ExportWarning
from xflwb.bridge.manifest import Manifest


def data_type_warning(manifest: Manifest) -> str | None:
    """Why the registered dataset ``manifest["data_type"]`` names cannot train this model
    (shape, dtype or classes), else None (also for a data type that is no dataset)."""
    from xflwb.devices.datasets import IncompatibleData, check_compatible, parse_name

    data_type = str(manifest.get("data_type"))
    try:
        parse_name(data_type)
    except ValueError:
        return None  # the user's own data type: their phones bring the data
    try:
        check_compatible(manifest, data_type)
    except IncompatibleData as exc:
        return (f"data_type {data_type!r} is a registered dataset this model cannot train "
                f"on: {exc}; devices spawned on it will be refused (a data type of your own, "
                "e.g. data_type='my-data', is not checked)")
    return None


@functools.wraps(bridge_export)
def export(model: Any, name: str, **options: Any) -> ExportResult:
    res, pending = build_export(model, name, **options)
    msg = data_type_warning(res.manifest)
    if msg:
        pending.append((ExportWarning, msg))
        res.warnings.append(msg)
    issue(pending, stacklevel=2)  # the caller of xflwb.export
    return res
