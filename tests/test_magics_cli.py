"""The notebook magic and the CLI: thin, and they report bad input instead of crashing."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import xflwb
from xflwb import cli


def _cell(ip, line, body):
    return ip.run_cell_magic("xfl_export", line, textwrap.dedent(body))


def test_magic_exports_model_variable_and_binds_result(ip, tmp_path, capsys):
    _cell(ip, f"digits_net --data-type digits --optimizer adam --learning-rate 0.01 "
              f"--batch-size 16 --epochs 2 --out {tmp_path}", """
        import keras
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 1)),
                                  keras.layers.Conv2D(2, 3, activation="relu"),
                                  keras.layers.Flatten(),
                                  keras.layers.Dense(10, activation="softmax")])
    """)
    res = ip.user_ns["digits_net"]
    assert isinstance(res, xflwb.ExportResult)
    assert res.name == "digits_net" and res.manifest["data_type"] == "digits"
    assert res.manifest["optimizer"]["type"] == "adam"
    assert res.manifest["optimizer"]["learning_rate"] == 0.01
    assert (res.manifest["batch_size"], res.manifest["epochs"]) == (16, 2)
    assert res.parity["ok"].all()
    assert res.paths["ios"].exists() and res.paths["android"].exists()


def test_magic_finds_the_only_new_model(ip, tmp_path):
    _cell(ip, f"only_one --platforms android --out {tmp_path}", """
        import keras
        net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        not_a_model = 3
    """)
    res = ip.user_ns["only_one"]
    assert res.manifest["input"]["shape"] == [3]
    assert list(res.manifest["platforms"]) == ["android"]


def test_magic_errors_raise_one_line(ip, tmp_path):
    from xflwb.magics import MagicUsageError, XflMagicError

    with pytest.raises(XflMagicError, match="defined no Keras model"):
        _cell(ip, f"nothing --out {tmp_path}", "x = 1\n")
    assert "nothing" not in ip.user_ns
    with pytest.raises(XflMagicError, match=r"several Keras models \(a, b\)"):
        _cell(ip, f"two --out {tmp_path}", """
            import keras
            a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
            b = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        """)
    with pytest.raises(MagicUsageError, match="invalid choice: 'rmsprop'"):
        _cell(ip, "bad --optimizer rmsprop", "pass\n")
    with pytest.raises(XflMagicError) as info:
        _cell(ip, f"lstm --out {tmp_path} --ios-training strict", """
            import keras
            model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Reshape((4, 4)),
                                      keras.layers.LSTM(3, name="lstm_1"),
                                      keras.layers.Dense(2, activation="softmax")])
        """)
    assert "layer 'lstm_1' (LSTM)" in str(info.value) and "ios_training='strict'" in str(
        info.value)
    assert isinstance(info.value.__cause__, xflwb.ExportError)  # the API error is kept
    with pytest.raises(XflMagicError, match="the cell raised NameError"):
        _cell(ip, f"broken --out {tmp_path}", "undefined_name_xyz\n")
    assert "broken" not in ip.user_ns



@pytest.mark.parametrize("error", [
    xflwb.InputError("bad input"), xflwb.ExportFailure("no export"),
    xflwb.SessionFailure("no session"), xflwb.UpdateRejected("no update"),
    xflwb.PrivacyError("no budget"), xflwb.BackendError("no backend"),
    xflwb.DeviceFailure("no device"), xflwb.XflwbError("the root"),
    xflwb.ParityError("runtimes disagree", report=None),
    FileExistsError("out/m exists; exports never overwrite"),
], ids=lambda e: type(e).__name__)
def test_a_magic_shows_any_xflwb_error_as_one_line(error):
    """The magics catch the root (and the OS's OSError): our message, not a traceback."""
    from xflwb.magics import XflMagicError, _failing_as

    with pytest.raises(XflMagicError) as info, _failing_as("%xfl_train"):
        raise error
    assert info.value.__cause__ is error  # the API error is kept
    assert str(info.value) == f"%xfl_train: {error}"
    assert len(info.value._render_traceback_()) == 1


def test_a_magic_keeps_a_bugs_traceback():
    """Anything that is no xflwb error is a bug: it propagates as it is."""
    from xflwb.magics import _failing_as

    with pytest.raises(ZeroDivisionError), _failing_as("%xfl_train"):
        _ = 1 / 0
    with pytest.raises(KeyError), _failing_as("%xfl_train"):
        raise KeyError("internal")


def test_a_plain_value_error_of_a_dependency_reaches_the_magic_as_ours(ip, tmp_path):
    """secagg's fleet check raises a bare ValueError; the simulation's options turn it into
    an InputError, so %xfl_simulate shows it as one line and starts nothing."""
    from xflwb.magics import XflMagicError

    r = ip.run_cell(f"%xfl_simulate nothing --android 1 --min-clients 1 --secagg '{{}}' "
                    f"--data-dir {tmp_path / 'x'}")
    err = r.error_in_exec
    assert isinstance(err, XflMagicError) and isinstance(err.__cause__, xflwb.InputError)
    assert str(err) == ("%xfl_simulate: secagg needs at least 2 clients per round, this fleet "
                        "samples 1: raise min_clients / fraction_fit")
    assert len(err._render_traceback_()) == 1
    assert not (tmp_path / "x").exists()

def test_cli_export_module_attr(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import keras

        def small():
            keras.utils.set_random_seed(0)
            return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"),
                                     keras.layers.Dense(3, activation="softmax")])
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = cli.main(["export", "mymodels:small", "--name", "small", "--out", "arts",
                   "--optimizer", "sgd", "--learning-rate", "0.1", "--momentum", "0.9"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "exported small v1" in out and "train_step" in out
    m = json.loads((tmp_path / "arts" / "small" / "v1" / "manifest.json").read_text())
    assert m["optimizer"] == {"type": "sgd", "learning_rate": 0.1, "momentum": 0.9}
    with pytest.raises(SystemExit, match="no attribute"):
        cli.main(["export", "mymodels:missing", "--out", "arts"])
    with pytest.raises(SystemExit, match="module:attr"):
        cli.main(["export", "mymodels", "--out", "arts"])


def test_cli_reports_export_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_models.py").write_text("model = object()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_models", None)
    assert cli.main(["export", "bad_models:model", "--out", "arts"]) == 2
    assert "expected a Keras 3 model" in capsys.readouterr().err
