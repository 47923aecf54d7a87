"""tracking=: a real phone session (scripted wire phones over real gRPC, a real session
process) logs to TensorBoard event files and an MLflow store, read back with their own
readers and compared with ``session.history``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import keras
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import run_python
from tests.support import wait_until
from tests.wirephone import WirePhone
from xflwb import _options
from xflwb.server.config import SessionConfig
from xflwb.sessions.tracking import BACKENDS, normalize, store_uri
from xflwb.simulation.config import SimulationConfig

pytestmark = pytest.mark.timeout(300)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


class Delta:
    """update_fn: what it was sent plus a small step (clipped and noised by the server)."""

    def __init__(self, step: float) -> None:
        self.step = step

    def __call__(self, tensors, _round):
        return [t + self.step for t in tensors]


def _expected(history) -> dict[tuple[str, int], float]:
    """``session.history`` as {(platform/metric, round): value}: the first value of each."""
    out: dict[tuple[str, int], float] = {}
    for r in history.itertuples():
        if r.value is not None and not math.isnan(r.value):
            out.setdefault((f"{r.platform}/{r.metric}", int(r.round)), float(r.value))
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One DP session, 2 android wire phones, tracking both backends; the budget is spent
    after round 2 of 4 (so the last metrics reach the registry after the rounds: the
    close-time sync must carry them)."""
    tmp = tmp_path_factory.mktemp("tracking")
    res = xflwb.export(_model(), name="tracked", data_type="tracked-data", out_dir=tmp / "x",
                       platforms="android")
    wb = xflwb.Workbench(data_dir=tmp / "xfl", port=0, admin_token="secret").start()
    try:
        wb.publish(res)
        # z = 1, every client sampled: ε = 4.73 after round 1, 7.08 after 2, 9.01 after 3
        s = wb.train("tracked", rounds=4, min_clients=2, round_timeout=60,
                     privacy=xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0,
                                      max_epsilon=8.0),
                     tracking=["tensorboard", "mlflow"])
        phones = [WirePhone(wb.url, "android", "tracked-data", Delta(0.01 * (i + 1)),
                            num_examples=10 + i, device_id=70 + i, send_telemetry=False)
                  for i in range(2)]
        threads = [p.start() for p in phones]
        assert s.wait(timeout=120) == "finished", s.error
        for t in threads:
            t.join(30)
        yield {"session": s, "history": s.history, "info": s.info, "dir": tmp / "xfl",
               "checkpoint": Path(wb.registry.checkpoints_newest_first(
                   "tracked", session_id=s.id)[0]["path"])}
    finally:
        wb.stop()


def _scalars(logdir: Path) -> tuple[dict[tuple[str, int], float], object]:
    """{(tag, step): value} of the scalar summaries in ``logdir`` (as ``tf.summary.scalar``
    writes them: tensors with the scalars plugin's metadata), and the accumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.PluginTagToContent("scalars")
    return ({(tag, e.step): float(tensor_util.make_ndarray(e.tensor_proto))
             for tag in tags for e in acc.Tensors(tag)}, acc)


def test_tensorboard_event_files_hold_the_history_and_the_options(tracked):
    from tensorboard.plugins.hparams import plugin_data_pb2

    s = tracked["session"]
    got, acc = _scalars(tracked["dir"] / "tracking" / "tensorboard" / "tracked"
                        / f"session-{s.id}")
    want = _expected(tracked["history"])
    assert set(got) == set(want)
    for key, value in want.items():  # TensorBoard stores float32
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert {"all/epsilon", "android/examples", "android/bytes_up", "all/clients",
            "android/eval_loss", "android/rejected"} <= {tag for tag, _ in got}
    assert got[("all/privacy_budget_spent", 2)] == 1.0  # logged after the rounds ended
    assert got[("android/examples", 1)] == 21.0
    hp = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = hp.session_start_info.hparams
    assert values["rounds"].number_value == 4
    assert values["strategy"].string_value == "fedavg"
    assert values["privacy.max_epsilon"].number_value == 8.0
    assert values["tracking"].string_value == '["tensorboard", "mlflow"]'


def test_mlflow_run_holds_the_history_params_and_artifacts(tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    s = tracked["session"]
    uri = store_uri(tracked["dir"] / "tracking")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:  # the session process ends its run as it exits, a moment after "finished"
        wait_until(lambda: (lambda r: len(r) == 1 and r.iloc[0]["status"] == "FINISHED")(
                       mlflow.search_runs(experiment_names=["tracked"])),
                   60, "the MLflow run marked FINISHED")
        runs = mlflow.search_runs(experiment_names=["tracked"])
    finally:
        mlflow.set_tracking_uri(before)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == f"session-{s.id}"
    assert run["params.rounds"] == "4" and run["params.privacy.noise_multiplier"] == "1.0"
    assert run["tags.xflwb.session_id"] == str(s.id)
    want = _expected(tracked["history"])
    client = MlflowClient(tracking_uri=uri)
    got = {}
    for key in {k for k, _ in want}:
        for m in client.get_metric_history(run["run_id"], key):
            got[(key, m.step)] = m.value
    assert got == want
    assert run["metrics.all/epsilon"] == want[("all/epsilon", 2)]
    names = {a.path for a in client.list_artifacts(run["run_id"])}
    assert names == {"manifest.json", tracked["checkpoint"].name, "report.html"}
    local = Path(client.download_artifacts(run["run_id"], tracked["checkpoint"].name,
                                           str(tracked["dir"] / "dl")))
    assert local.read_bytes() == tracked["checkpoint"].read_bytes()
    report = Path(client.download_artifacts(run["run_id"], "report.html",
                                            str(tracked["dir"] / "dl")))
    text = report.read_text()
    assert "data:image/png;base64," in text
    assert "xflwb-traffic" in text  # the bytes on the wire panel, as on the dashboard


# -- the option ---------------------------------------------------------------------------
def test_tracking_option_is_declared_once_and_checked():
    for cls, kw in ((SessionConfig, {}), (SimulationConfig, {"android": 2})):
        assert cls(tracking="tensorboard", **kw).tracking == ["tensorboard"]
        assert cls(tracking="mlflow, tensorboard", **kw).tracking == ["mlflow", "tensorboard"]
        assert cls(tracking=["TensorBoard", "tensorboard"], **kw).tracking == ["tensorboard"]
        assert cls(**kw).tracking is None
        with pytest.raises(ValueError, match=r"did you mean 'tensorboard'\?"):
            cls(tracking="tensorbord", **kw)
        with pytest.raises(ValueError, match="tracking must be"):
            cls(tracking=3, **kw)
    rel = SessionConfig(tracking="tensorboard", tracking_dir="runs").tracking_dir
    assert Path(rel).is_absolute() and rel.endswith("runs")
    # the command line and magics: --tracking once per backend (or comma-separated)
    p = argparse.ArgumentParser()
    _options.add_arguments(p, SessionConfig)
    ns = p.parse_args(["--tracking", "tensorboard", "--tracking", "mlflow"])
    assert SessionConfig(**_options.given(ns, SessionConfig)).tracking == ["tensorboard",
                                                                         "mlflow"]


def test_mlflow_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if pip never installed it
    with pytest.raises(ValueError, match=r"pip install 'xflwb\[mlflow\]'"):
        SessionConfig(tracking=["tensorboard", "mlflow"])
    assert SessionConfig(tracking="tensorboard").tracking == ["tensorboard"]


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=30), st.lists(st.text(max_size=15), max_size=4),
                 st.integers(), st.dictionaries(st.text(max_size=5), st.text(max_size=5))))
def test_any_tracking_value_is_a_known_list_or_a_clear_error(value):
    """tracking arrives over HTTP: anything is a list of backends or a ValueError."""
    try:
        got = normalize(value)
    except ValueError as exc:
        assert "tracking" in str(exc)
    else:
        assert got is None or (got and set(got) <= set(BACKENDS))


def test_tensorboard_tracker_needs_no_tensorflow(tmp_path):
    """Session processes stay light: the event file is written without importing TF."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from xflwb.sessions.tracking import TensorBoard\n"
        "t = TensorBoard()\n"
        f"t.open(Path({str(tmp_path)!r}), None, {{'rounds': 2, 'privacy': None}},"
        " {'id': 1, 'model_name': 'm'})\n"
        "t.log_round(1, [('android', 'accuracy', 0.5), ('all', 'epsilon', None)])\n"
        "t.close('finished', {})\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "print('light')\n")
    assert "light" in run_python(code).stdout
    got, _ = _scalars(tmp_path / "tensorboard" / "m" / "session-1")
    assert got == {("android/accuracy", 1): 0.5}
