"""One colour per platform everywhere: dashboard, ``xflwb.report``, the demo's plots.

Android green and Apple blue (the platforms' own brand colours), a neutral grey for the
aggregate ("all"), and Keras red for the Keras reference in runtime comparisons.
"""

from __future__ import annotations

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

    fig = plt.figure(figsize=(8.5, 0.9))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="#666666")
    return fig


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    fig, axes = plt.subplots(1, len(shown), figsize=(4.25 * len(shown), 3.0))
    labels = {"eval_loss": LOSS_LABEL, "accuracy": ACCURACY_LABEL, "epsilon": EPSILON_LABEL}
    for metric, ax in zip(shown, axes, strict=True):
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel(labels[metric], fontsize=8)
        if x != "seconds":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        if metric in wide.columns:
            for plat in ("android", "ios", "all"):
                if plat in wide.index.get_level_values("platform"):
                    s = wide.xs(plat, level="platform")[metric].dropna()
                    if x == "seconds":  # rounds without a wall time are not placed
                        s = s[[int(r) in seconds for r in s.index]]
                        s.index = [seconds[int(r)] for r in s.index]
                    if len(s):
                        ax.plot(s.index, s.values, marker="o", label=plat, color=color(plat))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no wall time recorded" if x == "seconds" and not seconds
                    else "not reported yet", ha="center", va="center",
                    transform=ax.transAxes, color="#666666")
    if max_epsilon and "epsilon" in shown:
        budget_line(axes[shown.index("epsilon")], max_epsilon)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def budget_line(ax: Any, max_epsilon: float) -> None:
    """The privacy budget on an ε panel: a dashed red line at ``max_epsilon`` (in the
    legend), with the y axis stretched to show it however little ε is spent so far."""
    ax.axhline(max_epsilon, color=BUDGET_COLOR, linestyle="--", linewidth=1.2,
               label=f"budget (max_epsilon {max_epsilon:g})")
    low, high = ax.get_ylim()
    ax.set_ylim(bottom=min(0.0, low), top=max(high, max_epsilon * 1.08))
    ax.legend(fontsize=8)


#: the budget line's colour (not a platform's)
BUDGET_COLOR = "#cf222e"


def staleness_figure(arrivals: pd.DataFrame, title: str = "", placeholder: str = "") -> Any:
    """FedBuff: a histogram of the staleness of applied updates, stacked per platform in
    its colour, one bar per whole staleness (the caller closes it); a sentence instead
    while no update has been applied. Stale updates are what asynchrony costs: the plot
    shows how far behind the devices train."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig, ax = plt.subplots(figsize=(4.25, 3.0))
    ax.hist([stale[applied["platform"] == p].to_numpy() for p in plats], bins=bins,
            stacked=True, label=plats, color=[color(p) or f"C{i}" for i, p in enumerate(plats)])
    ax.set_xlabel(STALENESS_LABEL)
    ax.set_ylabel("applied updates", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
