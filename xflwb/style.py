"""One look everywhere: dashboard, ``xflwb.report``, the export report, the demo's plots.

Android green and Apple blue (the platforms' own brand colours), a neutral grey for the
aggregate ("all"), and Keras red for the Keras reference in runtime comparisons. Every
panel has one size and one font size at any panel count (at most two panels a row, so an
image is never shrunk to fit a notebook), round and version axes tick whole numbers only,
and images are rendered at twice their displayed size (sharp on high-DPI screens). Tables
are styled inline by :func:`table_html` (borders, numbers right-aligned, blank for a
missing value): the same in a widget, where the notebook's table CSS does not reach, and
in a report.
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

PLATFORM_COLORS: dict[str, str] = {
    "android": "#3ddc84",
    "ios": "#147efb",
    "all": "#444444",
    "keras": "#d00000",
}

#: Axis labels shared by the dashboard, the report and the demo plot.
ROUND_LABEL = "round"
VERSION_LABEL = "model version"  # FedBuff: each aggregation makes a version
SECONDS_LABEL = "wall time (s)"
STALENESS_LABEL = "staleness (versions behind)"
#: what ``plot_figure`` can put on its x axis, with the axis label
X_AXES: dict[str, str] = {"round": ROUND_LABEL, "version": VERSION_LABEL,
                          "seconds": SECONDS_LABEL}
ACCURACY_LABEL = "accuracy on devices' held-out data"
LOSS_LABEL = "loss on devices' held-out data"
EPSILON_LABEL = "privacy spent ε (the model lineage's, at the session's δ)"


#: one panel's size (inches) and the one font size (points) of every plot
PANEL_INCHES = (4.0, 3.0)
FONT_SIZE = 9
#: panels per row: two fit a notebook's output area unscaled (2 × 4 in at 96 px/in)
COLUMNS = 2
#: CSS pixels per inch, and image pixels per CSS pixel (2: sharp on high-DPI screens)
CSS_DPI = 96
PNG_SCALE = 2


def color(platform: str) -> str | None:
    """The platform's colour (None: let matplotlib choose, for names we do not know)."""
    return PLATFORM_COLORS.get(platform)


def history_wide(history: pd.DataFrame) -> pd.DataFrame:
    """A session history (round, platform, metric, value) as one row per round and
    platform, one column per metric."""
    if history.empty:
        return history.iloc[0:0, 0:0].copy()  # an empty frame, without importing pandas
    wide = history.pivot_table(index=["round", "platform"], columns="metric",
                               values="value", aggfunc="last")
    wide.columns.name = None  # no stray "metric" header above the columns
    return wide


def _text_figure(text: str) -> Any:
    """A thin picture of one grey sentence: what a plot shows before it has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(PANEL_INCHES[0] * COLUMNS, 0.9))
    fig.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 90)), ha="center", va="center",
             fontsize=FONT_SIZE, color="#666666")
    return fig


def panels(n: int) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels of :data:`PANEL_INCHES` each, :data:`COLUMNS` a row (a
    third panel starts a second row rather than shrinking the first two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, COLUMNS)
    rows = math.ceil(n / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols,
                                                  PANEL_INCHES[1] * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()  # an odd count leaves the last slot empty, at the same panel size
    return fig, axes[:n]


def whole_ticks(axis: Any) -> None:
    """Ticks at whole numbers only, one tick even when the view holds a single round
    (matplotlib's ``integer=True`` alone falls back to fractions below two integers)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def finish_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    """Labels (long ones wrapped to the panel), ticks and legend at :data:`FONT_SIZE`."""
    ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 34)), fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=FONT_SIZE)


def figure_png(fig: Any) -> bytes:
    """``fig`` as PNG bytes at :data:`PNG_SCALE` × its displayed size; closes it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CSS_DPI * PNG_SCALE)
    plt.close(fig)
    return buf.getvalue()


def png_css_width(png: bytes) -> int:
    """The width (CSS pixels) to show a :func:`figure_png` image at: its pixel width (the
    PNG header's) over :data:`PNG_SCALE`."""
    return int.from_bytes(png[16:20], "big") // PNG_SCALE


def img_html(png: bytes, css_class: str = "") -> str:
    """An ``<img>`` of a :func:`figure_png` image, embedded, at its displayed size."""
    import base64

    cls = f" class='{html.escape(css_class)}'" if css_class else ""
    return (f"<img{cls} src='data:image/png;base64,{base64.b64encode(png).decode()}' "
            f"width='{png_css_width(png)}' style='max-width:100%'/>")


def _wall_seconds(wide: pd.DataFrame) -> dict[int, float]:
    """Round (version) → the wall seconds since the session started when it was made (the
    ``all``/``seconds`` metric FedBuff records), for the rounds that have it."""
    if "seconds" not in wide.columns or "all" not in wide.index.get_level_values("platform"):
        return {}
    return {int(k): float(v)
            for k, v in wide.xs("all", level="platform")["seconds"].dropna().items()}


def plot_figure(history: pd.DataFrame, title: str = "", placeholder: str = "",
                x: str | None = None, max_epsilon: float | None = None) -> Any:
    """Loss and accuracy per round and platform: the one round plot of the dashboard,
    ``xflwb.report`` and the demo (the caller closes it); before the first round's metrics,
    a picture of ``placeholder`` text instead of empty axes.

    ``x``: "round", "version" (FedBuff's model versions) or "seconds" (the wall time each
    version was made, for comparing a FedBuff run with a synchronous one); default
    "version" when the history has a ``version`` column, else "round". ``max_epsilon``: a
    DP session's budget, drawn as a line on its ε panel."""
    x = x or ("version" if "version" in history.columns else "round")
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: use one of {sorted(X_AXES)}")
    wide = history_wide(history)
    metrics = [m for m in ("eval_loss", "accuracy") if m in wide.columns]
    if not metrics or wide[metrics].dropna(how="all").empty:
        unit = "version" if x == "version" else "round"
        verb = "has been made" if x == "version" else "has finished"
        return _text_figure(placeholder or f"no {unit} {verb} yet: loss and accuracy per "
                            f"platform appear here after {unit} 1")
    seconds = _wall_seconds(wide) if x == "seconds" else {}
    # a differentially private run also shows its ε ledger, one point per round
    shown = ["eval_loss", "accuracy"] + (["epsilon"] if "epsilon" in wide.columns
                                          and wide["epsilon"].notna().any() else [])
    fig, axes = panels(len(shown))
    labels = {"eval_loss": LOSS_LABEL, "accuracy": ACCURACY_LABEL, "epsilon": EPSILON_LABEL}
    for metric, ax in zip(shown, axes, strict=True):
        if x != "seconds":
            whole_ticks(ax.xaxis)  # rounds and versions are whole
        if metric in wide.columns:
            for plat in ("android", "ios", "all"):
                if plat in wide.index.get_level_values("platform"):
                    s = wide.xs(plat, level="platform")[metric].dropna()
                    if x == "seconds":  # rounds without a wall time are not placed
                        s = s[[int(r) in seconds for r in s.index]]
                        s.index = [seconds[int(r)] for r in s.index]
                    if len(s):
                        ax.plot(s.index, s.values, marker="o", label=plat, color=color(plat))
        finish_axes(ax, X_AXES[x], labels[metric])
        if not ax.lines:
            ax.text(0.5, 0.5, "no wall time recorded" if x == "seconds" and not seconds
                    else "not reported yet", ha="center", va="center",
                    transform=ax.transAxes, color="#666666", fontsize=FONT_SIZE)
    if max_epsilon and "epsilon" in shown:
        budget_line(axes[shown.index("epsilon")], max_epsilon)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE)
    fig.tight_layout()
    return fig


def budget_line(ax: Any, max_epsilon: float) -> None:
    """The privacy budget on an ε panel: a dashed red line at ``max_epsilon`` (in the
    legend), with the y axis stretched to show it however little ε is spent so far."""
    ax.axhline(max_epsilon, color=BUDGET_COLOR, linestyle="--", linewidth=1.2,
               label=f"budget (max_epsilon {max_epsilon:g})")
    low, high = ax.get_ylim()
    ax.set_ylim(bottom=min(0.0, low), top=max(high, max_epsilon * 1.08))
    ax.legend(fontsize=FONT_SIZE)


#: the budget line's colour (not a platform's)
BUDGET_COLOR = "#cf222e"


def staleness_figure(arrivals: pd.DataFrame, title: str = "", placeholder: str = "") -> Any:
    """FedBuff: a histogram of the staleness of applied updates, stacked per platform in
    its colour, one bar per whole staleness (the caller closes it); a sentence instead
    while no update has been applied. Stale updates are what asynchrony costs: the plot
    shows how far behind the devices train."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    applied = (arrivals[arrivals["status"] == "applied"] if len(arrivals)
               else arrivals.iloc[0:0])
    if applied.empty:
        return _text_figure(placeholder or "no update applied yet: the staleness of applied "
                            "updates per platform appears here")
    found = set(applied["platform"])
    plats = [p for p in ("android", "ios") if p in found] + sorted(found - {"android", "ios"})
    stale = applied["staleness"].astype(int)
    bins = np.arange(stale.min(), stale.max() + 2) - 0.5  # one bin per whole staleness
    fig, (ax,) = panels(1)  # the size of every other panel
    ax.hist([stale[applied["platform"] == p].to_numpy() for p in plats], bins=bins,
            stacked=True, label=plats, color=[color(p) or f"C{i}" for i, p in enumerate(plats)])
    whole_ticks(ax.xaxis)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    finish_axes(ax, STALENESS_LABEL, "applied updates")
    if title:
        ax.set_title(title, fontsize=FONT_SIZE)
    fig.tight_layout()
    return fig


# -- bytes on the wire (issue 23) ------------------------------------------------------------
#: the directions a round's bytes travel: "up" (clients' updates), "down" (models sent)
DIRECTIONS = ("up", "down")
#: a ratio this close to 1 is float32 (a .npy header costs a few bytes per tensor)
FLOAT32_TOLERANCE = 0.05
FLOAT32_LEGEND = "dotted: as float32"
BYTES_LABELS = {"up": "bytes sent by clients (updates), cumulative",
                "down": "bytes sent to clients (models), cumulative"}


def human_bytes(n: Any) -> str:
    """``18150`` → ``"18.1 kB"``; decimal units (kB = 1000 B), as the sizes phones show."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    value = float(n)
    if abs(value) < 1000:
        return f"{int(value)} B"
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if abs(value) < 999.95 or unit == "GB":  # 999,999 B is "1.0 MB", not "1000.0 kB"
            return f"{value:.1f} {unit}"
    return f"{value:.1f} GB"  # pragma: no cover - the loop returns at GB


def traffic_frame(history: pd.DataFrame) -> pd.DataFrame:
    """The history's bytes, one row per round (FedBuff: version) and platform: ``bytes_up``,
    ``bytes_down`` and their running totals ``cum_bytes_up`` / ``cum_bytes_down``. Where the
    history records what float32 would have cost (``bytes_up_float32`` /
    ``bytes_down_float32``, issue 23) also those, ``ratio_up`` / ``ratio_down`` = float32 ÷
    actual bytes of the round, and ``cum_ratio_*`` over the rounds so far (only rounds
    that carry both count, so an older history's rounds never dilute a ratio). An older
    history without the float32 metrics gets bytes only; none without bytes at all."""
    wide = history_wide(history)
    if wide.empty or not any(f"bytes_{d}" in wide.columns for d in DIRECTIONS):
        return wide.iloc[0:0, 0:0]
    out = wide[[c for c in wide.columns if c.startswith("bytes_") and c != "bytes_per_update"]
               ].astype(float)
    platforms = out.index.get_level_values("platform")
    for d in DIRECTIONS:
        actual, f32 = f"bytes_{d}", f"bytes_{d}_float32"
        if actual not in out.columns:
            out[actual] = float("nan")
        out[f"cum_{actual}"] = out[actual].fillna(0.0).groupby(level="platform").cumsum()
        if f32 not in out.columns:
            continue
        if "all" in platforms:  # the round's total, when the history only has platforms'
            others = out.loc[platforms != "all", f32].groupby(level="round").sum(min_count=1)
            rounds = out.index.get_level_values("round")
            missing = (platforms == "all") & out[f32].isna().to_numpy()
            out.loc[missing, f32] = others.reindex(rounds[missing]).to_numpy()
        known = out[f32].notna() & out[actual].notna()
        out[f"ratio_{d}"] = (out[f32] / out[actual]).where(known & (out[actual] > 0))
        num = out[f32].where(known, 0.0).groupby(level="platform").cumsum()
        den = out[actual].where(known, 0.0).groupby(level="platform").cumsum()
        seen = known.astype(float).groupby(level="platform").cummax() > 0
        out[f"cum_{f32}"] = num.where(seen)
        out[f"cum_ratio_{d}"] = (num / den).where(den > 0)
    return out


def compression_codecs(history: pd.DataFrame | None = None,
                       config: dict[str, Any] | None = None) -> dict[str, str | None]:
    """The session's codec per direction, for labels only: ``config["compression"]`` (the
    session's ``xflwb.Compression``), else the history's ``compression_up`` /
    ``compression_down`` column (its last value), else None. Clients that did not declare a
    codec still send float32: the ratio, not this name, says what travelled."""
    chosen = (config or {}).get("compression") or {}
    out: dict[str, str | None] = {}
    for d in DIRECTIONS:
        spec = chosen.get(d) if isinstance(chosen, dict) else None
        col = f"compression_{d}"
        if not spec and history is not None and col in history.columns:
            names = history[col].dropna()
            spec = str(names.iloc[-1]) if len(names) else None
        out[d] = str(spec) if spec else None
    return out


def _platform_order(names: Any) -> list[str]:
    found = [str(p) for p in dict.fromkeys(names)]
    known = [p for p in ("android", "ios") if p in found]
    return known + sorted(set(found) - {"android", "ios", "all"}) + (
        ["all"] if "all" in found else [])


def compression_summary(history: pd.DataFrame, config: dict[str, Any] | None = None
                        ) -> pd.DataFrame:
    """One row per platform (android, ios, ..., all) over the session so far: total
    ``bytes_up`` / ``bytes_down``; with the float32 metrics also ``bytes_*_float32`` and
    ``ratio_up`` / ``ratio_down`` (float32 ÷ actual, NaN where nothing was sent); the
    session's codec names ``codec_up`` / ``codec_down`` when known. Empty without bytes."""
    traffic = traffic_frame(history)
    if traffic.empty:
        return _frame([])
    last = traffic.groupby(level="platform", sort=False).tail(1).reset_index("round",
                                                                             drop=True)
    rows = []
    codecs = compression_codecs(history, config)
    for plat in _platform_order(last.index):
        row: dict[str, Any] = {"platform": plat}
        for d in DIRECTIONS:
            row[f"bytes_{d}"] = last.at[plat, f"cum_bytes_{d}"]
        for d in DIRECTIONS:
            if f"cum_ratio_{d}" in last.columns:
                row[f"bytes_{d}_float32"] = last.at[plat, f"cum_bytes_{d}_float32"]
                row[f"ratio_{d}"] = last.at[plat, f"cum_ratio_{d}"]
                row[f"codec_{d}"] = codecs[d]
        rows.append(row)
    return _frame(rows)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A frame of ``rows`` (pandas imported here: ``xflwb.style`` loads without it)."""
    import pandas as pd

    return pd.DataFrame(rows)


def ratio_text(ratio: Any, codec: str | None = None) -> str:
    """A compression ratio (float32 ÷ actual) as a researcher reads it: ``"3.9× smaller
    (int8)"``, ``"1.0× (no saving)"`` (within 5 % of float32: typically clients that did
    not negotiate the codec; the size alone cannot tell which codec travelled), ``"1.3×
    larger (topk:0.5)"``; blank when unknown."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(r) or r <= 0:
        return ""
    if abs(r - 1.0) <= FLOAT32_TOLERANCE:
        return "1.0× (no saving)"
    named = f" ({codec})" if codec and codec != "float32" else ""
    return f"{r:.1f}× smaller{named}" if r > 1 else f"{1 / r:.1f}× larger{named}"


def compression_line(summary: pd.DataFrame) -> str:
    """``compression_summary`` as one line of text: ``"android — up: 3.9× smaller (int8),
    down: 2.0× smaller (fp16) · ios — up: 1.0× (no saving), ..."``; "all" only beside two or
    more platforms. Blank without the float32 metrics (an older history), and for a session
    that compresses nothing (no codec chosen, every ratio 1.0×: nothing to say)."""
    ratios = [f"ratio_{d}" for d in DIRECTIONS if f"ratio_{d}" in summary.columns]
    if summary.empty or not ratios:
        return ""
    named = [c for d in DIRECTIONS for c in summary.get(f"codec_{d}", [])
             if c and c != "float32"]
    import numpy as np

    values = summary[ratios].to_numpy(dtype=float)
    if not named and not (np.abs(values - 1.0) > FLOAT32_TOLERANCE).any():
        return ""
    platforms = [p for p in summary["platform"] if p != "all"]
    parts = []
    for row in summary.to_dict("records"):
        if row["platform"] == "all" and len(platforms) < 2:
            continue
        said = [f"{d}: {text}" for d in DIRECTIONS
                if (text := ratio_text(row.get(f"ratio_{d}"), row.get(f"codec_{d}")))]
        if said:
            parts.append(f"{row['platform']} — {', '.join(said)}")
    return " · ".join(parts)


def traffic_figure(history: pd.DataFrame, placeholder: str = "") -> Any:
    """Cumulative bytes per platform and round (FedBuff: version), one panel per direction
    (up: clients' updates; down: models sent), each platform in its colour; where the
    history has the float32 metrics, what float32 would have cost as a dotted line of the
    same colour: the gap between the two is the compression. A sentence before any bytes."""
    from matplotlib.ticker import FuncFormatter

    traffic = traffic_frame(history)
    if traffic.empty:
        return _text_figure(placeholder or "no round has finished yet: the bytes per "
                            "platform appear here after round 1")
    xlabel = VERSION_LABEL if "version" in history.columns else ROUND_LABEL
    fig, axes = panels(len(DIRECTIONS))
    platforms = _platform_order(traffic.index.get_level_values("platform"))
    for i, (d, ax) in enumerate(zip(DIRECTIONS, axes, strict=True)):
        whole_ticks(ax.xaxis)
        dotted = False
        for plat in platforms:
            rows = traffic.xs(plat, level="platform")
            ax.plot(rows.index, rows[f"cum_bytes_{d}"], marker="o", label=plat,
                    color=color(plat))
            f32 = f"cum_bytes_{d}_float32"
            if f32 in rows.columns and rows[f32].notna().any():  # "_": not in the legend
                ax.plot(rows.index, rows[f32], linestyle=":", color=color(plat),
                        label=f"_{plat} as float32")
                dotted = True
        if dotted:  # one legend entry for every dotted line
            ax.plot([], [], linestyle=":", color="#666666", label=FLOAT32_LEGEND)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
        ax.set_ylim(bottom=0)
        finish_axes(ax, xlabel, BYTES_LABELS[d])
        if i and ax.get_legend() is not None:  # the colours are the first panel's
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def traffic_table(history: pd.DataFrame, config: dict[str, Any] | None = None
                  ) -> pd.DataFrame:
    """``compression_summary`` as a table a researcher reads: bytes in kB/MB, ratios as
    ``"3.9× smaller (int8)"`` (float32 and ratio columns only with the float32 metrics,
    and only when something is compressed: a float32 session shows its bytes alone)."""
    summary = compression_summary(history, config)
    if summary.empty:
        return summary
    compared = bool(compression_line(summary))
    out = _frame([])
    out["platform"] = summary["platform"]
    names = {"bytes_up": "bytes up", "bytes_down": "bytes down"}
    if compared:
        names.update(bytes_up_float32="up as float32", bytes_down_float32="down as float32")
    for col, name in names.items():
        if col in summary.columns:
            out[name] = summary[col].map(human_bytes)
    for d in DIRECTIONS if compared else ():
        if f"ratio_{d}" in summary.columns:
            out[f"{d} vs float32"] = [ratio_text(r, c) for r, c in
                                      zip(summary[f"ratio_{d}"], summary[f"codec_{d}"],
                                          strict=True)]
    return out


def compression_html(history: pd.DataFrame, config: dict[str, Any] | None = None) -> str:
    """``compression_line`` as a line of HTML (class ``xflwb-compression``), or nothing
    (no float32 metrics: an older history, or no round yet)."""
    line = compression_line(compression_summary(history, config))
    return (f"<div class='xflwb-compression'><b>compression vs float32:</b> "
            f"{html.escape(line)}</div>" if line else "")


def traffic_html(history: pd.DataFrame, config: dict[str, Any] | None = None,
                 line: bool = True) -> str:
    """The bytes panel of the dashboard and the reports: the compression line (``line``;
    the dashboard shows it in its header instead), the totals per platform and the
    cumulative plot (embedded PNG); nothing before any bytes."""
    table = traffic_table(history, config)
    if table.empty:
        return ""
    said = compression_html(history, config) if line else ""
    return (f"<div class='xflwb-traffic'><h5 style='margin:8px 0 2px'>bytes on the wire "
            f"(totals so far)</h5>{said}{table_html(table)}"
            f"{img_html(figure_png(traffic_figure(history)), 'xflwb-traffic-plot')}</div>")


# -- tables ------------------------------------------------------------------------------------
#: the table look, scoped to its class: a ``<style>`` travels with every table because a
#: widget's HTML gets none of the notebook's table CSS (cells ran together: "finished 0")
TABLE_CSS = (
    "<style>table.xflwb-table{border-collapse:collapse;margin:2px 0;font-size:0.92em}"
    "table.xflwb-table th,table.xflwb-table td{border:1px solid #d0d7de;padding:2px 8px;"
    "text-align:left;vertical-align:top}"
    "table.xflwb-table th{background:#f6f8fa;font-weight:600}"
    "table.xflwb-table .num{text-align:right;font-variant-numeric:tabular-nums}</style>")
#: a number as a table shows it: 12, -0.5, 1.2e-05, 18.1 kB, 0.53 s, 5%
_NUMERIC = re.compile(r"[-+]?(\d[\d_,]*)?(\.\d+)?(e[-+]?\d+)?( ?([kMG]?B|s|%|×))?")


def cell_text(v: Any) -> str:
    """A cell's text: blank for a missing value (None, NaN, NaT, pd.NA), counts as
    integers, other numbers to 4 significant digits."""
    if v is None or (not isinstance(v, str | bytes | list | tuple | dict) and _isna(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | float) or type(v).__module__ == "numpy":
        try:
            f = float(v)
        except (TypeError, ValueError):
            return str(v)
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.4g}"
    return str(v)


def _isna(v: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):  # arrays and other containers are not missing
        return False


def table_html(df: pd.DataFrame, fmt: Any = cell_text, escape: bool = True) -> str:
    """``df`` as an HTML table with :data:`TABLE_CSS` (borders, padding, a shaded header;
    columns of numbers right-aligned as ``class='num'``, text left): the one table look of
    the dashboard widgets, ``xflwb.report`` and the export report. ``fmt`` turns a value
    into its text (a missing value: blank, never NaN/None); ``escape=False`` when the
    cells are HTML already."""
    columns = [str(c) for c in df.columns]
    cells = [[fmt(v) for v in row] for row in df.itertuples(index=False, name=None)]
    num = [" class='num'" if any(r[j] for r in cells) and all(
        not r[j] or _NUMERIC.fullmatch(r[j]) for r in cells) else ""
        for j in range(len(columns))]
    head = "".join(f"<th{num[j]}>{html.escape(c)}</th>" for j, c in enumerate(columns))
    body = "".join("<tr>" + "".join(f"<td{num[j]}>{html.escape(text) if escape else text}</td>"
                                    for j, text in enumerate(row)) + "</tr>" for row in cells)
    return (f"{TABLE_CSS}<table class='xflwb-table'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")
