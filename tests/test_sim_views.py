"""Issue 24's outputs where the researcher looks: curves against simulated time (in the unit
that reads best), participation per platform (selected, kept, stragglers, drop-outs,
available) and accuracy across clients (the last evaluated round's ECDF, p10/p50/p90 and
worst-decile lines) — in ``xflwb.style``, the dashboard, ``xflwb.report``, the tracked
report.html and the experiment comparison; and histories without these metrics (phone
sessions, older simulations) render as before.

Histories are stored through ``Registry.add_metrics`` and read back by the real session
handle, in the shape the session processes write them (metric names: SPEC of issue 24)."""

from __future__ import annotations

import re

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from xflwb import style
from xflwb.experiment import comparison_figure, sim_curves
from xflwb.sessions.tracking import report_html
from xflwb.widgets.dashboard import Dashboard, plot_png, report, round_table

pytestmark = pytest.mark.timeout(300)
HISTORY = ["round", "platform", "metric", "value"]
PLATFORMS = ("android", "ios")
CLIENT_COLUMNS = ["round", "platform", "client", "examples", "loss", "accuracy"]


# -- histories in the shape the virtual clock's rounds write them ------------------------------
#: per round and platform: available, selected, kept (clients), stragglers, dropouts
PARTICIPATION = {1: {"android": (40, 6, 4, 1, 1), "ios": (30, 4, 3, 1, 0)},
                 2: {"android": (35, 6, 5, 0, 1), "ios": (20, 4, 2, 2, 0)},
                 3: {"android": (50, 6, 4, 2, 0), "ios": (25, 4, 4, 0, 0)}}
#: the virtual clock at each round's end (seconds): 3 h in all, so hours
SIM_SECONDS = {1: 3000.0, 2: 7000.0, 3: 10800.0}
QUANT = {"accuracy_p10": 0.2, "accuracy_p50": 0.5, "accuracy_p90": 0.8,
         "accuracy_worst10": 0.1}


def _evals(rnd: int) -> list[tuple[str, str, float]]:
    return [(p, m, v) for p in (*PLATFORMS, "all")
            for m, v in (("eval_loss", 2.0 / rnd), ("accuracy", 0.3 + rnd / 10))]


def _quantiles(rnd: int) -> list[tuple[str, str, float]]:
    """FAIR's per-platform percentiles: android better than ios, all between, rising."""
    shift = {"android": 0.05, "ios": -0.05, "all": 0.0}
    out = [(p, m, v + shift[p] + rnd / 100) for p in (*PLATFORMS, "all")
           for m, v in QUANT.items()]
    return out + [(p, "eval_clients", 10.0 + rnd) for p in (*PLATFORMS, "all")]


def _sim_round(rnd: int, quantiles: bool = True) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = [
        ("all", "sim_seconds", SIM_SECONDS[rnd]),
        ("all", "round_sim_seconds", SIM_SECONDS[rnd] - SIM_SECONDS.get(rnd - 1, 0.0))]
    kept = 0.0
    for plat, (avail, sel, clients, strag, drop) in PARTICIPATION[rnd].items():
        out += [(plat, "available", avail), (plat, "selected", sel),
                (plat, "clients", clients), (plat, "stragglers", strag),
                (plat, "dropouts", drop)]
        kept += clients
    out += [("all", "clients", kept), ("all", "failures", 0.0)]
    return out + _evals(rnd) + (_quantiles(rnd) if quantiles else [])


def _old_round(rnd: int) -> list[tuple[str, str, float]]:
    """What a phone session (or a simulation before issue 24) records."""
    return [(p, "clients", 2.0) for p in PLATFORMS] + [("all", "clients", 4.0),
                                                        ("all", "failures", 0.0)] + _evals(rnd)


def _frame(rounds: list[list[tuple[str, str, float]]]) -> pd.DataFrame:
    return pd.DataFrame([(r, p, m, v) for r, metrics in enumerate(rounds, start=1)
                         for p, m, v in metrics], columns=HISTORY)


def _sim_history(quantiles: bool = True) -> pd.DataFrame:
    return _frame([_sim_round(r, quantiles) for r in (1, 2, 3)])


def _old_history() -> pd.DataFrame:
    return _frame([_old_round(r) for r in (1, 2, 3)])


def _clients(seed: int = 0, rounds: int = 3, n: int = 12) -> pd.DataFrame:
    """``session.client_metrics``: one row per client evaluation; some clients report no
    accuracy (NaN), and the last round only losses (its accuracies all NaN)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(1, rounds + 1):
        for c in range(n):
            acc = float(rng.uniform(0, 1)) if r < rounds and c % 5 else float("nan")
            rows.append((r, PLATFORMS[c % 2], str(c), 20, float(rng.uniform(0, 2)), acc))
    return pd.DataFrame(rows, columns=CLIENT_COLUMNS)


# -- simulated time -------------------------------------------------------------------------------
@pytest.mark.parametrize(("seconds", "unit", "scale"), [
    (0.0, "s", 1.0), (90.0, "s", 1.0), (120.0, "s", 1.0), (121.0, "min", 60.0),
    (7200.0, "min", 60.0), (7201.0, "h", 3600.0), (86400.0 * 3, "h", 3600.0)])
def test_simulated_time_picks_its_unit(seconds, unit, scale):
    assert style.sim_unit(seconds) == (scale, unit)
    assert style.sim_label(seconds) == f"simulated time ({unit})"


def test_the_curves_are_drawn_against_simulated_time_with_the_rounds_on_top():
    hist = _sim_history()
    assert style.sim_seconds(hist) == SIM_SECONDS
    assert style.default_x(hist) == "sim"
    fig = style.plot_figure(hist, x="sim")
    try:
        loss, acc = fig.axes[:2]
        assert acc.get_xlabel() == "simulated time (h)"
        lines = {ln.get_label(): ln for ln in acc.lines}
        assert set(lines) == {"android", "ios", "all"}
        np.testing.assert_allclose(lines["all"].get_xdata(),
                                   [s / 3600 for s in SIM_SECONDS.values()])
        np.testing.assert_allclose(lines["android"].get_ydata(), [0.4, 0.5, 0.6])
        assert lines["ios"].get_color() == style.PLATFORM_COLORS["ios"]
        # the round each point ended: a top axis on each panel
        tops = loss.child_axes + acc.child_axes
        assert len(tops) == 2 and {a.get_xlabel() for a in tops} == {"round"}
        fig.canvas.draw()
        top = acc.child_axes[0]  # a round's tick stands at its simulated time
        ticks = [t for t in top.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
        for rnd, seconds in SIM_SECONDS.items():
            np.testing.assert_allclose(top.transData.transform((rnd, 0))[0],
                                       acc.transData.transform((seconds / 3600, 0))[0])
    finally:
        plt.close(fig)
    minutes = _frame([[("all", "sim_seconds", 60.0 * r), *_evals(r)] for r in (1, 2, 3)])
    fig = style.plot_figure(minutes, x="sim")
    try:
        assert fig.axes[1].get_xlabel() == "simulated time (min)"
        np.testing.assert_allclose(fig.axes[1].lines[0].get_xdata(), [1.0, 2.0, 3.0])
    finally:
        plt.close(fig)


def test_a_history_without_simulated_time_plots_against_rounds_as_before():
    hist = _old_history()
    assert style.sim_seconds(hist) == {} and style.default_x(hist) == "round"
    assert style.default_x(hist.assign(version=hist["round"])) == "version"
    fig = style.plot_figure(hist)
    try:
        assert [a.get_xlabel() for a in fig.axes] == ["round", "round"]
        assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2, 3]
    finally:
        plt.close(fig)
    asked = style.plot_figure(hist, x="sim")  # asked for anyway: says so, no crash
    try:
        assert "no simulated time recorded" in [t.get_text() for t in asked.axes[0].texts]
    finally:
        plt.close(asked)


# -- participation ------------------------------------------------------------------------------
def test_participation_per_platform_equals_the_counts_and_all_is_their_sum():
    frame = style.participation_frame(_sim_history())
    counts = np.array([[PARTICIPATION[r][p] for p in PLATFORMS] for r in (1, 2, 3)], float)
    names = ["available", "selected", "clients", "stragglers", "dropouts"]
    assert list(frame.columns) == names
    for j, plat in enumerate(PLATFORMS):
        np.testing.assert_array_equal(frame.xs(plat, level="platform").to_numpy(),
                                      counts[:, j, :])
    # "all" records only clients: the rest is the platforms' sum
    np.testing.assert_array_equal(frame.xs("all", level="platform").to_numpy(),
                                  counts.sum(axis=1))
    table = style.participation_table(_sim_history()).set_index("platform")
    assert list(table.index) == ["android", "ios", "all"]
    totals = counts.sum(axis=0)  # platform × metric, over rounds
    for j, plat in enumerate((*PLATFORMS, "all")):
        ref = totals[j] if plat != "all" else totals.sum(axis=0)
        assert table.at[plat, "selected"] == ref[1] and table.at[plat, "kept"] == ref[2]
        assert table.at[plat, "stragglers"] == ref[3]
        assert table.at[plat, "dropouts"] == ref[4]
        assert table.at[plat, "kept share"] == f"{ref[2] / ref[1]:.0%}"
        avail = counts[:, j, 0] if plat != "all" else counts[:, :, 0].sum(axis=1)
        assert table.at[plat, "available (mean per round)"] == pytest.approx(avail.mean())
        assert table.at[plat, "rounds"] == 3
    html = style.participation_html(_sim_history())
    assert "participation per platform" in html and "<td class='num'>72%</td>" in html


def test_a_history_without_participation_counts_shows_no_panel():
    for hist in (_old_history(), pd.DataFrame(columns=HISTORY)):
        assert style.participation_frame(hist).empty
        assert style.participation_table(hist).empty
        assert style.participation_html(hist) == ""
    # FedBuff on the virtual clock records drop-outs only: the panel has what there is
    fb = _frame([[("android", "dropouts", 1.0), ("ios", "dropouts", 2.0),
                  ("all", "clients", 4.0)]] * 2).assign(version=lambda d: d["round"])
    table = style.participation_table(fb).set_index("platform")
    assert list(table.columns) == ["rounds", "kept", "dropouts"]
    assert table.at["ios", "dropouts"] == 4 and table.at["all", "dropouts"] == 6
    assert "<th class='num'>versions</th>" in style.participation_html(fb, "version")


def test_the_last_round_table_counts_participation_only_where_recorded():
    cols = round_table(_sim_history()).set_index("platform")
    assert cols.at["ios", "selected"] == 4 and cols.at["android", "stragglers"] == 2
    assert cols.at["android", "available"] == 50
    assert cols.at["all", "selected"] == 10 and cols.at["all", "available"] == 75  # the sum
    old = round_table(_old_history())
    assert not {"selected", "stragglers", "dropouts", "available"} & set(old.columns)


# -- fairness -------------------------------------------------------------------------------------
_acc = st.one_of(st.floats(0, 1), st.just(float("nan")))


@settings(max_examples=25, deadline=None)
@given(acc=st.lists(st.tuples(st.sampled_from(PLATFORMS), _acc), min_size=1, max_size=40))
def test_the_ecdf_of_client_accuracies_equals_numpy(acc):
    """The ECDF panel's step lines, per platform and for all clients: the sorted accuracies
    of the last round in which any client reported one (NaN rows skipped), at i/n."""
    rows = [(2, p, str(i), 10, 0.5, a) for i, (p, a) in enumerate(acc)]
    rows += [(1, "android", "x", 10, 0.5, 0.99)]  # an earlier round: never in the ECDF
    cm = pd.DataFrame(rows, columns=CLIENT_COLUMNS)
    values = np.array([a for _p, a in acc], float)
    plats = np.array([p for p, _a in acc])
    last, shown = style.last_client_accuracies(cm)
    rated = ~np.isnan(values)
    assert last == (2 if rated.any() else 1)
    assert (shown["round"] == last).all() and shown["accuracy"].notna().all()
    assert len(shown) == (rated.sum() if rated.any() else 1)
    fig = style.fairness_figure(_old_history(), cm)
    try:
        ax = fig.axes[0]
        lines = {ln.get_label().split(" (")[0]: ln for ln in ax.lines}
        if last == 1:
            assert set(lines) == {"android"} and list(lines["android"].get_xdata()) == [0.99]
            return
        found = sorted(set(plats[rated]))
        assert set(lines) == set(found) | ({"all"} if len(found) > 1 else set())
        for plat, line in lines.items():
            pick = rated & ((plats == plat) | (plat == "all"))
            ref = np.sort(values[pick])
            np.testing.assert_array_equal(line.get_xdata(), ref)
            np.testing.assert_allclose(line.get_ydata(), np.arange(1, len(ref) + 1) / len(ref))
            assert line.get_drawstyle() == "steps-post"
            assert line.get_label() == f"{plat} ({len(ref)})"
        xs, ys = style.ecdf(values)
        np.testing.assert_array_equal(xs, np.sort(values[rated]))
        np.testing.assert_allclose(ys, np.arange(1, rated.sum() + 1) / rated.sum())
        assert ax.get_xlabel().endswith(", round 2)")
    finally:
        plt.close(fig)


def test_the_percentile_lines_per_platform_follow_the_history():
    hist = _sim_history()
    fig = style.fairness_figure(hist, _clients())
    try:
        ecdf_ax, *plat_axes = fig.axes
        assert ecdf_ax.get_xlabel() == "client accuracy (held-out data, round 2)"
        assert [a.get_title() for a in plat_axes] == [
            "android: accuracy across clients", "ios: accuracy across clients",
            "all: accuracy across clients"]
        android = {ln.get_label(): ln for ln in plat_axes[0].lines}
        assert set(android) == {"p90", "median", "p10", "worst 10 %"}
        np.testing.assert_allclose(android["worst 10 %"].get_ydata(),
                                   [0.1 + 0.05 + r / 100 for r in (1, 2, 3)])
        assert android["p10"].get_color() == style.PLATFORM_COLORS["android"]
        assert list(android["median"].get_xdata()) == [1, 2, 3]
        assert plat_axes[0].collections  # the p10–p90 band
        assert plat_axes[1].get_legend() is None  # one legend of the line styles
        assert [t.get_text() for t in plat_axes[0].get_legend().get_texts()] == [
            "p90", "median", "p10", "worst 10 %"]
        assert len({a.get_ylim() for a in plat_axes}) == 1  # one accuracy scale
    finally:
        plt.close(fig)
    table = style.fairness_table(hist).set_index("platform")
    assert table.at["ios", "worst 10 %"] == pytest.approx(0.1 - 0.05 + 0.03)
    assert table.at["all", "clients evaluated"] == 13 and table.at["all", "round"] == 3
    assert list(table.columns) == ["round", "clients evaluated", "worst 10 %", "p10",
                                   "median", "p90"]


def test_the_fairness_panel_shows_what_exists_and_nothing_without_it():
    assert style.fairness_figure(_old_history()) is None
    for cm in (None, pd.DataFrame(columns=CLIENT_COLUMNS), _clients().assign(accuracy=np.nan)):
        assert style.fairness_html(_old_history(), cm) == ""
    only_ecdf = style.fairness_figure(_old_history(), _clients())
    try:
        assert len(only_ecdf.axes) == 1
    finally:
        plt.close(only_ecdf)
    html = style.fairness_html(_sim_history(quantiles=True))
    assert "accuracy across clients" in html and "xflwb-fairness-plot" in html
    assert "<th class='num'>worst 10 %</th>" in html
    fb = _sim_history().assign(version=lambda d: d["round"])
    assert "<th class='num'>version</th>" in style.fairness_html(fb)


# -- experiments ----------------------------------------------------------------------------------
def _results(sim: bool) -> pd.DataFrame:
    frames = []
    for run, deadline in enumerate((60, 600)):
        hist = _sim_history() if sim else _old_history()
        if sim:  # the slower deadline takes twice as long
            slow = (hist["metric"] == "sim_seconds") & (deadline == 600)
            hist.loc[slow, "value"] *= 2
        frames.append(hist.assign(deadline=deadline, run=run))
    return pd.concat(frames, ignore_index=True)


def test_the_experiment_comparison_adds_accuracy_against_simulated_time():
    df = _results(sim=True)
    curves = sim_curves(df, ["deadline"], "accuracy")
    assert list(curves) == ["deadline=60", "deadline=600"]
    assert curves["deadline=600"][0] == [2 * s for s in SIM_SECONDS.values()]
    assert curves["deadline=60"][1] == pytest.approx([0.4, 0.5, 0.6])
    fig = comparison_figure(df, ["deadline"])
    try:
        timed = fig.axes[-1]
        assert timed.get_xlabel() == "simulated time (h)"
        assert [ln.get_label() for ln in timed.lines] == ["deadline=60", "deadline=600"]
        np.testing.assert_allclose(timed.lines[1].get_xdata(),
                                   [2 * s / 3600 for s in SIM_SECONDS.values()])
    finally:
        plt.close(fig)
    old = _results(sim=False)
    assert sim_curves(old, ["deadline"], "accuracy") == {}
    fig = comparison_figure(old, ["deadline"])
    try:
        assert len(fig.axes) == 1 and "simulated" not in fig.axes[0].get_xlabel()
    finally:
        plt.close(fig)


# -- the registry, the handle, the dashboard and the reports --------------------------------------
@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="timed", data_type="timed-data",
                       out_dir=tmp_path_factory.mktemp("sim-views-export"), check_parity=False)
    bench = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("sim-views") / "xfl",
                            port=0).start()
    bench.publish(res)
    try:
        yield bench
    finally:
        bench.stop()


SIMULATION = {"rounds": 3, "strategy": "fedavg", "strategy_options": {},
              "engine": "simulation", "android": 50, "ios": 50}
PHONES = {"rounds": 3, "strategy": "fedavg", "strategy_options": {}}


def _session(wb, config: dict, rounds: list[list[tuple[str, str, float]]]) -> int:
    """A finished session whose rounds' metrics were added as the session process adds them."""
    reg = wb.registry
    sid = reg.create_session(reg.latest_model("timed"), config)
    for rnd, metrics in enumerate(rounds, start=1):
        reg.add_metrics(sid, rnd, metrics)
    reg.update_session(sid, status="finished", round=len(rounds))
    return sid


class _WithClientMetrics:
    """A session handle that also has ``client_metrics`` (the property issue 24 adds to
    ``Session``; until then the views must work with or without it)."""

    def __init__(self, session, frame) -> None:
        self._session = session
        self.client_metrics = frame

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_the_report_and_dashboard_of_a_simulation_show_time_participation_and_fairness(wb):
    session = wb.session(_session(wb, SIMULATION, [_sim_round(r) for r in (1, 2, 3)]))
    html = report(_WithClientMetrics(session, _clients()))._repr_html_()
    assert "participation per platform (totals so far)" in html
    assert "class='xflwb-fairness-plot' src='data:image/png;base64," in html
    for share in ("72%", "75%", "73%"):  # kept ÷ selected: android 13/18, ios 9/12, all
        assert f"<td class='num'>{share}</td>" in html
    assert html.index("xflwb-fairness") < html.index("last round per platform") < html.index(
        "xflwb-participation")
    # the same curves as plot_figure draws against simulated time, embedded first
    assert style.img_html(plot_png(session.history, x="sim")) in html
    dash = Dashboard(_WithClientMetrics(session, _clients()))
    assert dash.axis is not None and dash.axis.value == "sim"
    assert dash.axis.layout.display is None  # shown once simulated time is recorded
    assert [v for _label, v in dash.axis.options] == ["round", "sim"]
    assert dash.plot.value == plot_png(session.history, x="sim")
    assert "xflwb-fairness-plot" in dash.fairness.value
    assert "participation per platform" in dash.participation.value
    assert len(dash.widget.children) == 11  # + the x axis toggle of a simulation
    dash.axis.value = "round"  # the toggle redraws against rounds at once
    assert dash.plot.value == plot_png(session.history, x="round")
    # the handle without per-client evaluations (or with none yet): percentiles only
    for handle in (session, _WithClientMetrics(session, pd.DataFrame(columns=CLIENT_COLUMNS))):
        plain = Dashboard(handle)
        assert "xflwb-fairness-plot" in plain.fairness.value
        assert "<th class='num'>p90</th>" in plain.fairness.value


def test_an_older_simulation_and_a_phone_session_render_as_before(wb):
    for config in (SIMULATION, PHONES):
        session = wb.session(_session(wb, config, [_old_round(r) for r in (1, 2, 3)]))
        html = report(session)._repr_html_()
        for absent in ("participation", "accuracy across clients", "xflwb-fairness",
                       "simulated time"):
            assert absent not in html
        assert style.img_html(plot_png(session.history, x="round")) in html
        dash = Dashboard(session)
        assert dash.plot.value == plot_png(session.history, x="round")
        assert dash.fairness.value == "" and dash.participation.value == ""
        if config is PHONES:
            assert dash.axis is None and len(dash.widget.children) == 10
        else:  # a simulation's toggle waits, hidden, for simulated time that never comes
            assert dash.axis is not None and dash.axis.layout.display == "none"
            assert dash.axis.value == "round"


def test_the_tracked_report_has_the_new_sections_only_with_their_data(wb):
    timed = _session(wb, SIMULATION, [_sim_round(r) for r in (1, 2, 3)])
    html = report_html(wb.registry, timed)
    assert "participation per platform" in html and "xflwb-fairness-plot" in html
    png = plot_png(wb.session(timed).history, x="sim")
    assert style.img_html(png) in html
    old = report_html(wb.registry, _session(wb, SIMULATION, [_old_round(r) for r in (1, 2)]))
    assert "participation" not in old and "xflwb-fairness" not in old
    assert not re.search(r">(NaN|None|nan)<", html + old)


def test_the_new_figures_keep_one_font_size_and_one_panel_size():
    """The look of every other plot (tests/test_plots.py): one font size, panels of one
    size, never wider than two panels."""
    from matplotlib.text import Text

    figures = {"against simulated time": style.plot_figure(_sim_history(), x="sim"),
               "fairness": style.fairness_figure(_sim_history(), _clients())}
    sizes = []
    for name, fig in figures.items():
        fig.canvas.draw()
        fonts = {t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()
                 and t.get_visible()}
        assert fonts == {style.FONT_SIZE}, (name, fonts)
        w, h = fig.get_size_inches()
        assert w <= 2 * style.PANEL_INCHES[0] + 1e-9, (name, w)
        sizes += [(ax.get_position().width * w, ax.get_position().height * h)
                  for ax in fig.axes]
        plt.close(fig)
    widths, heights = zip(*sizes, strict=True)
    assert max(widths) / min(widths) < 1.25 and max(heights) / min(heights) < 1.25, sizes


def test_a_fedbuff_simulation_offers_simulated_time_beside_versions_and_wall_time(wb):
    config = {**SIMULATION, "strategy": "fedbuff",
              "strategy_options": {"buffer_size": 2, "max_versions": 3}}
    versions = [[("all", "seconds", 0.5 * v), ("all", "sim_seconds", 40.0 * v),
                 ("android", "dropouts", 1.0), ("all", "clients", 2.0), *_evals(v)]
                for v in (1, 2, 3)]
    session = wb.session(_session(wb, config, versions))
    dash = Dashboard(session)
    assert [v for _label, v in dash.axis.options] == ["version", "seconds", "sim"]
    assert dash.axis.value == "sim" and dash.axis.layout.display is None
    assert dash.plot.value == plot_png(session.history, x="sim")
    fig = style.plot_figure(session.history, x="sim")
    try:  # 2 minutes in all: seconds, with the model versions on top
        assert fig.axes[1].get_xlabel() == "simulated time (s)"
        assert fig.axes[1].child_axes[0].get_xlabel() == "model version"
    finally:
        plt.close(fig)
    assert "<th class='num'>versions</th>" in dash.participation.value
    html = report(session)._repr_html_()
    assert style.img_html(plot_png(session.history, x="sim")) in html
    assert "last version per platform" in html


@settings(max_examples=40, deadline=None)
@given(acc=st.lists(st.floats(0, 1), min_size=1, max_size=12),
       step=st.lists(st.floats(0.1, 5000), min_size=12, max_size=12),
       target=st.floats(0, 1))
def test_time_to_accuracy_is_the_clock_at_the_first_round_that_reached_it(acc, step, target):
    clock = np.cumsum(step[:len(acc)])
    hist = _frame([[("all", "sim_seconds", float(t)), ("all", "accuracy", a),
                    ("ios", "accuracy", 0.0)] for t, a in zip(clock, acc, strict=True)])
    reached = np.flatnonzero(np.array(acc) >= target)
    want = float(clock[reached[0]]) if len(reached) else None
    assert style.time_to_accuracy(hist, target) == want
    assert style.time_to_accuracy(hist, 0.5, "ios") is None  # never reached
    assert style.time_to_accuracy(_old_history(), 0.0) is None  # no simulated time
