"""The live dashboard observes a real session; the static report survives headless runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import xflwb
from tests.wirephone import WirePhone
from xflwb.widgets.dashboard import Dashboard, report

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
        assert dash.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
        for plat in ("android", "ios", "all"):
            assert f"<td>{plat}</td>" in dash.table.value
        assert "finished" in dash.header.value
        bundle = dash._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        html = report(session)._repr_html_()
        assert "data:image/png;base64," in html and "last round per platform" in html
        assert "round 3/3" in html


def test_devices_magic_errors_are_short(ip, capsys):
    ip.run_line_magic("xfl_devices", "spawn --android 1")
    assert "no xflwb backend is running" in capsys.readouterr().out
    ip.run_line_magic("xfl_devices", "explode")
    assert "invalid choice: 'explode'" in capsys.readouterr().out
    assert ip.run_line_magic("xfl_devices", "list") is None
