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
