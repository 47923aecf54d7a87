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
from xflwb.bridge.manifest import CoreMLLayer, Manifest


def parameter_table(manifest: Manifest) -> pd.DataFrame:
    """One row per canonical parameter: shape and layout on each platform."""
    ios = manifest["platforms"].get("ios")
    by_canon: dict[int, CoreMLLayer] = {}
    if ios:
        for entry in ios["coreml_layers"]:
            idx = entry.get("canonical")
            if idx is not None:
                by_canon[idx] = entry
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


def update_bytes(manifest: Manifest) -> dict[str, int]:
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


def _table(df: pd.DataFrame, escape: bool = True) -> str:
    """The dashboard's table look (borders, alignment); ``escape=False``: the cells are
    HTML already (the plan's collapsed frozen blocks)."""
    from xflwb.style import table_html

    return table_html(df, _cell, escape=escape)


#: runs of frozen (and weightless) layers shorter than this keep their own rows
MIN_BLOCK = 3


def frozen_blocks(layers: pd.DataFrame) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of ``layers`` to show as one row each: maximal runs of
    frozen or weightless layers holding at least one frozen layer, without the weightless
    tail that follows the last frozen layer's nesting (a pooling layer of the head)."""
    if "frozen" not in layers.columns or not len(layers):
        return []
    frozen = layers["frozen"].astype(bool).tolist()
    weightless = (layers["params"] == 0).tolist()
    names = layers["layer"].astype(str).tolist()
    blocks, i = [], 0
    while i < len(frozen):
        if not (frozen[i] or weightless[i]):
            i += 1
            continue
        j = i
        while j < len(frozen) and (frozen[j] or weightless[j]):
            j += 1
        hits = [k for k in range(i, j) if frozen[k]]
        if hits:
            scope = names[hits[-1]].rpartition("/")[0]
            stop = hits[-1] + 1
            while stop < j and scope and names[stop].rpartition("/")[0] == scope:
                stop += 1
            if stop - i >= MIN_BLOCK:
                blocks.append((i, stop))
        i = j
    return blocks


def _block_name(names: list[str]) -> str:
    tops = {n.split("/")[0] for n in names if "/" in n}
    if len(tops) == 1:
        return f"{tops.pop()} backbone"
    return f"{names[0]} … {names[-1]}"


def plan_html(layers: pd.DataFrame) -> str:
    """The trainability plan with each frozen block as one expandable row."""
    blocks = {start: stop for start, stop in frozen_blocks(layers)}
    shown = layers.drop(columns=["frozen"], errors="ignore")
    cols = list(shown.columns)
    rows: list[dict[str, str]] = []
    i = 0
    while i < len(shown):
        if i not in blocks:
            rows.append({c: html.escape(str(v)) for c, v in shown.iloc[i].items()})
            i += 1
            continue
        part = layers.iloc[i:blocks[i]]
        names = part["layer"].astype(str).tolist()
        kinds = part["type"].value_counts()
        total = int(part["params"].sum())
        detail = ", ".join(f"{k} ×{v}" for k, v in kinds.items())
        row = {c: "" for c in cols}
        row["layer"] = (f"<details><summary>{html.escape(_block_name(names))}: {len(names)} "
                        f"layers, {total:,} parameters frozen</summary>"
                        f"{html.escape(detail)}; {html.escape(names[0])} … "
                        f"{html.escape(names[-1])} (every row: <code>res.layers</code>)"
                        "</details>")
        row["type"] = "frozen block"
        row["output_shape"] = html.escape(str(part["output_shape"].iloc[-1]))
        row["params"] = f"{total:,}"
        for p in cols:
            if p in ("android", "ios"):
                row[p] = "frozen"
                if f"{p}_why" in cols:
                    row[f"{p}_why"] = "baked into the artifact"
        rows.append(row)
        i = blocks[i]
    return _table(pd.DataFrame(rows, columns=cols), escape=False)


def _frozen_line(manifest: Manifest) -> str:
    """The frozen weights' digest, only when something is frozen (else it would be the
    SHA-256 of nothing)."""
    frozen = manifest.get("frozen", {})
    if not frozen.get("elements"):
        return ""
    return (f"frozen weights sha256 <code>{html.escape(str(frozen.get('sha256', ''))[:16])}"
            f"…</code> ({frozen['elements']:,} values baked into both artifacts); ")


def export_report_html(res: Any) -> str:
    ok = bool(res.parity["ok"].all()) if len(res.parity) else True
    status = ("<span style='color:#1a7f37'>parity ok</span>" if ok
              else "<span style='color:#cf222e'>parity FAILED</span>")
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in res.warnings)
    sizes = ", ".join(f"{p} {b:,} B" for p, b in update_bytes(res.manifest).items())
    return (
        "<div class='xflwb-report'>"
        f"<h4>xflwb export: {html.escape(res.name)} v{res.version} — {status}</h4>"
        f"<p>data type <code>{html.escape(str(res.manifest['data_type']))}</code>, loss "
        f"<code>{res.manifest['loss']}</code>, optimizer "
        f"<code>{html.escape(str(res.manifest['optimizer']))}</code>, "
        f"{res.seconds:.1f} s, in <code>{html.escape(str(res.directory))}</code></p>"
        + (f"<ul>{warn}</ul>" if warn else "")
        + f"<p>{_frozen_line(res.manifest)}bytes per update: {html.escape(sizes)}; iOS "
        f"training: <code>{html.escape(str(res.manifest.get('ios_training', 'auto')))}"
        "</code></p>"
        + "<h5>Trainability plan (layer × platform)</h5>" + plan_html(res.layers)
        + "<h5>Parameters</h5>" + _table(parameter_table(res.manifest))
        + "<h5>Files</h5>" + _table(file_table(res))
        + "<h5>Parity</h5>" + _table(res.parity)
        + "</div>")
