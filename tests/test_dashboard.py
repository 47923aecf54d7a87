"""The live dashboard observes a real session; the static report survives headless runs."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.wirephone import WirePhone
from xflwb.style import ACCURACY_LABEL, PLATFORM_COLORS
from xflwb.widgets.dashboard import (
    Dashboard,
    human_bytes,
    plot_figure,
    report,
    round_table_html,
)

pytestmark = pytest.mark.timeout(300)


def _update(tensors, _round):
    return [t + np.float32(0.01) for t in tensors]


def test_dashboard_follows_a_session_and_reports(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="dash", data_type="dash-data", out_dir=tmp_path / "e")
    with xflwb.Workbench(data_dir=tmp_path / "x", port=0) as wb:
        wb.publish(res)
        session = wb.train("dash", rounds=3, min_clients=2, round_timeout=60)
        dash = Dashboard(session, interval=0.2).start()
        assert dash.progress.max == 3 and dash.progress.value == 0
        phones = [WirePhone(wb.url, p, "dash-data", _update, device_id=i, eval_accuracy=0.5)
                  for i, p in enumerate(("android", "ios"))]
        threads = [p.start() for p in phones]
        assert session.wait(timeout=120) == "finished"
        for t in threads:
            t.join(30)
        dash._thread.join(10)
        assert not dash._thread.is_alive()  # the view stops once the session is done
        assert dash.progress.value == 3 and dash.progress.bar_style == "success"
        assert dash.progress.description == "round 3/3"
        assert "0 failed fits" in dash.header.value
        assert dash.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
        for plat in ("android", "ios", "all"):
            assert f"<td>{plat}</td>" in dash.table.value
        assert "finished" in dash.header.value
        bundle = dash._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        html = report(session)._repr_html_()
        assert "data:image/png;base64," in html and "last round per platform" in html
        assert "round 3/3" in html


def test_dashboard_says_when_it_stops_updating(tmp_path, monkeypatch):
    """A live view that can no longer read its session says why in its header instead of
    silently freezing."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    res = xflwb.export(model, name="gone", data_type="gone-data", out_dir=tmp_path / "e",
                       check_parity=False)
    with xflwb.Workbench(data_dir=tmp_path / "x", port=0) as wb:
        wb.publish(res)
        session = wb.train("gone", rounds=2, min_clients=2, round_timeout=60)
        dash = Dashboard(session, interval=0.2)

        def unreadable(_self):
            raise OSError("disk I/O error")

        monkeypatch.setattr(type(session), "history", property(unreadable))
        dash.start()
        dash._thread.join(10)
        assert not dash._thread.is_alive()
        assert "dashboard stopped updating: OSError: disk I/O error" in dash.header.value


def test_devices_magic_errors_are_short(ip):
    from xflwb.magics import XflMagicError

    with pytest.raises(XflMagicError, match="no xflwb backend is running"):
        ip.run_line_magic("xfl_devices", "spawn --android 1")
    with pytest.raises(XflMagicError, match="invalid choice: 'explode'"):
        ip.run_line_magic("xfl_devices", "explode")
    assert ip.run_line_magic("xfl_devices", "list") is None


# -- readable dashboard --------------------------------------------------------------------------
def _history(rounds: int) -> pd.DataFrame:
    rows = []
    for r in range(1, rounds + 1):
        for plat in ("android", "ios", "all"):
            rows += [(r, plat, "accuracy", 0.5 + r / 10), (r, plat, "eval_loss", 2.0 / r),
                     (r, plat, "clients", 2.0), (r, plat, "bytes_up", 18230.0),
                     (r, plat, "bytes_down", 2_500_000.0), (r, plat, "failures", 0.0)]
    return pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])


def test_plots_have_labels_integer_rounds_platform_colours_and_a_placeholder():
    import matplotlib.pyplot as plt

    fig = plot_figure(_history(3))
    try:
        loss, acc = fig.axes
        assert acc.get_ylabel() == ACCURACY_LABEL and acc.get_xlabel() == "round"
        assert "held-out" in loss.get_ylabel()
        fig.canvas.draw()
        ticks = [t for t in acc.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        colours = {line.get_label(): line.get_color() for line in acc.lines}
        assert colours == {p: PLATFORM_COLORS[p] for p in ("android", "ios", "all")}
    finally:
        plt.close(fig)
    empty = plot_figure(pd.DataFrame(columns=["round", "platform", "metric", "value"]))
    try:
        assert not empty.axes  # no empty axes before round 1, only a sentence
        assert "after round 1" in empty.texts[0].get_text()
    finally:
        plt.close(empty)


def test_a_private_run_plots_its_epsilon_ledger_beside_accuracy():
    import matplotlib.pyplot as plt

    hist = _history(3)
    ledger = pd.DataFrame([(r, "all", "epsilon", 0.4 * r) for r in (1, 2, 3)],
                          columns=hist.columns)
    fig = plot_figure(pd.concat([hist, ledger], ignore_index=True))
    try:
        assert len(fig.axes) == 3
        eps = fig.axes[2]
        assert "ε" in eps.get_ylabel()
        (line,) = eps.lines
        assert list(line.get_ydata()) == pytest.approx([0.4, 0.8, 1.2])
        assert line.get_color() == PLATFORM_COLORS["all"]
    finally:
        plt.close(fig)
    plain = plot_figure(hist)
    try:
        assert len(plain.axes) == 2  # no ε panel without a ledger
    finally:
        plt.close(plain)


def test_the_header_shows_the_privacy_spent_so_far():
    from xflwb.widgets.dashboard import header_html

    hist = pd.DataFrame([(1, "all", "epsilon", 0.5), (2, "all", "epsilon", 0.9)],
                        columns=["round", "platform", "metric", "value"])
    info = {"id": 3, "model_name": "m", "status": "running", "round": 2, "error": None,
            "ports": {"android": 1, "ios": 2},
            "config": {"rounds": 5, "privacy": {"noise_multiplier": 1.0, "target_delta": 1e-5,
                                                "max_epsilon": 2.0}}}
    head = header_html(object(), info, hist)
    assert "DP: ε = 0.9 at δ = 1e-05 (budget 2)" in head
    info["config"].pop("privacy")
    assert "DP:" not in header_html(object(), info, hist)


def test_round_table_is_human_readable():
    html = round_table_html(_history(2))
    assert ">metric<" not in html  # no stray header above the columns
    assert "<td class='num'>18.2 kB</td>" in html and "<td class='num'>2.5 MB</td>" in html
    assert "<td class='num'>2</td>" in html and "2.0" not in html  # counts as integers
    assert "<td>android</td>" in html
    assert "no data yet" in round_table_html(pd.DataFrame(
        columns=["round", "platform", "metric", "value"]))


def test_human_bytes_units():
    assert [human_bytes(v) for v in (0, 999, 1000, 18230, 999_999, 2_500_000, 3e9)] == [
        "0 B", "999 B", "1.0 kB", "18.2 kB", "1.0 MB", "2.5 MB", "3.0 GB"]
    assert human_bytes(None) == "" and human_bytes(float("nan")) == ""


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10**13))
def test_human_bytes_stays_within_rounding_of_the_value(n):
    number, unit = human_bytes(n).split(" ")
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    assert abs(float(number) * scale - n) <= 0.05 * scale + 1e-9
    assert unit == "GB" or float(number) < 1000
    assert np.isfinite(float(number))


# -- why a session ended (xflwb.sessions.ending), everywhere ---------------------------------------
def _row(status: str, round: int = 8, rounds: int = 8, error: str | None = None,
         **config) -> dict:
    return {"id": 7, "model_name": "m", "status": status, "round": round, "error": error,
            "ports": {}, "engine": "phones", "config": {"rounds": rounds, **config}}


def _spent_history(last: int = 6) -> pd.DataFrame:
    eps = [4.73, 7.08, 9.01, 10.7, 12.2, 7.08][:last]
    eps[-1] = 7.08
    rows = [(r, "all", "epsilon", e) for r, e in enumerate(eps, start=1)]
    rows += [(last, "all", "privacy_budget_spent", 1.0),
             (last, "all", "epsilon_next_round", 8.31)]
    return pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])


DP_CFG = {"privacy": {"noise_multiplier": 1.0, "clipping_norm": 1.0, "max_epsilon": 8.0,
                      "target_delta": 1e-5}}


def test_end_reason_of_each_ending():
    from xflwb.sessions.ending import end_reason

    assert end_reason(_row("running", 3)) is None
    assert end_reason(_row("starting", 0)) is None
    assert end_reason(_row("finished")) == "finished all 8 rounds"
    assert end_reason(_row("finished", 12, 12, strategy="fedbuff")) == \
        "finished all 12 model versions"
    assert end_reason(_row("finished", 5)) == "finished after 5 of 8 rounds"
    # the ledger refused round 7: the metrics say so, the row only says "finished"
    spent = _row("finished", 6, **DP_CFG)
    assert end_reason(spent, _spent_history()) == (
        "privacy budget spent at ε = 7.08 (max_epsilon 8) after round 6; round 7 would "
        "reach ε = 8.31")
    assert end_reason(spent, None) == "finished after 6 of 8 rounds"  # no metrics given
    # a resumed lineage already at its budget: no round of this session was released
    before = pd.DataFrame([(4, "all", "privacy_budget_spent", 1.0),
                           (4, "all", "epsilon_next_round", 8.2)],
                          columns=["round", "platform", "metric", "value"])
    assert end_reason(_row("finished", 0, **DP_CFG), before) == (
        "privacy budget spent before round 5 (max_epsilon 8); round 5 would reach ε = 8.2")
    assert end_reason(_row("failed", 2, error="every client of round 3 failed")) == \
        "failed: every client of round 3 failed"
    trace = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
             "ValueError: shapes (3,) and (4,) differ\n")
    assert end_reason(_row("failed", 2, error=trace)) == \
        "failed: ValueError: shapes (3,) and (4,) differ"
    assert end_reason(_row("failed", 2, error="first line\nsecond")) == "failed: first line …"
    assert end_reason(_row("failed", 2)) == "failed: no reason recorded"
    assert end_reason(_row("crashed", 1, error="session process 12 exited unexpectedly")) \
        == "crashed: session process 12 exited unexpectedly"
    assert end_reason(_row("stopped", 1)) == "stopped by the user"
    assert end_reason(_row("stopped", 1, error="the notebook kernel exited")) == \
        "stopped: the notebook kernel exited"
    assert len(end_reason(_row("failed", error="x" * 5000))) <= 210


class _Ended:
    """A session handle as the dashboard sees one: it says why it ended (the widgets ask
    the handle, they do not compute it)."""

    def __init__(self, info, history):
        from xflwb.sessions.ending import end_reason

        self.end_reason = end_reason(info, history)


def test_the_header_and_report_say_why_it_ended():
    from xflwb.widgets.dashboard import header_html

    spent = _row("finished", 6, **DP_CFG)
    head = header_html(_Ended(spent, _spent_history()), spent, _spent_history())
    assert "ended: privacy budget spent at ε = 7.08 (max_epsilon 8) after round 6" in head
    empty = pd.DataFrame(columns=["round", "platform", "metric", "value"])
    row = _row("failed", 2, error="every client failed")
    failed = header_html(_Ended(row, empty), row, empty)
    assert "ended: failed: every client failed" in failed
    assert failed.count("every client failed") == 1  # a one-line error is not repeated
    trace = "Traceback (most recent call last):\n  File x\nKeyError: 'w'"
    row = _row("failed", 2, error=trace)
    long = header_html(_Ended(row, empty), row, empty)
    assert "ended: failed: KeyError: &#x27;w&#x27;" in long and "File x" in long


# -- DP guidance ---------------------------------------------------------------------------------
def test_dp_noise_rule_compares_noise_with_the_largest_clipped_mean_update():
    from xflwb._dp_guidance import clients_per_round, noise_to_signal, noise_warning

    # z·√d/n: 650 parameters, z = 1, 4 clients → 6.37; 26 clients → 0.98
    assert noise_to_signal(1.0, 650, 4) == pytest.approx(650 ** 0.5 / 4)
    assert noise_to_signal(1.0, 650, 26) < 1 < noise_to_signal(1.0, 650, 25)
    cfg = {"rounds": 8, "min_clients": 4, **DP_CFG}
    warning = noise_warning(cfg, 650, None)
    assert warning is not None and "6.37×" in warning
    assert "more clients per round (at least 26)" in warning
    assert "lower noise_multiplier (below 0.157" in warning and "clipping_norm" in warning
    assert noise_warning({**cfg, "min_clients": 26}, 650, None) is None
    assert noise_warning({**cfg, "privacy": None}, 650, None) is None
    assert noise_warning(cfg, None, None) is None  # size unknown: no judgement
    # once rounds ran, the clients the rounds really averaged count, not min_clients
    ran = pd.DataFrame([(1, "all", "clients", 30.0), (1, "android", "clients", 15.0)],
                       columns=["round", "platform", "metric", "value"])
    assert clients_per_round(cfg, ran) == 30 and noise_warning(cfg, 650, ran) is None


def test_the_header_warns_when_the_noise_drowns_the_updates():
    from xflwb.widgets.dashboard import header_html

    class Handle:
        parameter_count = 650

    info = _row("running", 1, min_clients=4, **DP_CFG)
    hist = pd.DataFrame([(1, "all", "clients", 4.0)],
                        columns=["round", "platform", "metric", "value"])
    head = header_html(Handle(), info, hist)
    assert "xflwb-dp-warning" in head and "more clients per round" in head
    Handle.parameter_count = 10  # √10 / 4 < 1: the updates can be heard
    assert "xflwb-dp-warning" not in header_html(Handle(), info, hist)


def test_the_epsilon_panel_draws_the_budget_line():
    import matplotlib.pyplot as plt

    hist = _history(3)
    ledger = pd.DataFrame([(r, "all", "epsilon", 0.4 * r) for r in (1, 2, 3)],
                          columns=hist.columns)
    full = pd.concat([hist, ledger], ignore_index=True)
    fig = plot_figure(full, max_epsilon=8.0)
    try:
        eps = fig.axes[2]
        budget = [ln for ln in eps.lines if "budget" in ln.get_label()]
        assert len(budget) == 1 and list(budget[0].get_ydata()) == [8.0, 8.0]
        assert "max_epsilon 8" in budget[0].get_label()
        assert eps.get_ylim()[1] >= 8.0  # shown however little ε is spent yet
        assert not any("budget" in ln.get_label() for ax in fig.axes[:2] for ln in ax.lines)
    finally:
        plt.close(fig)
    plain = plot_figure(full)
    try:
        assert not any("budget" in ln.get_label() for ln in plain.axes[2].lines)
    finally:
        plt.close(plain)


# -- a real DP session that runs out of budget, and one stopped by the user ----------------------
def test_every_view_says_why_sessions_ended_and_a_displayed_dashboard_goes_live(tmp_path, ip):
    """2 of 2 clients, z = 1, δ = 1e-5: ε = 4.73, 7.08, then 9.01 > max_epsilon 8, so the
    session ends after round 2 of 5 — and the repr, ``session_table``, the report and a
    dashboard that was only displayed say so."""
    from IPython.display import display

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="why", data_type="why-data", out_dir=tmp_path / "e")
    with xflwb.Workbench(data_dir=tmp_path / "x", port=0) as wb:
        wb.publish(res)
        session = wb.train("why", rounds=5, min_clients=2, round_timeout=60,
                           privacy=xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0,
                                            max_epsilon=8.0))
        shown = Dashboard(session, interval=0.2)
        returned = Dashboard(session, interval=0.2)
        assert shown._thread is None and returned._thread is None  # not live until shown
        display(shown)  # display(dash) ...
        ip.user_ns["_xflwb_dash"] = returned
        ip.run_cell("_xflwb_dash")  # ... or returned from a cell
        assert shown._thread is not None and returned._thread is not None
        first = shown._thread
        display(shown)  # shown twice: still one poller
        assert shown._thread is first
        phones = [WirePhone(wb.url, p, "why-data", _update, device_id=i, eval_accuracy=0.5)
                  for i, p in enumerate(("android", "ios"))]
        threads = [p.start() for p in phones]
        assert session.wait(timeout=120) == "finished"
        for t in threads:
            t.join(30)
        reason = ("privacy budget spent at ε = 7.08 (max_epsilon 8) after round 2; round 3 "
                  "would reach ε = 9.01")
        assert session.end_reason == reason
        for dash in (shown, returned):
            dash._thread.join(10)
            assert not dash._thread.is_alive()  # it stops with its session ...
            assert dash.progress.description == "round 2/5"  # ... after the final state
            assert f"ended: {reason}" in dash.header.value
        assert f"end_reason={reason!r}" in repr(session)
        assert f"ended: {reason}" in report(session)._repr_html_()
        assert session.parameter_count == 16 * 3 + 3
        remote = xflwb.AdminClient(wb.url, wb.admin_token).session(session.id)
        assert remote.end_reason == reason and repr(remote).endswith(f", {reason})")

        stopped = wb.train("why", rounds=5, min_clients=2, round_timeout=60)
        assert stopped.end_reason is None and "end_reason" not in repr(stopped)
        stopped.stop()
        assert stopped.end_reason == "stopped by the user"
        assert "end_reason='stopped by the user'" in repr(stopped)
        table = wb.session_table.set_index("id")
        assert table.loc[session.id, "end_reason"] == reason
        assert table.loc[stopped.id, "end_reason"] == "stopped by the user"
        assert list(table.columns[:5]) == ["model", "status", "round", "rounds", "end_reason"]
