"""Issue 21, item 3: export warnings that save a week, and a report that fits on a screen.

A model that cannot learn (a frozen backbone whose output is constant, a loss one step cannot
move) or a ``data_type`` naming a registered dataset the model cannot train on warns at
export (``xflwb.ExportWarning``, listed in the report); such a dataset is refused at spawn
before any device starts. The report collapses frozen blocks, counts frozen parameters and
shows no frozen digest when nothing is frozen.
"""

from __future__ import annotations

import gc
import re
import warnings

import keras
import numpy as np
import psutil
import pytest

import xflwb
from xflwb.bridge import graph as graph_mod
from xflwb.bridge import health
from xflwb.devices.datasets import IncompatibleData
from xflwb.devices.fleet import Fleet, check_spawn

pytestmark = pytest.mark.timeout(300)


def _export(model, tmp_path, name, **kw):
    """Export (Android only: cheap) recording every warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = xflwb.export(model, name=name, out_dir=tmp_path, platforms="android", **kw)
    return res, [w for w in caught if issubclass(w.category, xflwb.ExportWarning)]


def _frozen_zero_backbone(seed: int = 0) -> keras.Model:
    """A frozen Dense with an all-zero kernel and bias feeding a trainable head: the
    backbone maps every input to 0, as a random ``weights=None`` MobileNetV2 nearly does."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    frozen = keras.layers.Dense(4, activation="relu", name="backbone",
                                kernel_initializer="zeros", trainable=False)
    h = frozen(inp)
    out = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="zeros")


def _healthy(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(4, activation="relu", name="backbone", trainable=False)(inp)
    out = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="healthy")


def test_constant_frozen_backbone_warns(tmp_path):
    res, caught = _export(_frozen_zero_backbone(), tmp_path, "zeros")
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert msg.startswith("the frozen backbone's output is constant (std 0 across a probe "
                          "batch of 16")
    assert "were the weights loaded?" in msg and "weights=None" in msg
    assert caught[0].filename == __file__  # points at the user's line, not at xflwb
    assert msg in res.warnings and msg in _text(res._repr_html_())
    assert res.parity["ok"].all()  # parity alone would have said all is well


def test_healthy_model_exports_without_warning(tmp_path):
    res, caught = _export(_healthy(), tmp_path, "healthy")
    assert caught == [] and res.warnings == []
    # frozen layers count their parameters (they showed 0), and the digest is shown
    table = res.layers.set_index("layer")
    assert table.loc["backbone", "params"] == 6 * 4 + 4 and table.loc["backbone", "frozen"]
    assert table.loc["head", "params"] == 4 * 3 + 3 and not table.loc["head", "frozen"]
    assert "frozen weights sha256" in res._repr_html_()


def test_random_mobilenet_backbone_is_constant():
    """The issue's model: a frozen MobileNetV2 with ``weights=None`` (checked on its graph,
    no export needed)."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    base.trainable = False
    inp = keras.Input((32, 32, 3))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(base(inp, training=False))
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))
    graph = graph_mod.analyze(model)
    assert [n.name for n in health.frozen_boundary(graph)] == ["pool"]
    x = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    msg = health.constant_backbone(graph, x)
    assert msg is not None and "the head cannot learn" in msg
    std = float(re.search(r"std (\S+) across", msg).group(1))
    assert std < 1e-6


def test_loss_one_step_cannot_move_warns(tmp_path):
    """A dead ReLU (every pre-activation -1) before a bias-free head: no gradient reaches
    any weight, so parity passes (every platform agrees nothing changes) and nothing learns."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="relu", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(-1.0)),
        keras.layers.Dense(3, activation="softmax", use_bias=False)])
    res, caught = _export(model, tmp_path, "still")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and msgs[0].startswith("one training step on a probe batch leaves "
                                                 "the loss at"), msgs
    assert "learning rate (0.01)" in msgs[0] and res.parity["ok"].all()


def test_data_type_mismatch_warns_at_export_and_refuses_at_spawn(tmp_path):
    """The issue's mistake: ``Input((28, 28, 1))`` exported with ``data_type="digits"``."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    res, caught = _export(model, tmp_path, "mnistish", data_type="digits")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("data_type 'digits' is a registered dataset this model cannot "
                              "train on: model 'mnistish' takes inputs of shape (28, 28, 1) "
                              "but dataset 'digits' has samples of shape (8, 8, 1)")
    assert "known: mnist" in msgs[0] and msgs[0] in res.warnings
    # nothing frozen: no digest (it was the SHA-256 of nothing), no frozen block
    assert res.manifest["frozen"]["elements"] == 0
    page = res._repr_html_()
    assert "frozen weights" not in page and "bytes per update" in page
    assert "<details>" not in page and msgs[0] in _text(page)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # a bare Fleet refuses in start(), before any process
    fleet = Fleet("http://127.0.0.1:9", tmp_path / "fleet", android=2, dataset="digits")
    with pytest.raises(IncompatibleData) as info:
        fleet.start()
    assert str(info.value).endswith("(model 'mnistish' v1 was exported in this process for "
                                    "data type 'digits'; no device was started)")
    assert "takes inputs of shape (28, 28, 1) but dataset 'digits'" in str(info.value)
    assert fleet.procs == {}
    # the workbench (and so %xfl_devices spawn) refuses before issuing tokens or starting
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        with pytest.raises(IncompatibleData, match=r"takes inputs of shape \(28, 28, 1\)"):
            wb.spawn_devices(android=2, dataset="digits")
        assert wb.fleets == [] and not (wb.data_dir / "fleets").exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    # a dataset the model fits, and a data type of the user's own, pass
    check_spawn("mnist", "digits")
    check_spawn("digits", "my-digits")
    del res, info  # the kernel no longer holds the export (the traceback held it too)
    gc.collect()
    check_spawn("digits", "digits")


def test_own_data_type_is_not_checked(tmp_path):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    _, caught = _export(model, tmp_path, "own", data_type="my-scans")
    assert caught == []


def _text(page: str) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_transfer_report_collapses_the_backbone(transfer_export):
    """The shared transfer export (MobileNetV2 with real statistics): no warning, and the
    backbone is one expandable row; the report stays a few kB."""
    model, res = transfer_export
    # only the note that iOS freezes the adapter: the backbone passes its signal
    assert [w[:12] for w in res.warnings] == ["iOS freezes "], res.warnings
    page = res._repr_html_()
    assert len(page) < 9000, len(page)  # ~22k characters before (each table brings its CSS)
    backbone = model.layers[1]
    frozen = sum(int(np.prod(w.shape)) for w in backbone.weights)
    summary = re.search(r"<summary>(.*?)</summary>", page).group(1)
    assert summary == (f"{backbone.name} backbone: {len(res.layers) - 5} layers, "
                       f"{frozen:,} parameters frozen")
    assert page.count("<details>") == 1
    rows = re.search(r"Trainability plan.*?<tbody>(.*?)</tbody>", page, re.S).group(1)
    assert rows.count("<tr>") == 6  # the backbone, adapter, adapter_bn, relu6, pool, head
