"""Bytes on the wire and the compression ratio (issue 23) where the researcher looks: the
dashboard's header line and round table, its bytes panel, ``xflwb.report`` — for
synchronous rounds and FedBuff versions, and for older histories that have bytes but not
what float32 would have cost (they show bytes, never crash).

Histories are written in the shape the session processes write them: the per-platform and
"all" metrics of ``xflwb.federation.rounds`` (synchronous) or the real
``versions._arrival_metrics`` (FedBuff), stored through ``Registry.add_metrics`` and read
back by the session handle, as the dashboard reads them."""

from __future__ import annotations

import re

import keras
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from xflwb import style
from xflwb.federation.fedbuff import Arrival
from xflwb.federation.versions import _arrival_metrics
from xflwb.widgets.dashboard import Dashboard, header_html, report, round_table, round_table_html

pytestmark = pytest.mark.timeout(300)
HISTORY = ["round", "platform", "metric", "value"]
PLATFORMS = ("android", "ios")
DIRS = ("up", "down")


# -- histories in the shape the rounds write them ------------------------------------------------
def _round_metrics(per: dict[str, dict[str, float]], float32: bool = True,
                   all_float32: bool = True) -> list[tuple[str, str, float | None]]:
    """One synchronous round's metrics as ``Round.aggregate_fit`` lists them: per platform
    clients, examples, fit_seconds, bytes_up, bytes_per_update, bytes_down, rejected; the
    "all" totals; failures and aggregate_seconds; (issue 23) per platform — and, unless
    ``all_float32`` is False, for "all" — what float32 would have cost."""
    out: list[tuple[str, str, float | None]] = []
    for plat, s in per.items():
        n = s["clients"]
        out += [(plat, "clients", n), (plat, "examples", 30.0 * n),
                (plat, "fit_seconds", 0.5 if n else None), (plat, "bytes_up", s["up"]),
                (plat, "bytes_per_update", s["up"] / n if n else None),
                (plat, "bytes_down", s["down"]), (plat, "rejected", 0.0)]
        if float32:
            out += [(plat, "bytes_up_float32", s["up32"]), (plat, "bytes_down_float32",
                                                            s["down32"])]
    totals = {k: sum(s[k] for s in per.values()) for k in ("clients", "up", "down", "up32",
                                                            "down32")}
    out += [("all", "clients", totals["clients"]), ("all", "examples", 30.0 * totals["clients"]),
            ("all", "bytes_up", totals["up"]), ("all", "bytes_down", totals["down"]),
            ("all", "rejected", 0.0)]
    if float32 and all_float32:
        out += [("all", "bytes_up_float32", totals["up32"]),
                ("all", "bytes_down_float32", totals["down32"])]
    out += [("all", "failures", 0.0), ("all", "aggregate_seconds", 0.01)]
    return out


def _evals(rnd: int) -> list[tuple[str, str, float]]:
    return [(p, m, v) for p in (*PLATFORMS, "all")
            for m, v in (("eval_loss", 2.0 / rnd), ("accuracy", 0.3 + rnd / 10))]


#: 3 rounds; android sends int8 (3.9× smaller up) and gets fp16; iOS declared nothing: float32
#: up (its .npy headers make it a little bigger than raw float32), fp16 down
INT8_ANDROID = {"android": {"clients": 2.0, "up": 2 * 1030.0, "down": 2 * 2012.0,
                            "up32": 2 * 4000.0, "down32": 2 * 4000.0},
                "ios": {"clients": 2.0, "up": 2 * 4128.0, "down": 2 * 2012.0,
                        "up32": 2 * 4000.0, "down32": 2 * 4000.0}}


def _frame(rounds: list[list[tuple[str, str, float | None]]]) -> pd.DataFrame:
    return pd.DataFrame([(r, p, m, v) for r, metrics in enumerate(rounds, start=1)
                         for p, m, v in metrics], columns=HISTORY)


def _sync_history(float32: bool = True, rounds: int = 3) -> pd.DataFrame:
    return _frame([_round_metrics(INT8_ANDROID, float32) + _evals(r)
                   for r in range(1, rounds + 1)])


# -- the ratio against a numpy reference ---------------------------------------------------------
_bytes = st.integers(min_value=0, max_value=10**9)


@st.composite
def _rounds(draw):
    """Random per-platform bytes for 1-6 rounds; a platform may send nothing in a round."""
    n = draw(st.integers(1, 6))
    return [{p: {"clients": float(draw(st.integers(0, 3))), "up": float(draw(_bytes)),
                 "down": float(draw(_bytes)), "up32": float(draw(_bytes)),
                 "down32": float(draw(_bytes))} for p in PLATFORMS} for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(rounds=_rounds(), all_float32=st.booleans())
def test_the_ratio_per_platform_and_direction_is_float32_over_actual(rounds, all_float32):
    """Per round and over the session: float32 ÷ actual bytes, per platform and direction,
    equal to numpy's; "all" is the platforms' sum whether or not the history records its
    float32 total; a round that sent nothing has no ratio (not inf)."""
    hist = _frame([_round_metrics(per, all_float32=all_float32) for per in rounds])
    traffic = style.traffic_frame(hist)
    summary = style.compression_summary(hist).set_index("platform")
    assert list(summary.index) == ["android", "ios", "all"]
    for d in DIRS:
        actual = np.array([[per[p][d] for p in PLATFORMS] for per in rounds])
        f32 = np.array([[per[p][f"{d}32"] for p in PLATFORMS] for per in rounds])
        actual = np.column_stack([actual, actual.sum(axis=1)])  # + "all"
        f32 = np.column_stack([f32, f32.sum(axis=1)])
        with np.errstate(divide="ignore", invalid="ignore"):
            per_round = np.where(actual > 0, f32 / actual, np.nan)
            total = np.where(actual.sum(0) > 0, f32.sum(0) / actual.sum(0), np.nan)
        for j, plat in enumerate((*PLATFORMS, "all")):
            got = traffic.xs(plat, level="platform")
            np.testing.assert_allclose(got[f"ratio_{d}"].to_numpy(), per_round[:, j],
                                       rtol=1e-12)
            np.testing.assert_allclose(got[f"cum_bytes_{d}"].to_numpy(),
                                       np.cumsum(actual[:, j]), rtol=1e-12)
            np.testing.assert_allclose(got[f"cum_bytes_{d}_float32"].to_numpy(),
                                       np.cumsum(f32[:, j]), rtol=1e-12)
            np.testing.assert_allclose(summary.at[plat, f"ratio_{d}"], total[j], rtol=1e-12)
            assert summary.at[plat, f"bytes_{d}"] == actual[:, j].sum()
            assert summary.at[plat, f"bytes_{d}_float32"] == f32[:, j].sum()
            said = style.ratio_text(total[j])
            line = style.compression_line(summary.reset_index())
            assert (f"{plat} — " in line and f"{d}: {said}" in line) if said else True


def test_ratio_text_says_smaller_larger_or_float32():
    assert style.ratio_text(3.88, "int8") == "3.9× smaller (int8)"
    assert style.ratio_text(2.0, "fp16") == "2.0× smaller (fp16)"
    assert style.ratio_text(4000 / 4128, "int8") == "1.0× (no saving)"  # not negotiated
    assert style.ratio_text(0.5, "topk:0.9") == "2.0× larger (topk:0.9)"
    assert style.ratio_text(3.88) == "3.9× smaller"
    for unknown in (None, float("nan"), float("inf"), 0.0, "x"):
        assert style.ratio_text(unknown) == ""


def test_the_codec_names_come_from_the_session_options_or_the_history():
    hist = _sync_history()
    cfg = {"compression": {"up": "int8", "down": "fp16"}}
    assert style.compression_codecs(hist, cfg) == {"up": "int8", "down": "fp16"}
    assert style.compression_codecs(hist, {"compression": None}) == {"up": None, "down": None}
    named = hist.assign(compression_up="rotate+int8", compression_down=None)
    assert style.compression_codecs(named) == {"up": "rotate+int8", "down": None}
    line = style.compression_line(style.compression_summary(hist, cfg))
    assert line == ("android — up: 3.9× smaller (int8), down: 2.0× smaller (fp16) · "
                    "ios — up: 1.0× (no saving), down: 2.0× smaller (fp16) · "
                    "all — up: 1.6× smaller (int8), down: 2.0× smaller (fp16)")
    # without names: the ratios alone
    assert style.compression_line(style.compression_summary(hist)).startswith(
        "android — up: 3.9× smaller, down: 2.0× smaller · ios — up: 1.0× (no saving)")


# -- tables ----------------------------------------------------------------------------------------
def test_the_round_table_shows_each_platforms_ratio_of_the_last_round():
    hist = _sync_history()
    df = round_table(hist).set_index("platform")
    assert df.at["android", "ratio_up"] == pytest.approx(4000 / 1030)
    assert df.at["ios", "ratio_up"] == pytest.approx(4000 / 4128)
    assert df.at["all", "ratio_down"] == pytest.approx(4000 / 2012)
    html = round_table_html(hist)
    assert "<th class='num'>up vs float32</th>" in html
    assert "<td class='num'>3.9×</td>" in html and "<td class='num'>1.0×</td>" in html
    assert "<td class='num'>2.0×</td>" in html
    old = round_table_html(_sync_history(float32=False))
    assert "vs float32" not in old and "<td class='num'>2.1 kB</td>" in old  # bytes stay


def test_the_totals_table_per_platform_with_and_without_the_float32_metrics():
    cfg = {"compression": {"up": "int8", "down": "fp16"}}
    table = style.traffic_table(_sync_history(), cfg)
    assert list(table.columns) == ["platform", "bytes up", "bytes down", "up as float32",
                                   "down as float32", "up vs float32", "down vs float32"]
    android = table.set_index("platform").loc["android"]
    assert android["bytes up"] == "6.2 kB" and android["up as float32"] == "24.0 kB"
    assert android["up vs float32"] == "3.9× smaller (int8)"
    old = style.traffic_table(_sync_history(float32=False), cfg)
    assert list(old.columns) == ["platform", "bytes up", "bytes down"]
    assert old["bytes up"].tolist() == ["6.2 kB", "24.8 kB", "30.9 kB"]
    nothing = pd.DataFrame([(1, "all", "epsilon", 0.5)], columns=HISTORY)
    assert style.traffic_frame(nothing).empty and style.traffic_table(nothing).empty
    assert style.traffic_html(nothing) == "" and style.compression_html(nothing) == ""
    assert style.traffic_html(pd.DataFrame(columns=HISTORY)) == ""


# -- the bytes panel -------------------------------------------------------------------------------
def test_the_bytes_panel_draws_cumulative_bytes_and_the_float32_cost_per_platform():
    import matplotlib.pyplot as plt

    fig = style.traffic_figure(_sync_history())
    try:
        up, down = fig.axes
        assert up.get_ylabel().startswith("bytes sent by clients")
        assert down.get_ylabel().startswith("bytes sent to clients")
        assert up.get_xlabel() == "round"
        lines = {ln.get_label(): ln for ln in up.lines}
        assert set(lines) == {"android", "ios", "all", "_android as float32",
                              "_ios as float32", "_all as float32", style.FLOAT32_LEGEND}
        assert list(lines["android"].get_ydata()) == [2060.0, 4120.0, 6180.0]
        assert list(lines["_android as float32"].get_ydata()) == [8000.0, 16000.0, 24000.0]
        assert list(lines["_all as float32"].get_ydata()) == [16000.0, 32000.0, 48000.0]
        for plat in ("android", "ios", "all"):
            assert lines[plat].get_color() == style.PLATFORM_COLORS[plat]
            assert lines[f"_{plat} as float32"].get_color() == style.PLATFORM_COLORS[plat]
            assert lines[f"_{plat} as float32"].get_linestyle() == ":"
        assert list(lines["all"].get_xdata()) == [1, 2, 3]
        legend = [t.get_text() for t in up.get_legend().get_texts()]
        assert legend == ["android", "ios", "all", style.FLOAT32_LEGEND]
        assert down.get_legend() is None  # one legend: the colours are the same
    finally:
        plt.close(fig)
    old = style.traffic_figure(_sync_history(float32=False))
    try:
        assert {ln.get_label() for ln in old.axes[0].lines} == {"android", "ios", "all"}
        assert style.FLOAT32_LEGEND not in [t.get_text()
                                            for t in old.axes[0].get_legend().get_texts()]
    finally:
        plt.close(old)
    empty = style.traffic_figure(pd.DataFrame(columns=HISTORY))
    try:
        assert not empty.axes and "after round 1" in empty.texts[0].get_text()
    finally:
        plt.close(empty)


# -- the same history through the registry, the dashboard and the report ---------------------------
@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="squeezed", data_type="squeezed-data",
                       out_dir=tmp_path_factory.mktemp("traffic-export"), check_parity=False)
    bench = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("traffic") / "xfl",
                            port=0).start()
    bench.publish(res)
    try:
        yield bench
    finally:
        bench.stop()


def _session(wb, config: dict, rounds: list[list[tuple[str, str, float | None]]]) -> int:
    """A finished session whose rounds' metrics were added as the session process adds
    them (``Registry.add_metrics``, one call per round)."""
    reg = wb.registry
    sid = reg.create_session(reg.latest_model("squeezed"), config)
    for rnd, metrics in enumerate(rounds, start=1):
        reg.add_metrics(sid, rnd, metrics)
    reg.update_session(sid, status="finished", round=len(rounds))
    return sid


SYNC = {"rounds": 3, "strategy": "fedavg", "strategy_options": {},
        "compression": {"up": "int8", "down": "fp16"}}


def test_the_dashboard_and_report_show_the_bytes_and_ratio_of_a_synchronous_session(wb):
    session = wb.session(_session(wb, SYNC, [_round_metrics(INT8_ANDROID) + _evals(r)
                                             for r in (1, 2, 3)]))
    line = "android — up: 3.9× smaller (int8), down: 2.0× smaller (fp16)"
    html = report(session)._repr_html_()
    assert "class='xflwb-compression'" in html and line in html
    assert "bytes on the wire (totals so far)" in html
    assert "class='xflwb-traffic-plot' src='data:image/png;base64," in html
    assert "<td class='num'>3.9×</td>" in html  # the last round's table
    assert html.count("xflwb-compression") == 1  # in the header, not again in the panel
    dash = Dashboard(session)
    assert line in dash.header.value  # seen without a click: in the header
    assert dash.traffic in dash.widget.children
    assert "3.9× smaller (int8)" in dash.traffic.value
    assert "xflwb-traffic-plot" in dash.traffic.value
    children = list(dash.widget.children)
    assert children.index(dash.table) < children.index(dash.traffic) < children.index(
        dash.failures)


def test_an_older_history_without_the_float32_metrics_shows_bytes_only(wb):
    session = wb.session(_session(wb, {k: v for k, v in SYNC.items() if k != "compression"},
                                  [_round_metrics(INT8_ANDROID, float32=False) + _evals(r)
                                   for r in (1, 2)]))
    html = report(session)._repr_html_()
    assert "bytes on the wire (totals so far)" in html and "as float32" not in html
    assert "<td class='num'>16.5 kB</td>" in html  # iOS's bytes up over two rounds
    assert "xflwb-compression" not in html and "vs float32" not in html
    assert "×" not in html
    dash = Dashboard(session)
    assert "xflwb-compression" not in dash.header.value
    assert "16.5 kB" in dash.traffic.value and "vs float32" not in dash.traffic.value


def test_before_the_first_round_there_is_no_bytes_panel(wb):
    session = wb.session(_session(wb, SYNC, []))
    html = report(session)._repr_html_()
    assert "bytes on the wire" not in html and "xflwb-compression" not in html
    assert Dashboard(session).traffic.value == ""


def _arrival(version: int, platform: str, client: str, up: int, down: int,
             status: str = "applied") -> Arrival:
    return Arrival(version=version, platform=platform, client=client,
                   base_version=version - 1, staleness=0, weight=1.0, examples=30,
                   fit_seconds=0.5, seconds=1.5 * version, status=status,
                   reason="" if status == "applied" else "update norm above the bound",
                   bytes_up=up, bytes_down=down, bytes_up_float32=FLOAT32_BYTES,
                   bytes_down_float32=FLOAT32_BYTES)


#: float32 would have cost 4000 B each way per update (1000 parameters)
FLOAT32_BYTES = 4000


def _version_metrics(arrivals: list[Arrival]) -> list[tuple[str, str, float | None]]:
    """A FedBuff version's metrics as the loop makes them (``_arrival_metrics``: bytes and
    what float32 would have cost, per platform and for all arrivals)."""
    return _arrival_metrics(arrivals)


FEDBUFF = {"rounds": 10, "strategy": "fedbuff",
           "strategy_options": {"buffer_size": 2}, "compression": {"up": "topk:0.01",
                                                                   "down": "int8"}}


def test_a_fedbuff_session_shows_bytes_and_ratio_per_version(wb):
    # android: top-k 1 % (80 B up), int8 down (1012 B); iOS: float32 both ways (.npy)
    versions = [[_arrival(v, "android", f"a{v}", 80, 1012),
                 _arrival(v, "ios", f"i{v}", 4128, 4128)] for v in (1, 2, 3)]
    versions[2].append(_arrival(3, "android", "a9", 80, 1012, status="rejected"))
    session = wb.session(_session(wb, FEDBUFF, [_version_metrics(a) + _evals(v)
                                                for v, a in enumerate(versions, start=1)]))
    hist = session.history
    assert "version" in hist.columns
    summary = style.compression_summary(hist, FEDBUFF).set_index("platform")
    assert summary.at["android", "ratio_up"] == pytest.approx(4000 / 80)  # rejected too
    assert summary.at["android", "ratio_down"] == pytest.approx(4000 / 1012)
    assert summary.at["ios", "ratio_up"] == pytest.approx(4000 / 4128)
    html = report(session)._repr_html_()
    assert "android — up: 50.0× smaller (topk:0.01), down: 4.0× smaller (int8)" in html
    assert "ios — up: 1.0× (no saving), down: 1.0× (no saving)" in html
    assert "last version per platform (version 3)" in html and "<td class='num'>50.0×</td>" \
        in html
    fig = style.traffic_figure(hist)
    try:
        assert fig.axes[0].get_xlabel() == "model version"
        (rejected_too,) = [ln for ln in fig.axes[0].lines if ln.get_label() == "android"]
        assert list(rejected_too.get_ydata()) == [80.0, 160.0, 320.0]  # 2 arrivals in v3
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    dash = Dashboard(session)
    assert "50.0× smaller (topk:0.01)" in dash.header.value
    assert dash.traffic in dash.widget.children and dash.staleness in dash.widget.children


def test_the_header_line_is_html_escaped():
    cfg = {"rounds": 3, "compression": {"up": "<b>int8</b>", "down": "fp16"}}
    info = {"id": 1, "model_name": "m", "status": "running", "round": 3, "error": None,
            "ports": {}, "config": cfg}
    head = header_html(object(), info, _sync_history())
    assert "&lt;b&gt;int8&lt;/b&gt;" in head and "<b>int8</b>" not in head
    assert re.search(r"class='xflwb-compression'><b>compression vs float32:</b> android", head)


def test_a_session_that_compresses_nothing_shows_its_bytes_alone():
    """With float32 both ways (the float32 metrics recorded, no codec chosen) the header
    stays as it was and the table shows bytes, no float32 twin or ratio columns."""
    plain = {p: {"clients": 1.0, "up": 4128.0, "down": 4000.0, "up32": 4000.0,
                 "down32": 4000.0} for p in PLATFORMS}
    hist = _frame([_round_metrics(plain) + _evals(1)])
    assert style.compression_line(style.compression_summary(hist)) == ""
    assert style.compression_html(hist, {"compression": None}) == ""
    table = style.traffic_table(hist)
    assert list(table.columns) == ["platform", "bytes up", "bytes down"]
    # a codec chosen but negotiated by nobody: compared, since the researcher asked for it
    asked = {"compression": {"up": "int8", "down": "float32"}}
    assert set(style.traffic_table(hist, asked)["up vs float32"]) == {"1.0× (no saving)"}
    # a codec chosen but negotiated by nobody: said, since the researcher asked for it
    line = style.compression_line(style.compression_summary(
        hist, {"compression": {"up": "int8", "down": "float32"}}))
    assert line.startswith("android — up: 1.0× (no saving), down: 1.0× (no saving)")


# -- an experiment grid's comparison -------------------------------------------------------------
def test_the_experiment_comparison_puts_uplink_bytes_and_ratio_beside_accuracy():
    """``xflwb experiment run --grid compression=...``: the combined results (each run's
    history, long format, with the grid's column) plot each combination's uplink bytes
    per platform beside its final accuracy, labelled with the ratio against float32."""
    import matplotlib.pyplot as plt

    from xflwb.experiment import comparison_figure

    plain = {p: {"clients": 2.0, "up": 8256.0, "down": 8256.0, "up32": 8000.0,
                 "down32": 8000.0} for p in PLATFORMS}
    runs = []
    for i, (codec, per) in enumerate((("float32", plain), ("int8", INT8_ANDROID))):
        df = _frame([_round_metrics(per) + _evals(r) for r in (1, 2)])
        runs.append(df.assign(compression=codec, run=i))
    combined = pd.concat(runs, ignore_index=True)
    fig = comparison_figure(combined, ["compression"])
    try:
        acc, up = fig.axes
        assert acc.get_ylabel() == "final accuracy"
        assert "float32" in up.get_title()
        heights = {c.get_label(): [p.get_height() for p in c.patches] for c in up.containers}
        assert heights["android"] == [2 * 8256.0, 2 * 2060.0]  # float32 run, int8 run
        assert heights["ios"] == [2 * 8256.0, 2 * 8256.0]
        labels = {c.get_label(): t for c, t in zip(up.containers, [
            [x.get_text() for x in up.texts[i * 2:(i + 1) * 2]] for i in range(3)],
            strict=False)}
        assert labels["android"] == ["1.0×", "3.9×"] and labels["ios"] == ["1.0×", "1.0×"]
    finally:
        plt.close(fig)
    old = comparison_figure(combined[~combined["metric"].str.endswith("_float32")],
                            ["compression"])
    try:
        assert len(old.axes) == 2 and not old.axes[1].texts  # bytes, no ratio labels
        assert old.axes[1].get_title() == "uplink bytes per platform"
    finally:
        plt.close(old)
    no_bytes = comparison_figure(combined[~combined["metric"].str.startswith("bytes")],
                                 ["compression"])
    try:
        assert len(no_bytes.axes) == 1  # as before issue 23
    finally:
        plt.close(no_bytes)
