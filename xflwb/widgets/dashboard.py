"""The live dashboard: per-platform loss/accuracy curves, round progress, bytes (with the
compression ratio against float32: header line, round table, a cumulative bytes panel),
failures, rejections, devices; for a simulation on the virtual clock also the curves
against simulated time, participation per platform (selected, kept, stragglers, drop-outs)
and accuracy across clients (an ECDF and percentiles over rounds). It observes a session
(and optionally a fleet) and computes nothing of its own: every number comes from
``session.history`` / ``session.failures`` / ``session.client_metrics`` / ``fleet.table``.

Updates run on a background thread and only assign widget values (HTML, Image,
IntProgress): no ``Output`` widget capture from threads, which is what breaks in
ipywidgets issues 3260 / 4020. The header, progress, failures and device table refresh
every ``interval`` seconds; the plots and tables of rounds and bytes only when the history
changes (a PNG costs ~0.1 s). ``report(session)`` renders the same content as static HTML + PNG, so
headless runs (papermill, nbconvert, nbval) keep the final plot and table. A FedBuff
session counts model versions instead of rounds and adds the staleness histogram of its
applied updates (``session.arrivals``).
"""

from __future__ import annotations

import dataclasses
import html
import threading
from typing import Any

import pandas as pd

from xflwb._dp_guidance import noise_warning
from xflwb.federation.fedbuff import FedBuff
from xflwb.sessions.options import is_asynchronous
from xflwb.style import (
    PLATFORM_COLORS,
    cell_text,
    compression_html,
    default_x,
    fairness_html,
    figure_png,
    history_wide,
    human_bytes,
    img_html,
    participation_frame,
    participation_html,
    plot_figure,
    png_css_width,
    sim_seconds,
    staleness_figure,
    table_html,
    traffic_frame,
    traffic_html,
)

PLATFORMS = ("android", "ios", "all")
COLORS = PLATFORM_COLORS  # the one colour map of dashboard, report and demo (xflwb.style)
ENDED_BADLY = ("failed", "crashed", "stopped")
#: how many recent failed fits / rejections the views list
RECENT = 10


# -- formatting --------------------------------------------------------------------------
def _number(v: Any) -> str:
    """Counts as integers, other numbers to 4 significant digits, missing as blank."""
    return cell_text(v)


def plot_png(history: pd.DataFrame, title: str = "", placeholder: str = "",
             x: str | None = None, max_epsilon: float | None = None) -> bytes:
    """Loss and accuracy per round (``x``: or version, or wall seconds) and platform, as
    PNG bytes (twice the displayed size: ``xflwb.style.png_css_width``); before the first
    round's metrics, a picture of ``placeholder`` text. A DP session's ε panel draws its
    budget ``max_epsilon``."""
    return figure_png(plot_figure(history, title, placeholder, x=x, max_epsilon=max_epsilon))


def max_epsilon(info: dict[str, Any]) -> float | None:
    """The session's privacy budget (``DP.max_epsilon``), or None."""
    privacy = (info.get("config") or {}).get("privacy") or {}
    cap = privacy.get("max_epsilon")
    return float(cap) if cap else None


def staleness_png(arrivals: pd.DataFrame) -> bytes:
    """FedBuff: the histogram of applied updates' staleness per platform, as PNG bytes."""
    return figure_png(staleness_figure(arrivals))


def round_table(history: pd.DataFrame) -> pd.DataFrame:
    """Last round per platform: clients, the virtual clock's selected / stragglers /
    dropouts / available (a simulation's; "all" sums the platforms), failures, examples,
    loss, accuracy, bytes, the round's compression ratios (float32 ÷ actual, when the
    history has them), rejected, fit seconds (raw numbers; ``round_table_html`` formats
    them)."""
    wide = history_wide(history)
    if wide.empty:
        return pd.DataFrame()
    last = wide.index.get_level_values("round").max()
    traffic = traffic_frame(history)  # the ratios: only with the float32 metrics (issue 23)
    for d in ("up", "down"):
        if f"ratio_{d}" in traffic.columns:
            wide[f"ratio_{d}"] = traffic[f"ratio_{d}"].reindex(wide.index)
    counted = participation_frame(history)  # "all": the platforms' sum when not recorded
    for col in ("selected", "stragglers", "dropouts", "available"):
        if col in counted.columns:
            wide[col] = counted[col].reindex(wide.index)
    cols = [c for c in ("clients", "selected", "stragglers", "dropouts", "available",
                        "failures", "examples", "eval_loss", "accuracy",
                        "bytes_up", "bytes_down", "ratio_up", "ratio_down", "rejected",
                        "fit_seconds")
            if c in wide.columns]
    return wide.xs(last, level="round")[cols].reset_index()


def _last_round(history: pd.DataFrame) -> int | None:
    return None if history.empty else int(history["round"].max())


def round_table_html(history: pd.DataFrame) -> str:
    """The last round's table, human-readable: bytes in kB/MB, counts as integers."""
    df = round_table(history)
    if df.empty:
        return _table_html(df)
    out = pd.DataFrame({"platform": df["platform"]})
    for col in ("clients", "selected", "stragglers", "dropouts", "failures",
                "rejected"):  # a platform without any: no row
        if col in df.columns:
            df[col] = df[col].fillna(0)
    for col in df.columns[1:]:
        if col.startswith("bytes"):
            out[col.replace("_", " ")] = df[col].map(human_bytes)
        elif col.startswith("ratio_"):  # float32 ÷ actual bytes of the round
            out[f"{col[6:]} vs float32"] = df[col].map(
                lambda v: "" if pd.isna(v) else f"{v:.1f}×")
        elif col == "fit_seconds":
            out["fit s"] = df[col].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        else:
            out[col.replace("_", " ")] = df[col].map(_number)
    return _table_html(out)


def _table_html(df: pd.DataFrame | None, empty: str = "no data yet") -> str:
    if df is None or df.empty:
        return f"<p><i>{html.escape(empty)}</i></p>"
    return table_html(df)


def _section(title: str, body: str) -> str:
    return f"<h5 style='margin:8px 0 2px'>{html.escape(title)}</h5>{body}"


def fedbuff_plan(info: dict[str, Any]) -> dict[str, int] | None:
    """A FedBuff session's ``buffer_size`` and planned ``versions`` (its options' defaults,
    ``xflwb.FedBuff``'s own, filled in), or None for a synchronous session."""
    cfg = info.get("config") or {}
    if not is_asynchronous(cfg):
        return None
    opts = cfg.get("strategy_options")
    given = opts if isinstance(opts, dict) else {}
    plan: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(FedBuff)} | given
    return {"buffer_size": int(plan["buffer_size"]),
            "versions": int(plan["max_versions"] or cfg["rounds"])}


def _steps(info: dict[str, Any]) -> tuple[str, int]:
    """What a session counts ("round", or "version" for FedBuff) and how many it plans."""
    fb = fedbuff_plan(info)
    return ("version", fb["versions"]) if fb else ("round", int(info["config"]["rounds"]))


def where(info: dict[str, Any]) -> str:
    """Where the clients are: phone ports, or the simulated fleet."""
    cfg = info["config"]
    if cfg.get("engine") == "simulation":
        cluster = cfg.get("ray_address") or "local Ray"
        return (f"simulated {cfg['android']} Android + {cfg['ios']} iOS clients "
                f"({html.escape(str(cluster))})")
    ports = ", ".join(f"{p} {port}" for p, port in (info["ports"] or {}).items())
    return f"ports {html.escape(ports)}" if ports else "no ports yet"


def failure_count(history: pd.DataFrame) -> int:
    """Failed fits over all rounds (the ``failures`` metric of platform ``all``)."""
    if history.empty:
        return 0
    rows = history[(history["metric"] == "failures") & (history["platform"] == "all")]
    return int(rows["value"].fillna(0).sum())


def device_table(fleet: Any) -> pd.DataFrame:
    """The fleet's table with each device's error (blank when it has none)."""
    df = fleet.table.copy()
    if "error" in df.columns:
        df["error"] = df["error"].fillna("")
    return df


def client_metrics(session: Any) -> pd.DataFrame | None:
    """The session's per-client evaluations (``session.client_metrics``: round, platform,
    client, examples, loss, accuracy), or None where the handle has none (an older handle,
    a session without evaluations): the fairness panel then shows the percentiles alone."""
    try:
        frame = getattr(session, "client_metrics", None)
        if callable(frame):
            frame = frame()
    except Exception:  # a view must not fail on a lookup only the fairness panel needs
        return None
    return frame if isinstance(frame, pd.DataFrame) and len(frame) else None


def is_simulation(info: dict[str, Any]) -> bool:
    """A session on the Simulation Engine (its history may carry simulated time)."""
    return "simulation" in (info.get("engine"), (info.get("config") or {}).get("engine"))


def _parameters(session: Any) -> int | None:
    """The model's trained parameter count, when the handle can tell (a local Session)."""
    try:
        count = getattr(session, "parameter_count", None)
    except Exception:  # a view must not fail on a lookup only the DP warning needs
        return None
    return count if isinstance(count, int) else None


def dp_warning_html(session: Any, info: dict[str, Any], history: pd.DataFrame) -> str:
    """The DP noise warning (``xflwb._dp_guidance``) as a header line, or nothing."""
    cfg = info.get("config") or {}
    if not cfg.get("privacy"):
        return ""
    warning = noise_warning(cfg, _parameters(session), history)
    return ("" if warning is None else
            f"<div class='xflwb-dp-warning' style='color:#9a6700'>⚠ DP: "
            f"{html.escape(warning)}</div>")


def header_html(session: Any, info: dict[str, Any], history: pd.DataFrame,
                devices: pd.DataFrame | None = None) -> str:
    """Session, model, status, round k/N, where, failure counts, what it waits for or why
    it ended (the session handle's ``end_reason``), the compression ratio per platform and
    direction (when the history has the float32 metrics), and the DP noise warning."""
    status = info["status"]
    step, total = _steps(info)
    fb = fedbuff_plan(info)
    tone = {"finished": "#1a7f37", **dict.fromkeys(ENDED_BADLY, "#cf222e")}.get(status)
    badge = f"<b style='color:{tone}'>{status}</b>" if tone else f"<b>{status}</b>"
    progress = f"{step} {info['round']}/{total}"
    if fb:
        progress += f" (FedBuff, K={fb['buffer_size']})"
    parts = [f"<b>session {info['id']}</b> — {html.escape(info['model_name'])}: {badge}",
             progress, where(info)]
    started = getattr(session, "started_from", None)
    if isinstance(started, str) and started:
        parts.append(html.escape(started))
    privacy = (info.get("config") or {}).get("privacy")
    if privacy:  # the ledger so far: what a reviewer asks first
        eps: Any = history.query("metric == 'epsilon'")["value"] if len(history) else []
        spent = f"ε = {float(eps.iloc[-1]):.3g}" if len(eps) else "ε = 0"
        cap = privacy.get("max_epsilon")
        parts.append(f"DP: {spent} at δ = {privacy.get('target_delta', 1e-5):g}"
                     + (f" (budget {cap:g})" if cap else ""))
    fails = failure_count(history)
    parts.append(f"<span style='color:{'#cf222e' if fails else 'inherit'}'>{fails} failed "
                 f"fit{'s' if fails != 1 else ''}</span>")
    if devices is not None and len(devices):
        bad = int((devices["status"] == "failed").sum())
        parts.append(f"<span style='color:{'#cf222e' if bad else 'inherit'}'>{bad} of "
                     f"{len(devices)} devices failed</span>")
    head = " · ".join(parts)
    try:  # the handle says why (Session and RemoteSession alike; widgets ask, never compute)
        why = getattr(session, "end_reason", None) if status in ("finished", *ENDED_BADLY) else None
    except Exception:  # a view must not fail on it
        why = None
    if why:
        head += (f"<div class='xflwb-end-reason' style='color:{tone or 'inherit'}'>ended: "
                 f"{html.escape(why)}</div>")
    if status in ENDED_BADLY and info.get("error") and str(info["error"]).strip() not in (
            why or ""):  # the whole error, when the one line above is not all of it
        reason = str(info["error"])
        reason = reason if len(reason) <= 1500 else "…" + reason[-1500:]
        head += (f"<div style='color:#cf222e;white-space:pre-wrap'>"
                 f"{html.escape(reason)}</div>")
    elif status not in ("finished", *ENDED_BADLY):
        doing = getattr(session, "doing", None)
        if callable(doing):
            head += f"<div>{html.escape(doing(info))}</div>"
    return head + compression_html(history, info.get("config")) + dp_warning_html(
        session, info, history)


def failures_html(session: Any) -> str:
    """The last failed fits (round, platform, client, reason), or nothing."""
    failures = getattr(session, "failures", None)
    if failures is None or len(failures) == 0:
        return ""
    return _section(f"failed fits (last {min(RECENT, len(failures))} of {len(failures)})",
                    _table_html(failures.tail(RECENT)))


def _last_title(step: str, last: int | None) -> str:
    return f"last {step} per platform" + (f" ({step} {last})" if last else "")


def staleness_html(session: Any) -> str:
    """FedBuff: the staleness histogram of the session's applied updates as an embedded
    PNG under its heading."""
    return _section("staleness of applied updates",
                    img_html(staleness_png(session.arrivals), "xflwb-staleness"))


def snapshot_html(session: Any, fleet: Any = None) -> str:
    """Static HTML of the dashboard (plot embedded as PNG; FedBuff: against the model
    version, with the staleness histogram; a simulation with a virtual clock: against
    simulated time, with participation per platform)."""
    info = session.info
    hist = session.history
    devices = device_table(fleet) if fleet is not None else None
    step, _total = _steps(info)
    x = "sim" if default_x(hist) == "sim" else step
    png = plot_png(hist, x=x, max_epsilon=max_epsilon(info))
    rej = session.rejections
    last = _last_round(hist)
    parts = [
        (f"<div class='xflwb-header' style='font-size:1.15em;margin:6px 0'>"
         f"{header_html(session, info, hist, devices)}</div>"),
        img_html(png),
        staleness_html(session) if step == "version" else "",
        fairness_html(hist, client_metrics(session)),
        _section(_last_title(step, last), round_table_html(hist)),
        participation_html(hist, step),
        traffic_html(hist, info.get("config"), line=False),
        failures_html(session),
    ]
    if len(rej):
        parts.append(_section("rejected updates", _table_html(rej.tail(RECENT))))
    if devices is not None:
        parts.append(_section("devices", _table_html(devices)))
    return "<div class='xflwb-dashboard'>" + "".join(parts) + "</div>"


class Report:
    """``report(session)``: the final dashboard as static HTML (survives headless runs)."""

    def __init__(self, session: Any, fleet: Any = None) -> None:
        self._html = snapshot_html(session, fleet)

    def _repr_html_(self) -> str:
        return self._html


def report(session: Any, fleet: Any = None) -> Report:
    """The session's curves (a simulation's against simulated time), accuracy across
    clients, last-round table, participation per platform, bytes on the wire (with the
    compression ratios), failed fits, rejections and devices (with each device's error)
    as static HTML; panels without data are left out."""
    return Report(session, fleet)


class Dashboard:
    """A live ipywidgets view of one session; ``display(dash)`` or return it from a cell.

    Displaying it starts its updates (``start``, idempotent: the magics call it too), so a
    hand-built ``Dashboard(session, fleet)`` is live like the magics' own; it stops polling
    once the session has ended, after drawing the final state (or on ``stop()``)."""

    def __init__(self, session: Any, fleet: Any = None, interval: float = 1.0) -> None:
        import ipywidgets as w

        self.session = session
        self.fleet = fleet
        self.interval = interval
        #: "round", or "version" for a FedBuff session; ``rounds`` is how many it plans
        self.step, self.rounds = _steps(session.info)
        self.header = w.HTML()
        self.progress = w.IntProgress(value=0, min=0, max=self.rounds,
                                      description=f"{self.step} 0/{self.rounds}",
                                      bar_style="info",
                                      style={"description_width": "initial"})
        self.plot = w.Image(format="png")
        #: FedBuff only: the staleness histogram (a synchronous session has no arrivals)
        self.staleness = w.Image(format="png") if self.step == "version" else None
        self.table = w.HTML()
        #: bytes on the wire: totals per platform and the cumulative plot (issue 23)
        self.traffic = w.HTML()
        self.failures = w.HTML()
        self.devices = w.HTML()
        self.rejected = w.HTML()
        #: accuracy across clients: the ECDF and percentiles (issue 24; empty without them)
        self.fairness = w.HTML()
        #: participation per platform on the virtual clock (issue 24; empty without it)
        self.participation = w.HTML()
        #: FedBuff: plot against the model version or the wall time; a simulation also
        #: (or, synchronous: only then shown) against simulated time once it is recorded
        options = ([("model version", "version"), ("wall time", "seconds")]
                   if self.step == "version" else [("round", "round")])
        self._simulated = is_simulation(session.info)
        self.axis = (w.ToggleButtons(options=options, value=options[0][1],
                                     description="x axis")
                     if self.step == "version" or self._simulated else None)
        if self.axis is not None:
            if self.step != "version":  # one choice is none: shown with simulated time
                self.axis.layout.display = "none"
            self.axis.observe(self._redraw, names="value")
        plots = ([self.axis] if self.axis is not None else []) + [self.plot] + (
            [self.staleness] if self.staleness is not None else [])
        self.widget = w.VBox([self.header, self.progress, *plots, self.fairness, self.table,
                              self.participation, self.traffic, self.failures,
                              self.rejected, self.devices])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plotted: tuple[int, int] | None = None  # (round, history rows) last drawn
        self._arrivals_drawn: int | None = None  # arrival rows in the staleness plot
        self.refresh()

    def refresh(self) -> str:
        """Pull the latest state into the widgets; returns the session status. The plot
        and round table are redrawn only when the history changed."""
        info = self.session.info
        hist = self.session.history
        devices = device_table(self.fleet) if self.fleet is not None else None
        status: str = info["status"]
        self.header.value = header_html(self.session, info, hist, devices)
        done = min(int(info["round"]), self.progress.max)
        self.progress.value = done
        self.progress.description = f"{self.step} {done}/{self.rounds}"
        if status == "finished":
            self.progress.bar_style = "success"
        elif status in ENDED_BADLY:
            self.progress.bar_style = "danger"
        key = (int(info["round"]), len(hist))
        if key != self._plotted:
            self._offer_sim(hist)
            self.plot.value = plot_png(hist, x=self.axis.value if self.axis else self.step,
                                       max_epsilon=max_epsilon(info))
            self.plot.width = str(png_css_width(self.plot.value))  # sharp: 2 px per px
            self.fairness.value = fairness_html(hist, client_metrics(self.session))
            self.table.value = _section(_last_title(self.step, _last_round(hist)),
                                        round_table_html(hist))
            self.participation.value = participation_html(hist, self.step)
            self.traffic.value = traffic_html(hist, info.get("config"), line=False)
            self._plotted = key
        if self.staleness is not None:
            arrivals = self.session.arrivals
            if len(arrivals) != self._arrivals_drawn:
                self.staleness.value = staleness_png(arrivals)
                self.staleness.width = str(png_css_width(self.staleness.value))
                self._arrivals_drawn = len(arrivals)
        self.failures.value = failures_html(self.session)
        rej = self.session.rejections
        self.rejected.value = ("" if rej.empty else
                               _section("rejected updates", _table_html(rej.tail(RECENT))))
        if devices is not None:
            self.devices.value = _section("devices", _table_html(devices))
        return status

    def _offer_sim(self, hist: pd.DataFrame) -> None:
        """A simulation's first simulated time: offer it on the x axis toggle (shown now,
        for a synchronous one) and plot against it (once: a later choice is the user's)."""
        if (self.axis is None or not self._simulated
                or "sim" in [v for _label, v in self.axis.options] or not sim_seconds(hist)):
            return
        self.axis.unobserve(self._redraw, names="value")
        try:
            self.axis.options = [*self.axis.options, ("simulated time", "sim")]
            self.axis.value = "sim"
            self.axis.layout.display = None
        finally:
            self.axis.observe(self._redraw, names="value")

    def _redraw(self, _change: Any = None) -> None:
        """The x axis changed: draw the plot again at once."""
        self._plotted = None
        self.refresh()

    def _loop(self) -> None:
        from xflwb.workbench import DONE  # the public API, not the session module

        while not self._stop.wait(self.interval):
            try:
                if self.refresh() in DONE:
                    break
            except Exception as exc:  # e.g. the workbench was stopped: say so, stop polling
                self.header.value += (
                    "<div style='color:#cf222e'>dashboard stopped updating: "
                    f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</div>")
                break

    def start(self) -> Dashboard:
        """Poll the session every ``interval`` seconds until it ends (no-op while
        polling)."""
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
        # IPython asks for this both for display(dash) and for a dashboard returned from a
        # cell: being shown is what starts the updates
        self.start()
        return self.widget._repr_mimebundle_(**kwargs)
