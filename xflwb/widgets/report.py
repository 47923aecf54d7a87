"""The export report, re-exported: it renders a bridge object, so it lives in the bridge.

Kept so ``from xflwb.widgets.report import ...`` (older notebooks) keeps working; new code
imports ``xflwb.bridge.report``.
"""

from __future__ import annotations

from xflwb.bridge.report import export_report_html, file_table, parameter_table, update_bytes

__all__ = ["export_report_html", "file_table", "parameter_table", "update_bytes"]
