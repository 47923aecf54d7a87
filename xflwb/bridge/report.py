"""The export report: layer support, parameter layouts, file sizes and parity, as HTML.

It renders a bridge object (``ExportResult``) with pandas, so it lives in the bridge:
``ExportResult._repr_html_`` uses it without importing the widgets.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from xflwb.bridge import params


def parameter_table(manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per canonical parameter: shape and layout on each platform."""
    ios = manifest["platforms"].get("ios")
    by_canon: dict[int, dict[str, Any]] = {}
    if ios:
        for e in ios["coreml_layers"]:
            if e.get("canonical") is not None:
                by_canon[e["canonical"]] = e
    rows = []
    ios_mask = params.trained_mask(manifest, "ios") if ios else None
    for i, p in enumerate(manifest["parameters"]):
        e = by_canon.get(i)
        rows.append({
            "index": i, "name": p["name"], "canonical_shape": str(tuple(p["shape"])),
            "android": (f"a{i} {tuple(p['shape'])}" if "android" in manifest["platforms"]
                        else "-"),
            "ios": (f"{e['name']}.{e['type']} {tuple(e['shape'])} [{e['layout']}]" if e
                    else "baked (not exchanged)" if ios else "-"),
            "trained_on_ios": (bool(ios_mask[i]) if ios_mask is not None else None),
            "elements": int(np.prod(p["shape"])),
        })
    return pd.DataFrame(rows)


def update_bytes(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes of parameters one update carries per platform (raw float32 on the wire)."""
    out = {}
    for plat in manifest["platforms"]:
        shapes = params.platform_shapes(manifest, plat)
        out[plat] = int(sum(int(np.prod(s)) for s in shapes) * 4)
    return out


def file_table(res: Any) -> pd.DataFrame:
    rows = []
    for plat, entry in res.manifest["platforms"].items():
        rows.append({"platform": plat, "file": entry["file"], "bytes": entry["bytes"],
                     "sha256": entry["sha256"][:16] + "…"})
    return pd.DataFrame(rows)


def _cell(v: Any) -> str:
    """Floats to 3 significant digits, the rest as every xflwb table shows it."""
    from xflwb.style import cell_text

    return (f"{v:.3g}" if isinstance(v, float) and v == v and not v.is_integer()  # not NaN
            else cell_text(v))


def _table(df: pd.DataFrame) -> str:
    from xflwb.style import table_html  # the dashboard's table look (borders, alignment)

    return table_html(df, _cell)


def export_report_html(res: Any) -> str:
    ok = bool(res.parity["ok"].all()) if len(res.parity) else True
    status = ("<span style='color:#1a7f37'>parity ok</span>" if ok
              else "<span style='color:#cf222e'>parity FAILED</span>")
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in res.warnings)
    frozen = res.manifest.get("frozen", {})
    sizes = ", ".join(f"{p} {b:,} B" for p, b in update_bytes(res.manifest).items())
    return (
        "<div class='xflwb-report'>"
        f"<h4>xflwb export: {html.escape(res.name)} v{res.version} — {status}</h4>"
        f"<p>data type <code>{html.escape(str(res.manifest['data_type']))}</code>, loss "
        f"<code>{res.manifest['loss']}</code>, optimizer "
        f"<code>{html.escape(str(res.manifest['optimizer']))}</code>, "
        f"{res.seconds:.1f} s, in <code>{html.escape(str(res.directory))}</code></p>"
        + (f"<ul>{warn}</ul>" if warn else "")
        + f"<p>frozen weights sha256 <code>{html.escape(str(frozen.get('sha256', ''))[:16])}"
        f"…</code> ({frozen.get('elements', 0):,} values baked into both artifacts); bytes "
        f"per update: {html.escape(sizes)}; iOS training: "
        f"<code>{html.escape(str(res.manifest.get('ios_training', 'auto')))}</code></p>"
        + "<h5>Trainability plan (layer × platform)</h5>" + _table(res.layers)
        + "<h5>Parameters</h5>" + _table(parameter_table(res.manifest))
        + "<h5>Files</h5>" + _table(file_table(res))
        + "<h5>Parity</h5>" + _table(res.parity)
        + "</div>")
