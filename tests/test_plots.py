"""Plots and tables look the same everywhere (issue 21, item 5): whole-number round ticks
even after one round, one panel size and one font size at any panel count, images sharp on
high-DPI screens and shown at their size, and one table look with blank missing cells."""

from __future__ import annotations

import re
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from xflwb import style
from xflwb.bridge.report import _table as export_table
from xflwb.widgets.dashboard import plot_png, round_table_html, snapshot_html, staleness_png


def _history(rounds: int, epsilon: bool = False) -> pd.DataFrame:
    rows = []
    for r in range(1, rounds + 1):
        for plat in ("android", "ios", "all"):
            rows += [(r, plat, "eval_loss", 2.3 / r), (r, plat, "accuracy", 0.1 * r),
                     (r, plat, "clients", 2.0), (r, plat, "bytes_up", 18150.0 * r)]
        if epsilon:
            rows.append((r, "all", "epsilon", 0.4 * r))
    return pd.DataFrame(rows, columns=["round", "platform", "metric", "value"])


def _arrivals() -> pd.DataFrame:
    return pd.DataFrame({"status": ["applied"] * 3, "platform": ["android", "ios", "ios"],
                         "staleness": [0, 0, 0]})


def _visible_ticks(axis, low: float, high: float) -> list[float]:
    return [t for t in axis.get_majorticklocs() if low <= t <= high]


@pytest.mark.parametrize("rounds", [1, 2, 3, 12])
def test_round_ticks_are_whole_numbers_even_after_one_round(rounds):
    for fig in (style.plot_figure(_history(rounds, epsilon=True)),
                style.traffic_figure(_compressed(rounds))):
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = _visible_ticks(ax.xaxis, *ax.get_xlim())
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        plt.close(fig)


def test_staleness_ticks_are_whole_numbers_with_a_single_staleness():
    fig = style.staleness_figure(_arrivals())
    fig.canvas.draw()
    (ax,) = fig.axes
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        ticks = _visible_ticks(axis, *lim)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def _compressed(rounds: int) -> pd.DataFrame:
    """A history with what float32 would have cost (issue 23): 3.9× fewer bytes up."""
    f32 = _history(rounds).query("metric == 'bytes_up'").assign(
        metric="bytes_up_float32", value=lambda d: d["value"] * 3.9)
    return pd.concat([_history(rounds), f32], ignore_index=True)


def _figures() -> dict[str, object]:
    return {"two panels": style.plot_figure(_history(3)),
            "three panels": style.plot_figure(_history(3, epsilon=True)),
            "staleness": style.staleness_figure(_arrivals()),
            "bytes": style.traffic_figure(_compressed(3))}


def test_one_font_size_in_every_panel_at_any_panel_count():
    for name, fig in _figures().items():
        fig.canvas.draw()
        sizes = {t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()
                 and t.get_visible()}
        assert sizes == {style.FONT_SIZE}, (name, sizes)
        plt.close(fig)


def test_every_panel_has_one_size_and_no_image_is_wider_than_two_panels():
    sizes = []
    for name, fig in _figures().items():
        w, h = fig.get_size_inches()
        # shown unscaled in a notebook: never wider than two panels (a three-panel row
        # was 12.75 in, shrunk to fit while the staleness plot was not)
        assert w <= 2 * style.PANEL_INCHES[0] + 1e-9, (name, w)
        for ax in fig.axes:
            box = ax.get_position()
            sizes.append((name, box.width * w, box.height * h))
        plt.close(fig)
    widths = [s[1] for s in sizes]
    heights = [s[2] for s in sizes]
    assert max(widths) / min(widths) < 1.25 and max(heights) / min(heights) < 1.25, sizes


def test_images_are_twice_their_displayed_size_and_shown_at_it():
    png = plot_png(_history(2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    assert width == 2 * style.png_css_width(png) == 2 * 2 * style.PANEL_INCHES[0] * 96
    shown = style.img_html(png)
    assert f"width='{width // 2}'" in shown and "max-width:100%" in shown
    assert staleness_png(_arrivals())[16:20] == int(style.PANEL_INCHES[0] * 96 * 2
                                                     ).to_bytes(4, "big")


def test_one_table_look_with_borders_right_aligned_numbers_and_blank_missing_cells():
    df = pd.DataFrame({"status": ["finished", None], "round": [0, np.nan],
                       "error": [pd.NA, "boom"], "seconds": [0.25, 1.5]})
    html = style.table_html(df)
    assert "NaN" not in html and "None" not in html and "<NA>" not in html
    assert "<td>finished</td><td class='num'>0</td>" in html  # no longer run together
    assert "<th class='num'>round</th>" in html and "<th>status</th>" in html
    assert "<td class='num'></td>" in html and "<td></td>" in html
    assert "border:1px solid" in style.TABLE_CSS
    # the widgets' tables, xflwb.report's and the export report's: the same look
    for shown in (round_table_html(_history(2)), export_table(df)):
        assert shown.startswith(style.TABLE_CSS) and "class='xflwb-table'" in shown
        assert not re.search(r">(NaN|None|nan)<", shown)


class _Session:
    """What ``snapshot_html`` reads of a session (a finished one, two rounds)."""

    info: ClassVar[dict] = {"id": 1, "model_name": "m", "status": "finished", "round": 2,
                            "error": None,
                            "ports": {"android": 1}, "config": {"rounds": 2}}
    history = _history(2)
    rejections = pd.DataFrame()
    failures = pd.DataFrame({"round": [1], "platform": ["ios"], "client": [None],
                             "reason": ["timeout"]})


def test_the_report_embeds_sharp_images_and_styled_tables_without_none():
    html = snapshot_html(_Session())
    assert "width='768'" in html and style.TABLE_CSS in html
    assert not re.search(r">(NaN|None|nan)<", html)
