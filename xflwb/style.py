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
_NUMERIC = re.compile(r"[-+]?(\d[\d_,]*)?(\.\d+)?(e[-+]?\d+)?( ?([kMG]?B|s|%))?")


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
