"""What shows a FedBuff session (issue 15) by model version instead of round: the registry's
``arrivals``, ``Session.arrivals`` and the history's ``version`` column, the admin route
``/sessions/{id}/arrivals`` (real uvicorn on loopback), the plots' x axes and staleness
histogram, and the dashboard and report. Sessions are rows written through the registry's
own methods, as a FedBuff session process writes them."""

from __future__ import annotations

import sqlite3

import httpx
import keras
import pandas as pd
import pytest
import sqlalchemy as sa

import xflwb
from xflwb.admin import AdminClient
from xflwb.sessions.registry import ARRIVAL_COLUMNS, Registry, RegistryError
from xflwb.style import PLATFORM_COLORS, plot_figure, staleness_figure
from xflwb.widgets.dashboard import Dashboard, header_html, report

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": "Bearer secret"}
HISTORY = ["round", "platform", "metric", "value"]


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="buffed", data_type="buffed-data",
                       out_dir=tmp_path_factory.mktemp("fedbuff-export"), check_parity=False)
    bench = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("fedbuff") / "xfl", port=0,
                            admin_token="secret").start()
    bench.publish(res)
    try:
        yield bench
    finally:
        bench.stop()


def _arrival(version: int, platform: str, client: str, base: int, status: str = "applied",
             reason: str = "", examples: int = 30) -> dict:
    stale = version - 1 - base  # the server was at version - 1 when it arrived
    return {"version": version, "platform": platform, "client": client, "base_version": base,
            "staleness": stale, "weight": 0.0 if status == "rejected" else (1 + stale) ** -0.5,
            "examples": examples, "fit_seconds": 0.25 * version, "seconds": 1.5 * version,
            "status": status, "reason": reason}


#: versions 1..3 of a K=2 buffer; android lags; one update refused
ARRIVALS = [
    _arrival(1, "android", "a1", 0), _arrival(1, "ios", "i1", 0),
    _arrival(2, "ios", "i2", 1), _arrival(2, "android", "a2", 0),
    _arrival(3, "android", "a3", 0), _arrival(3, "ios", "i3", 2),
    _arrival(3, "android", "a4", 0, status="rejected", reason="update norm above the bound"),
]


def _session(reg: Registry, config: dict, rounds_done: int,
             arrivals: list[dict] | None = None, versions: int = 0) -> int:
    """A finished session row with ``versions`` versions' metrics and the arrivals."""
    model = reg.latest_model("buffed")
    sid = reg.create_session(model, config)
    for v in range(1, versions + 1):
        values = [("all", "seconds", 1.5 * v), ("all", "buffer_size", 2.0),
                  ("all", "clients", 2.0), ("android", "clients", 1.0)]
        if v % 2:  # evaluate_every=2: versions 1, 3, ... were evaluated
            values += [(p, m, x) for p in ("android", "ios", "all")
                       for m, x in (("eval_loss", 2.0 / v), ("accuracy", 0.3 + v / 10))]
        reg.add_metrics(sid, v, values)
    reg.add_arrivals(sid, arrivals or [])
    reg.update_session(sid, status="finished", round=rounds_done)
    return sid


FEDBUFF = {"rounds": 20, "strategy": "fedbuff",
           "strategy_options": {"buffer_size": 4, "staleness": "polynomial:0.5"}}
SYNC = {"rounds": 3, "strategy": "fedavg", "strategy_options": {}}


# -- registry ---------------------------------------------------------------------------------
def test_arrivals_round_trip_in_insertion_order_per_session(wb):
    reg = wb.registry
    first = _session(reg, FEDBUFF, 3, ARRIVALS[:4])
    other = _session(reg, FEDBUFF, 1, [_arrival(1, "ios", "x", 0)])
    reg.add_arrivals(first, ARRIVALS[4:])  # a later version: appended after the first ones
    got = reg.get_arrivals(first)
    assert [r["client"] for r in got] == ["a1", "i1", "i2", "a2", "a3", "i3", "a4"]
    assert got == [{k: r[k] for k in ARRIVAL_COLUMNS} for r in ARRIVALS]
    assert [r["client"] for r in reg.get_arrivals(other)] == ["x"]
    no_reason = {k: v for k, v in ARRIVALS[0].items() if k != "reason"}
    reg.add_arrivals(other, [no_reason])
    assert reg.get_arrivals(other)[-1]["reason"] == ""
    with pytest.raises(RegistryError, match="staleness"):
        reg.add_arrivals(other, [{k: v for k, v in no_reason.items() if k != "staleness"}])
    assert len(reg.get_arrivals(other)) == 2  # nothing of the refused batch was written


def test_an_older_registry_gains_the_arrivals_table_when_opened(tmp_path):
    Registry(tmp_path / "old").close()
    db = tmp_path / "old" / "xflwb.db"
    with sqlite3.connect(db) as c:  # as an xflwb from before FedBuff (and versions) left it
        c.execute("DROP TABLE arrivals")
        c.execute("DROP TABLE schema_version")
    assert "arrivals" not in sa.inspect(sa.create_engine(f"sqlite:///{db}")).get_table_names()
    reg = Registry(tmp_path / "old")
    try:
        cols = [c["name"] for c in sa.inspect(reg.engine).get_columns("arrivals")]
        assert set(ARRIVAL_COLUMNS) | {"id", "session_id", "time"} == set(cols)
        assert reg.get_arrivals(1) == []
    finally:
        reg.close()


# -- the session handle -----------------------------------------------------------------------
def test_session_arrivals_and_the_version_column_only_for_fedbuff(wb):
    buffed = wb.session(_session(wb.registry, FEDBUFF, 3, ARRIVALS, versions=3))
    df = buffed.arrivals
    assert list(df.columns) == list(ARRIVAL_COLUMNS) == [
        "version", "platform", "client", "base_version", "staleness", "weight", "examples",
        "fit_seconds", "seconds", "status", "reason"]
    assert df["client"].tolist() == ["a1", "i1", "i2", "a2", "a3", "i3", "a4"]
    assert df["version"].tolist() == [1, 1, 2, 2, 3, 3, 3]
    assert df["staleness"].tolist() == [0, 0, 0, 1, 2, 0, 2]
    assert df["weight"].tolist() == pytest.approx([1, 1, 1, 2 ** -0.5, 3 ** -0.5, 1, 0])
    assert df["status"].tolist() == ["applied"] * 6 + ["rejected"]
    assert df["reason"].tolist() == [""] * 6 + ["update norm above the bound"]
    hist = buffed.history
    assert list(hist.columns) == [*HISTORY, "version"]
    assert (hist["version"] == hist["round"]).all() and set(hist["version"]) == {1, 2, 3}

    sync = wb.session(_session(wb.registry, SYNC, 1, versions=1))
    assert list(sync.history.columns) == HISTORY  # synchronous rounds: exactly as before
    assert sync.arrivals.empty and list(sync.arrivals.columns) == list(ARRIVAL_COLUMNS)


# -- the admin API ----------------------------------------------------------------------------
def test_the_arrivals_route_and_remote_session_over_http(wb):
    sid = _session(wb.registry, FEDBUFF, 3, ARRIVALS, versions=3)
    res = httpx.get(f"{wb.url}/api/v1/sessions/{sid}/arrivals", headers=AUTH, timeout=30)
    assert res.status_code == 200, res.text
    assert res.json() == [{k: r[k] for k in ARRIVAL_COLUMNS} for r in ARRIVALS]
    missing = httpx.get(f"{wb.url}/api/v1/sessions/999999/arrivals", headers=AUTH, timeout=30)
    assert missing.status_code == 404
    unauthorised = httpx.get(f"{wb.url}/api/v1/sessions/{sid}/arrivals", timeout=30)
    assert unauthorised.status_code == 401
    spec = httpx.get(f"{wb.url}/openapi.json", timeout=30).json()
    assert list(spec["components"]["schemas"]["ArrivalOut"]["properties"]) == list(
        ARRIVAL_COLUMNS)

    remote = AdminClient(wb.url, "secret").session(sid)
    pd.testing.assert_frame_equal(remote.arrivals, wb.session(sid).arrivals)
    assert list(remote.history.columns) == [*HISTORY, "version"]
    sync = AdminClient(wb.url, "secret").session(_session(wb.registry, SYNC, 0))
    assert sync.arrivals.empty and list(sync.arrivals.columns) == list(ARRIVAL_COLUMNS)
    assert list(sync.history.columns) == HISTORY


# -- plots ------------------------------------------------------------------------------------
def _versions_history(versions: int = 4) -> pd.DataFrame:
    """A FedBuff history: eval every other version, wall seconds for every version."""
    rows = []
    for v in range(1, versions + 1):
        rows.append((v, "all", "seconds", 10.0 * v + 0.5))
        if v % 2:
            rows += [(v, p, m, x) for p in ("android", "ios", "all")
                     for m, x in (("eval_loss", 2.0 / v), ("accuracy", 0.3 + v / 10))]
    df = pd.DataFrame(rows, columns=HISTORY)
    df["version"] = df["round"]
    return df


def _lines(fig) -> dict[str, list[float]]:
    """The accuracy panel's x data per platform."""
    return {line.get_label(): [float(x) for x in line.get_xdata()] for line in fig.axes[1].lines}


def test_plot_figure_puts_rounds_versions_or_wall_seconds_on_x():
    import matplotlib.pyplot as plt

    hist = _versions_history()
    figs = {x: plot_figure(hist, x=x) for x in (None, "version", "round", "seconds")}
    try:
        assert figs[None].axes[1].get_xlabel() == "model version"  # has a version column
        assert figs["version"].axes[0].get_xlabel() == "model version"
        assert figs["round"].axes[1].get_xlabel() == "round"
        assert {ax.get_xlabel() for ax in figs["seconds"].axes} == {"wall time (s)"}
        assert _lines(figs[None]) == _lines(figs["version"]) == {
            p: [1.0, 3.0] for p in ("android", "ios", "all")}
        assert _lines(figs["seconds"]) == {p: [10.5, 30.5] for p in ("android", "ios", "all")}
        acc = {line.get_label(): list(line.get_ydata()) for line in figs["seconds"].axes[1].lines}
        assert acc["ios"] == pytest.approx([0.4, 0.6])  # the same values, placed by time
    finally:
        for fig in figs.values():
            plt.close(fig)
    sync = plot_figure(hist.drop(columns="version"))
    try:
        assert sync.axes[1].get_xlabel() == "round"
    finally:
        plt.close(sync)
    no_time = plot_figure(hist[hist["metric"] != "seconds"], x="seconds")
    try:
        assert not no_time.axes[1].lines
        assert no_time.axes[1].texts[0].get_text() == "no wall time recorded"
    finally:
        plt.close(no_time)
    empty = plot_figure(pd.DataFrame(columns=[*HISTORY, "version"]))
    try:
        assert not empty.axes and "after version 1" in empty.texts[0].get_text()
    finally:
        plt.close(empty)
    with pytest.raises(ValueError, match="x='epoch'"):
        plot_figure(hist, x="epoch")


def test_staleness_histogram_one_integer_bin_per_staleness_stacked_per_platform():
    import matplotlib.pyplot as plt

    arrivals = pd.DataFrame([
        {"platform": p, "staleness": s, "status": "applied"}
        for p, s in [("android", 0), ("android", 0), ("android", 1), ("android", 3),
                     ("ios", 1), ("ios", 2)]]
        + [{"platform": "android", "staleness": 9, "status": "rejected"}])
    fig = staleness_figure(arrivals)
    try:
        (ax,) = fig.axes
        assert ax.get_xlabel() == "staleness (versions behind)"
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["android", "ios"]
        bars = dict(zip(labels, ax.containers, strict=True))  # one bar set per platform
        for plat, counts in {"android": [2, 1, 0, 1], "ios": [0, 1, 1, 0]}.items():
            patches = bars[plat].patches
            assert [p.get_height() for p in patches] == counts
            assert [p.get_x() + p.get_width() / 2 for p in patches] == [0, 1, 2, 3]
            assert {p.get_facecolor() for p in patches} == {
                tuple(float(c) for c in plt.matplotlib.colors.to_rgba(PLATFORM_COLORS[plat]))}
        # stacked: ios's bar at staleness 1 stands on android's
        assert bars["ios"].patches[1].get_y() == 1
    finally:
        plt.close(fig)
    for none in (arrivals[arrivals["status"] == "rejected"], arrivals.iloc[0:0]):
        placeholder = staleness_figure(none)
        try:
            assert not placeholder.axes
            assert "no update applied yet" in placeholder.texts[0].get_text()
        finally:
            plt.close(placeholder)


# -- dashboard and report ---------------------------------------------------------------------
def test_dashboard_and_report_count_versions_and_show_the_staleness(wb):
    session = wb.session(_session(wb.registry, FEDBUFF, 7, ARRIVALS, versions=7))
    html = report(session)._repr_html_()
    assert "version 7/20 (FedBuff, K=4)" in html and "round 7/20" not in html
    assert "staleness of applied updates" in html
    assert "class='xflwb-staleness' src='data:image/png;base64," in html
    assert "last version per platform (version 7)" in html
    dash = Dashboard(session)
    assert dash.step == "version" and dash.progress.max == 20
    assert dash.progress.description == "version 7/20" and dash.progress.value == 7
    assert "version 7/20 (FedBuff, K=4)" in dash.header.value
    assert dash.staleness is not None and dash.staleness in dash.widget.children
    assert dash.staleness.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "last version per platform" in dash.table.value
    assert dash.axis is not None and dash.axis in dash.widget.children
    by_version = dash.plot.value
    dash.axis.value = "seconds"  # the toggle redraws against wall time at once
    assert dash.plot.value != by_version and dash.plot.value[:8] == b"\x89PNG\r\n\x1a\n"

    sync = wb.session(_session(wb.registry, SYNC, 1, versions=1))
    plain = report(sync)._repr_html_()
    assert "round 1/3" in plain and "staleness" not in plain and "FedBuff" not in plain
    assert "last round per platform (round 1)" in plain
    sync_dash = Dashboard(sync)
    assert sync_dash.staleness is None and sync_dash.progress.description == "round 1/3"
    assert sync_dash.axis is None
    # header, progress, plot, fairness, 4 tables, participation, bytes (issue 24: the
    # fairness and participation panels are empty without their metrics)
    assert len(sync_dash.widget.children) == 10


def test_the_header_counts_toward_max_versions_with_the_buffer_size():
    info = {"id": 4, "model_name": "m", "status": "running", "round": 3, "error": None,
            "ports": {"android": 1, "ios": 2},
            "config": {"rounds": 10, "strategy": "fedbuff",
                       "strategy_options": {"buffer_size": 2, "max_versions": 12}}}
    head = header_html(object(), info, pd.DataFrame(columns=HISTORY))
    assert "version 3/12 (FedBuff, K=2)" in head
    info["config"]["strategy_options"] = {}  # the contract's defaults: K=4, rounds versions
    assert "version 3/10 (FedBuff, K=4)" in header_html(object(), info,
                                                        pd.DataFrame(columns=HISTORY))
    info["config"] = {"rounds": 10}
    assert "round 3/10 · " in header_html(object(), info, pd.DataFrame(columns=HISTORY))

