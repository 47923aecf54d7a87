"""The live dashboard: per-platform loss/accuracy curves, round progress, bytes, rejections,
devices. It observes a session (and optionally a fleet) and computes nothing of its own:
every number comes from ``session.history`` / ``fleet.table``.

Updates run on a background thread and only assign widget values (HTML, Image,
IntProgress): no ``Output`` widget capture from threads, which is what breaks in
ipywidgets issues 3260 / 4020. ``report(session)`` renders the same content as static
HTML + PNG, so headless runs (papermill, nbconvert, nbval) keep the final plot and table.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from typing import Any

import pandas as pd

PLATFORMS = ("android", "ios", "all")
COLORS = {"android": "#3ddc84", "ios": "#147efb", "all": "#444444"}


def _wide(history: pd.DataFrame) -> pd.DataFrame:
    if history.empty:
        return pd.DataFrame()
    return history.pivot_table(index=["round", "platform"], columns="metric",
                               values="value", aggfunc="last")


def plot_png(history: pd.DataFrame, title: str = "") -> bytes:
    """Loss and accuracy per round and platform, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = _wide(history)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.0))
    for metric, ax in zip(("eval_loss", "accuracy"), axes, strict=True):
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("round")
        if metric in wide.columns:
            for plat in PLATFORMS:
                if plat in wide.index.get_level_values("platform"):
                    s = wide.xs(plat, level="platform")[metric].dropna()
                    if len(s):
                        ax.plot(s.index, s.values, marker="o", label=plat, color=COLORS[plat])
            if ax.lines:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def round_table(history: pd.DataFrame) -> pd.DataFrame:
    """Last round per platform: clients, examples, loss, accuracy, bytes, rejected."""
    wide = _wide(history)
    if wide.empty:
        return pd.DataFrame()
    last = wide.index.get_level_values("round").max()
    cols = [c for c in ("clients", "examples", "eval_loss", "accuracy", "bytes_up",
                        "bytes_down", "rejected", "fit_seconds") if c in wide.columns]
    return wide.xs(last, level="round")[cols].reset_index()


def _table_html(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "<i>no data yet</i>"
    return df.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}")


def where(info: dict[str, Any]) -> str:
    """Where the clients are: phone ports, or the simulated fleet."""
    cfg = info["config"]
    if cfg.get("engine") == "simulation":
        cluster = cfg.get("ray_address") or "local Ray"
        return (f"simulated {cfg['android']} Android + {cfg['ios']} iOS clients "
                f"({html.escape(str(cluster))})")
    return f"ports {info['ports']}"


def snapshot_html(session: Any, fleet: Any = None) -> str:
    """Static HTML of the dashboard (plot embedded as PNG)."""
    info = session.info
    hist = session.history
    png = base64.b64encode(plot_png(hist)).decode()
    rej = session.rejections
    parts = [
        f"<h4>session {info['id']} — {html.escape(info['model_name'])}: {info['status']}, "
        f"round {info['round']}/{info['config']['rounds']}, {where(info)}</h4>",
        f"<img src='data:image/png;base64,{png}'/>",
        "<h5>last round per platform</h5>", _table_html(round_table(hist)),
    ]
    if len(rej):
        parts += ["<h5>rejected updates</h5>", _table_html(rej)]
    if fleet is not None:
        parts += ["<h5>devices</h5>", _table_html(fleet.table.drop(columns=["error"]))]
    return "<div class='xflwb-dashboard'>" + "".join(parts) + "</div>"


class Report:
    """``report(session)``: the final dashboard as static HTML (survives headless runs)."""

    def __init__(self, session: Any, fleet: Any = None) -> None:
        self._html = snapshot_html(session, fleet)

    def _repr_html_(self) -> str:
        return self._html


def report(session: Any, fleet: Any = None) -> Report:
    return Report(session, fleet)


class Dashboard:
    """A live ipywidgets view of one session; ``display(dash)`` or return it from a cell."""

    def __init__(self, session: Any, fleet: Any = None, interval: float = 1.0) -> None:
        import ipywidgets as w

        self.session = session
        self.fleet = fleet
        self.interval = interval
        rounds = int(session.info["config"]["rounds"])
        self.header = w.HTML()
        self.progress = w.IntProgress(value=0, min=0, max=rounds, description="rounds",
                                      bar_style="info")
        self.plot = w.Image(format="png")
        self.table = w.HTML()
        self.devices = w.HTML()
        self.rejected = w.HTML()
        self.widget = w.VBox([self.header, self.progress, self.plot, self.table,
                              self.rejected, self.devices])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()

    def refresh(self) -> str:
        """Pull the latest state into the widgets; returns the session status."""
        info = self.session.info
        hist = self.session.history
        self.header.value = (f"<b>session {info['id']}</b> — {html.escape(info['model_name'])}"
                             f": <b>{info['status']}</b>, {where(info)}")
        self.progress.value = min(int(info["round"]), self.progress.max)
        if info["status"] == "finished":
            self.progress.bar_style = "success"
        elif info["status"] in ("failed", "crashed", "stopped"):
            self.progress.bar_style = "danger"
        self.plot.value = plot_png(hist)
        self.table.value = "<b>last round per platform</b>" + _table_html(round_table(hist))
        rej = self.session.rejections
        self.rejected.value = ("" if rej.empty else
                               "<b>rejected updates</b>" + _table_html(rej.tail(10)))
        if self.fleet is not None:
            self.devices.value = "<b>devices</b>" + _table_html(
                self.fleet.table.drop(columns=["error"]))
        return info["status"]

    def _loop(self) -> None:
        from xflwb.server.session import DONE

        last_round = -1
        while not self._stop.wait(self.interval):
            try:
                rnd = self.session.round
                status = self.session.status
                if rnd != last_round or status in DONE:
                    self.refresh()
                    last_round = rnd
                if status in DONE:
                    break
            except Exception:
                break

    def start(self) -> Dashboard:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="xflwb-dashboard",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
