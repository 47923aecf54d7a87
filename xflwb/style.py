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
SIM_LABEL = "simulated time ({unit})"  # the virtual clock of a simulation (issue 24)
X_AXES: dict[str, str] = {"round": ROUND_LABEL, "version": VERSION_LABEL,
                          "seconds": SECONDS_LABEL, "sim": SIM_LABEL}
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


def sim_seconds(history: pd.DataFrame) -> dict[int, float]:
    """Round (version) → the simulated seconds on the virtual clock at its end (the
    ``all``/``sim_seconds`` metric of a simulation), for the rounds that have it; empty for
    phone sessions and older simulations."""
    if history.empty or "sim_seconds" not in set(history["metric"]):
        return {}
    rows = history[(history["metric"] == "sim_seconds") & (history["platform"] == "all")]
    rows = rows.dropna(subset=["value"]).drop_duplicates("round", keep="last")
    return {int(r): float(v) for r, v in zip(rows["round"], rows["value"], strict=True)}


def sim_unit(seconds: float) -> tuple[float, str]:
    """The unit simulated time reads best in: (seconds per unit, its name) — hours beyond
    two hours, minutes beyond two minutes, else seconds."""
    if seconds > 7200:
        return 3600.0, "h"
    if seconds > 120:
        return 60.0, "min"
    return 1.0, "s"


def sim_label(seconds: float) -> str:
    """The simulated-time axis label in the unit :func:`sim_unit` picks for ``seconds``."""
    return SIM_LABEL.format(unit=sim_unit(seconds)[1])


def default_x(history: pd.DataFrame) -> str:
    """What a static view plots against: simulated time when the history has it (a
    simulation's virtual clock: the time a fleet of phones would take), else the model
    version (FedBuff) or the round."""
    if sim_seconds(history):
        return "sim"
    return "version" if "version" in history.columns else "round"


def time_to_accuracy(history: pd.DataFrame, target: float, platform: str = "all"
                     ) -> float | None:
    """Simulated seconds until ``platform``'s accuracy first reached ``target``: the
    virtual clock at the end of the first round (version) whose accuracy is at least
    ``target``; None when it never did or the history has no simulated time. What the
    time-to-accuracy comparisons (sync with a deadline vs FedBuff) rank runs by."""
    times = sim_seconds(history)
    if not times:
        return None
    acc = history[(history["metric"] == "accuracy") & (history["platform"] == platform)]
    acc = acc.dropna(subset=["value"]).sort_values("round", kind="stable")
    reached = [int(r) for r, v in zip(acc["round"], acc["value"], strict=True)
               if v >= target and int(r) in times]
    return times[reached[0]] if reached else None


def _extrapolated(v: Any, xp: Any, fp: Any) -> Any:
    """``np.interp``, continued beyond both ends along the end segments: the axes' margins
    lie outside the data, and a clamped map would squeeze the top axis out of line."""
    import numpy as np

    v = np.asarray(v, dtype=float)
    out = np.interp(v, xp, fp)
    lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.where(v < xp[0], fp[0] + (v - xp[0]) * lo,
                    np.where(v > xp[-1], fp[-1] + (v - xp[-1]) * hi, out))


def _step_axis(ax: Any, times: dict[int, float], scale: float, label: str) -> None:
    """A top axis of rounds (versions) over a simulated-time panel: which round ended
    when, read off the same plot (only where time strictly increases with the round)."""
    import numpy as np

    steps = np.array(sorted(times), dtype=float)
    at = np.array([times[int(r)] / scale for r in steps])
    if len(steps) < 2 or not (np.diff(at) > 0).all():
        return
    top = ax.secondary_xaxis("top", functions=(lambda t: _extrapolated(t, at, steps),
                                               lambda r: _extrapolated(r, steps, at)))
    whole_ticks(top.xaxis)
    top.set_xlabel(label, fontsize=FONT_SIZE)
    top.tick_params(labelsize=FONT_SIZE)


def plot_figure(history: pd.DataFrame, title: str = "", placeholder: str = "",
                x: str | None = None, max_epsilon: float | None = None) -> Any:
    """Loss and accuracy per round and platform: the one round plot of the dashboard,
    ``xflwb.report`` and the demo (the caller closes it); before the first round's metrics,
    a picture of ``placeholder`` text instead of empty axes.

    ``x``: "round", "version" (FedBuff's model versions), "seconds" (the wall time each
    version was made, for comparing a FedBuff run with a synchronous one) or "sim" (a
    simulation's simulated time, in hours, minutes or seconds as fits, with the rounds on
    a top axis); default "version" when the history has a ``version`` column, else
    "round". ``max_epsilon``: a DP session's budget, drawn as a line on its ε panel."""
    x = x or ("version" if "version" in history.columns else "round")
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: use one of {sorted(X_AXES)}")
    step = "version" if "version" in history.columns else "round"
    wide = history_wide(history)
    metrics = [m for m in ("eval_loss", "accuracy") if m in wide.columns]
    if not metrics or wide[metrics].dropna(how="all").empty:
        unit = "version" if x == "version" or (x == "sim" and step == "version") else "round"
        verb = "has been made" if unit == "version" else "has finished"
        return _text_figure(placeholder or f"no {unit} {verb} yet: loss and accuracy per "
                            f"platform appear here after {unit} 1")
    seconds = (_wall_seconds(wide) if x == "seconds" else
               sim_seconds(history) if x == "sim" else {})
    scale, xlabel = 1.0, X_AXES[x]
    if x == "sim":
        scale = sim_unit(max(seconds.values(), default=0.0))[0]
        xlabel = sim_label(max(seconds.values(), default=0.0))
    # a differentially private run also shows its ε ledger, one point per round
    shown = ["eval_loss", "accuracy"] + (["epsilon"] if "epsilon" in wide.columns
                                          and wide["epsilon"].notna().any() else [])
    fig, axes = panels(len(shown))
    labels = {"eval_loss": LOSS_LABEL, "accuracy": ACCURACY_LABEL, "epsilon": EPSILON_LABEL}
    for metric, ax in zip(shown, axes, strict=True):
        if x not in ("seconds", "sim"):
            whole_ticks(ax.xaxis)  # rounds and versions are whole
        if metric in wide.columns:
            for plat in ("android", "ios", "all"):
                if plat in wide.index.get_level_values("platform"):
                    s = wide.xs(plat, level="platform")[metric].dropna()
                    if seconds or x in ("seconds", "sim"):  # rounds without a time: unplaced
                        s = s[[int(r) in seconds for r in s.index]]
                        s.index = [seconds[int(r)] / scale for r in s.index]
                    if len(s):
                        ax.plot(s.index, s.values, marker="o", label=plat, color=color(plat))
        finish_axes(ax, xlabel, labels[metric])
        if x == "sim" and ax.lines:
            _step_axis(ax, seconds, scale, X_AXES[step])
        if not ax.lines:
            none = {"seconds": "no wall time recorded", "sim": "no simulated time recorded"}
            ax.text(0.5, 0.5, none[x] if x in none and not seconds else "not reported yet",
                    ha="center", va="center", transform=ax.transAxes, color="#666666",
                    fontsize=FONT_SIZE)
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


# -- participation and fairness (issue 24) ---------------------------------------------------
#: per round and platform, what the virtual clock's round rules count: eligible clients
#: (``available``), chosen (``selected``, over-selection included), aggregated
#: (``clients``: kept), and the rest (``stragglers``: past the deadline or after enough
#: reported; ``dropouts``: became unavailable mid-fit)
PARTICIPATION = ("available", "selected", "clients", "stragglers", "dropouts")
#: what only the virtual clock records: without any of them nothing is shown
_PARTICIPATION_SIGNS = ("available", "selected", "stragglers", "dropouts")


def participation_frame(history: pd.DataFrame) -> pd.DataFrame:
    """The participation counts one row per round (FedBuff: version) and platform, the
    :data:`PARTICIPATION` columns the history has; "all" is the platforms' sum where the
    history does not record it. Empty without any virtual-clock count (a phone session, an
    older simulation)."""
    wide = history_wide(history)
    if wide.empty or not any(c in wide.columns for c in _PARTICIPATION_SIGNS):
        return wide.iloc[0:0, 0:0]
    out = wide[[c for c in PARTICIPATION if c in wide.columns]].astype(float)
    platforms = out.index.get_level_values("platform")
    rounds = out.index.get_level_values("round")
    others = out[platforms != "all"].groupby(level="round").sum(min_count=1)
    missing_all = sorted(set(rounds) - set(rounds[platforms == "all"]))
    if missing_all and (platforms != "all").any():  # no "all" row at all for some rounds
        import pandas as pd

        extra = others.reindex(missing_all)
        extra.index = pd.MultiIndex.from_arrays(
            [extra.index, ["all"] * len(extra)], names=["round", "platform"])
        out = pd.concat([out, extra]).sort_index()
        platforms = out.index.get_level_values("platform")
        rounds = out.index.get_level_values("round")
    for col in out.columns:  # an "all" row without this count: the platforms' sum
        gap = (platforms == "all") & out[col].isna().to_numpy()
        out.loc[gap, col] = others[col].reindex(rounds[gap]).to_numpy()
    return out


def participation_table(history: pd.DataFrame) -> pd.DataFrame:
    """Participation per platform over the session so far: rounds (versions) counted,
    ``selected``, ``kept`` (aggregated), ``stragglers``, ``dropouts`` (totals), ``kept
    share`` (kept ÷ selected) and ``available`` (mean eligible per round); the columns the
    history has. Empty without virtual-clock counts."""
    frame = participation_frame(history)
    if frame.empty:
        return _frame([])
    rows = []
    for plat in _platform_order(frame.index.get_level_values("platform")):
        part = frame.xs(plat, level="platform")
        row: dict[str, Any] = {"platform": plat, "rounds": len(part)}
        for col, name in (("selected", "selected"), ("clients", "kept"),
                          ("stragglers", "stragglers"), ("dropouts", "dropouts")):
            if col in part.columns:
                row[name] = part[col].sum(min_count=1)
        if "selected" in part.columns and "clients" in part.columns:
            sel, kept = part["selected"].sum(), part["clients"].sum()
            row["kept share"] = f"{kept / sel:.0%}" if sel > 0 else None
        if "available" in part.columns:
            row["available (mean per round)"] = part["available"].mean()
        rows.append(row)
    return _frame(rows)


def participation_html(history: pd.DataFrame, step: str = "round") -> str:
    """The participation panel (class ``xflwb-participation``): :func:`participation_table`
    under its heading; nothing without virtual-clock counts (old sessions render as
    before)."""
    table = participation_table(history)
    if table.empty:
        return ""
    table = table.rename(columns={"rounds": f"{step}s"})
    return (f"<div class='xflwb-participation'><h5 style='margin:8px 0 2px'>participation "
            f"per platform (totals so far)</h5>{table_html(table)}</div>")


#: the history's per-platform accuracy percentiles over the clients that evaluated
#: (metric → legend label, line style), drawn best to worst
QUANTILES: dict[str, tuple[str, Any]] = {
    "accuracy_p90": ("p90", ":"), "accuracy_p50": ("median", "-"),
    "accuracy_p10": ("p10", "--"), "accuracy_worst10": ("worst 10 %", "-.")}
CLIENT_ACCURACY_LABEL = "client accuracy (held-out data)"


def ecdf(values: Any) -> tuple[Any, Any]:
    """The empirical CDF of ``values`` (NaN dropped): sorted values and the share of
    values at or below each, ``i / n``."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = np.sort(v[~np.isnan(v)])
    return v, np.arange(1, len(v) + 1) / len(v) if len(v) else np.zeros(0)


def last_client_accuracies(client_metrics: pd.DataFrame | None
                           ) -> tuple[int | None, pd.DataFrame]:
    """The last round (FedBuff: version) in which a client reported an accuracy, and that
    round's rows that have one (clients without an accuracy are skipped)."""
    if client_metrics is None or len(client_metrics) == 0 or not {
            "round", "platform", "accuracy"} <= set(client_metrics.columns):
        return None, (client_metrics.iloc[0:0] if client_metrics is not None else _frame([]))
    rated = client_metrics[client_metrics["accuracy"].notna()]
    if rated.empty:
        return None, rated
    last = int(rated["round"].max())
    return last, rated[rated["round"] == last]


def _quantile_frame(history: pd.DataFrame) -> pd.DataFrame:
    wide = history_wide(history)
    cols = [c for c in (*QUANTILES, "eval_clients") if c in wide.columns]
    if wide.empty or not any(c in QUANTILES for c in cols):
        return wide.iloc[0:0, 0:0]
    return wide[cols].astype(float).dropna(how="all")


def fairness_figure(history: pd.DataFrame, client_metrics: pd.DataFrame | None = None
                    ) -> Any:
    """Accuracy across clients, not only the weighted mean (the caller closes it; None
    without data): the ECDF of the last evaluated round's client accuracies per platform
    (from ``session.client_metrics``), then per platform the p90 / median / p10 / worst-10 %
    accuracy over rounds (the history's ``accuracy_p10`` ...), p10–p90 shaded."""
    last, rows = last_client_accuracies(client_metrics)
    quant = _quantile_frame(history)
    plats = (_platform_order(quant.index.get_level_values("platform"))
             if not quant.empty else [])
    n = (last is not None) + len(plats)
    if not n:
        return None
    step = VERSION_LABEL if "version" in history.columns else ROUND_LABEL
    fig, axes = panels(n)
    if last is not None:
        ax = axes.pop(0)
        found = _platform_order(rows["platform"])
        shown = found + (["all"] if len(found) > 1 and "all" not in found else [])
        for plat in shown:
            acc = rows["accuracy"] if plat == "all" else rows.loc[rows["platform"] == plat,
                                                                   "accuracy"]
            xs, ys = ecdf(acc)
            ax.step(xs, ys, where="post", label=f"{plat} ({len(xs)})", color=color(plat))
        ax.set_ylim(0, 1.02)
        finish_axes(ax, f"{CLIENT_ACCURACY_LABEL[:-1]}, {step} {last})",
                    "share of clients ≤ x")
    for i, (plat, ax) in enumerate(zip(plats, axes, strict=True)):
        part = quant.xs(plat, level="platform")
        whole_ticks(ax.xaxis)
        for metric, (label, style_) in QUANTILES.items():
            if metric in part.columns and part[metric].notna().any():
                s = part[metric].dropna()
                ax.plot(s.index, s.values, linestyle=style_, marker=".", color=color(plat),
                        label=label)
        if {"accuracy_p10", "accuracy_p90"} <= set(part.columns):
            band = part[["accuracy_p10", "accuracy_p90"]].dropna()
            ax.fill_between(band.index, band["accuracy_p10"], band["accuracy_p90"],
                            color=color(plat) or "#888888", alpha=0.15, linewidth=0)
        ax.set_title(f"{plat}: accuracy across clients", fontsize=FONT_SIZE)
        finish_axes(ax, step, CLIENT_ACCURACY_LABEL)
        if i and ax.get_legend() is not None:  # the line styles are the first panel's
            ax.get_legend().remove()
        elif ax.get_legend() is not None:  # in grey: it explains styles, not colours
            from matplotlib.lines import Line2D

            ax.legend(handles=[Line2D([], [], color="#666666", linestyle=ls, label=label)
                               for metric, (label, ls) in QUANTILES.items()
                               if metric in part.columns], fontsize=FONT_SIZE)
    if plats:  # one accuracy scale: platforms compare at a glance
        low = min(ax.get_ylim()[0] for ax in axes)
        high = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(low, high)
    fig.tight_layout()
    return fig


def fairness_table(history: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated round's accuracy across clients per platform: clients evaluated,
    worst 10 %, p10, median, p90 (the columns the history has); empty without them."""
    quant = _quantile_frame(history)
    if quant.empty:
        return _frame([])
    rows = []
    for plat in _platform_order(quant.index.get_level_values("platform")):
        part = quant.xs(plat, level="platform").dropna(
            how="all", subset=[c for c in QUANTILES if c in quant.columns])
        if part.empty:
            continue
        last = part.iloc[-1]
        row: dict[str, Any] = {"platform": plat, "round": int(part.index[-1])}
        if "eval_clients" in part.columns:
            row["clients evaluated"] = last["eval_clients"]
        for metric in ("accuracy_worst10", "accuracy_p10", "accuracy_p50", "accuracy_p90"):
            if metric in part.columns:
                row[QUANTILES[metric][0]] = last[metric]
        rows.append(row)
    return _frame(rows)


def fairness_html(history: pd.DataFrame, client_metrics: pd.DataFrame | None = None) -> str:
    """The fairness panel (class ``xflwb-fairness``): the last evaluated round's percentiles
    per platform and :func:`fairness_figure` (embedded PNG); nothing without per-client
    evaluations (old sessions render as before)."""
    fig = fairness_figure(history, client_metrics)
    if fig is None:
        return ""
    table = fairness_table(history)
    if "version" in history.columns and not table.empty:
        table = table.rename(columns={"round": "version"})
    said = table_html(table) if not table.empty else ""
    return (f"<div class='xflwb-fairness'><h5 style='margin:8px 0 2px'>accuracy across "
            f"clients</h5>{said}{img_html(figure_png(fig), 'xflwb-fairness-plot')}</div>")
