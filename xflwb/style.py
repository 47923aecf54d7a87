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
ACCURACY_LABEL = "accuracy on devices' held-out data"
LOSS_LABEL = "loss on devices' held-out data"
EPSILON_LABEL = "privacy spent ε (at the session's δ)"


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


def plot_figure(history: pd.DataFrame, title: str = "", placeholder: str = "") -> Any:
    """Loss and accuracy per round and platform: the one round plot of the dashboard,
    ``xflwb.report`` and the demo (the caller closes it); before the first round's metrics,
    a picture of ``placeholder`` text instead of empty axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    wide = history_wide(history)
    metrics = [m for m in ("eval_loss", "accuracy") if m in wide.columns]
    if not metrics or wide[metrics].dropna(how="all").empty:
        fig = plt.figure(figsize=(8.5, 0.9))
        fig.text(0.5, 0.5, placeholder or "no round has finished yet: loss and accuracy "
                 "per platform appear here after round 1", ha="center", va="center",
                 fontsize=10, color="#666666")
        return fig
    # a differentially private run also shows its ε ledger, one point per round
    shown = ["eval_loss", "accuracy"] + (["epsilon"] if "epsilon" in wide.columns
                                          and wide["epsilon"].notna().any() else [])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.25 * len(shown), 3.0))
    labels = {"eval_loss": LOSS_LABEL, "accuracy": ACCURACY_LABEL, "epsilon": EPSILON_LABEL}
    for metric, ax in zip(shown, axes, strict=True):
        ax.set_xlabel(ROUND_LABEL)
        ax.set_ylabel(labels[metric], fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        if metric in wide.columns:
            for plat in ("android", "ios", "all"):
                if plat in wide.index.get_level_values("platform"):
                    s = wide.xs(plat, level="platform")[metric].dropna()
                    if len(s):
                        ax.plot(s.index, s.values, marker="o", label=plat, color=color(plat))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not reported yet", ha="center", va="center",
                    transform=ax.transAxes, color="#666666")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
