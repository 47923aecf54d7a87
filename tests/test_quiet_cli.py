"""Issue 11, items 7-9: no TensorFlow noise unless asked, and a command line with manners."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import run_python
from xflwb import _console, _quiet
from xflwb._argparse import CommandLineError, Parser, explain, option_strings
from xflwb.cli import build_parser, main

#: A TensorFlow / absl / TFLite / MLIR log line, as they reach a cell, a terminal or a log.
TF_LINE = re.compile(r"^(W|I|E)0000|absl|tensorflow/|XNNPACK|MLIR|Will likely fail if a grad",
                     re.MULTILINE)

MODELS = textwrap.dedent('''
    import logging

    import keras

    logging.basicConfig()  # as notebooks and many apps do: absl's Python warnings would show


    def small():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                                 keras.layers.Dense(3, activation="softmax")])
''')


def _cli_export(tmp_path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``xflwb export tinymodels:small`` in a fresh process, with xflwb's own defaults (no
    TF_CPP_MIN_LOG_LEVEL / XFLWB_VERBOSE inherited from the test run)."""
    (tmp_path / "tinymodels.py").write_text(MODELS)
    env = {k: v for k, v in os.environ.items()
           if k not in (_quiet.LEVEL_VAR, _quiet.VERBOSE_VAR)}
    return subprocess.run([sys.executable, "-m", "xflwb", "export", "tinymodels:small",
                           "--out", str(tmp_path / "art"), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


# -- quiet ---------------------------------------------------------------------------------
def test_cli_export_prints_no_tensorflow_lines(tmp_path):
    proc = _cli_export(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported small v1" in proc.stdout
    both = proc.stdout + proc.stderr
    assert not TF_LINE.search(both), both[-3000:]


def test_verbose_export_shows_the_converters_lines(tmp_path, capfd):
    """The counter-test: the noise the quiet test does not see is real."""
    import keras

    import xflwb
    from xflwb.cli import export_kwargs

    args = build_parser().parse_args(["export", "m:small", "--verbose"])
    assert export_kwargs(args)["verbose"] is True  # --verbose reaches xflwb.export
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    capfd.readouterr()
    xflwb.export(model, name="loud", out_dir=tmp_path, verbose=True)
    loud = capfd.readouterr()
    assert len(TF_LINE.findall(loud.out + loud.err)) >= 2, loud.err[-3000:]
    xflwb.export(model, name="loud", out_dir=tmp_path)  # and quiet again by default
    quiet = capfd.readouterr()
    assert not TF_LINE.search(quiet.out + quiet.err), quiet.err[-3000:]


def test_tf_log_level_set_before_tensorflow_and_users_level_kept():
    code = ("import os, sys\n"
            "{pre}"
            "import xflwb\n"
            "from xflwb import _quiet\n"
            "assert 'tensorflow' not in sys.modules  # set before TF is imported\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
            "_quiet.set_verbose(True)\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], os.environ['XFLWB_VERBOSE'])\n")
    env_free = "os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None)\n"
    assert run_python(code.format(pre=env_free)).stdout.split() == ["2", "0", "1"]
    users = "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '1'\n"
    assert run_python(code.format(pre=users)).stdout.split() == ["1", "1", "1"]


def test_quiet_drops_native_noise_and_writes_back_the_rest(capfd):
    with _quiet.quiet(verbose=False) as captured:
        os.write(2, b"W0000 00:00:1.2 1 tf_tfl_flatbuffer_helpers.cc:365] Ignored x.\n"
                    b"INFO: Created TensorFlow Lite delegate for select TF ops.\n"
                    b"a line someone needs\n")
        assert "Ignored x." in captured.text  # readable while the block runs
    err = capfd.readouterr().err
    assert "a line someone needs" in err
    assert "W0000" not in err and "TensorFlow Lite" not in err
    with _quiet.quiet(verbose=True):  # verbose: nothing is captured
        os.write(2, b"W0000 00:00:1.2 1 x.cc:1] shown\n")
    assert "W0000 00:00:1.2 1 x.cc:1] shown" in capfd.readouterr().err


def test_quiet_puts_what_it_captured_on_the_error(capfd):
    with pytest.raises(RuntimeError) as info, _quiet.quiet(verbose=False):
        os.write(2, b"I0000 00:00:1.2 1 mlir_graph_optimization_pass.cc:401] MLIR\n"
                    b"the reason it broke\n")
        raise RuntimeError("conversion failed")
    assert "the reason it broke" in "\n".join(getattr(info.value, "__notes__", []))
    assert "the reason it broke" not in capfd.readouterr().err  # on the error, not twice


def test_blocks_inside_a_verbose_export_are_verbose_too(capfd):
    with _quiet.quiet(verbose=True), _quiet.quiet():  # export(verbose=True) → converter
        os.write(2, b"W0000 00:00:1.2 1 converter.cc:1] inner\n")
    assert "converter.cc:1] inner" in capfd.readouterr().err


def test_failed_conversion_raises_export_error_with_the_converter_log(tmp_path):
    import tensorflow as tf

    import xflwb
    from xflwb.bridge import tflite

    class PyFunc(tf.Module):  # an op neither TFLite nor the Flex delegate has
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def f(self, x):
            return {"y": tf.py_function(lambda a: a * 2, [x], tf.float32)}

    module = PyFunc()
    tf.saved_model.save(module, str(tmp_path / "sm"),
                        signatures={"f": module.f.get_concrete_function()})
    with pytest.raises(xflwb.ExportError, match="TFLite converter failed") as info:
        tflite.convert_saved_model(tmp_path / "sm")
    message = str(info.value)
    assert "converter log:" in message and "EagerPyFunc" in message.split("converter log:")[1]


# -- CLI manners ---------------------------------------------------------------------------
def test_help_is_for_users_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "cross-platform federated learning on phones" in out
    for command in ("export", "server", "device", "experiment", "simulate", "demo"):
        assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), command
    assert "examples:" in out and "--verbose" in out
    assert "parses arguments" not in out  # not the module's internal docstring


def test_abbreviations_are_refused_with_the_full_name(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "pkg:model", "--data-typ", "digits"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --data-typ digits" in err
    assert "did you mean --data-type?" in err


@pytest.mark.parametrize(("argv", "hint"), [
    (["export", "pkg:model", "--lr", "0.1"], "--lr: did you mean --learning-rate?"),
    (["export", "pkg:model", "--batch_size", "8"], "did you mean --batch-size?"),
    (["simulate", "m", "--num-rounds", "3"], "did you mean --rounds?"),
    (["simulat", "m"], "did you mean 'simulate'?"),
    (["export", "pkg:model", "--optimizer", "adma"], "did you mean 'adam'?"),
    (["experiment", "run", "nb.ipynb", "--out", "o", "--grd", "a=1"], "did you mean --grid?"),
])
def test_unknown_options_get_did_you_mean(argv, hint, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert hint in err, err
    if argv[0] in ("export", "simulate"):  # the sub-command's usage, not the top one's
        assert f"usage: xflwb {argv[0]}" in err


def test_verbose_goes_before_or_after_the_command():
    p = build_parser()
    assert p.parse_args(["--verbose", "demo"]).verbose is True  # not reset by `demo`
    assert p.parse_args(["demo", "--verbose"]).verbose is True
    assert p.parse_args(["demo"]).verbose is False


def test_kernel_parsers_raise_instead_of_exiting():
    p = Parser(prog="%xfl_demo", raise_errors=True)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("spawn")
    s.add_argument("--android", type=int, default=0)
    with pytest.raises(CommandLineError, match=r"--andriod: did you mean --android\?"):
        p.parse_args(["spawn", "--andriod", "2"])
    with pytest.raises(CommandLineError, match="usage: %xfl_demo spawn"):
        p.parse_args(["spawn", "--andr", "2"])  # no abbreviations in sub-parsers either
    assert p.parse_args(["spawn", "--android", "2"]).android == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="-_abcdeilnoprstuy0123456789=", min_size=1, max_size=14),
                min_size=1, max_size=4))
def test_any_magic_line_parses_or_raises_one_usage_error_naming_real_options(tokens):
    """Notebook options cross a trust boundary: whatever is typed, the parser either
    accepts it or raises its one error type, and every hint names an option it has."""
    p = build_parser()
    export = p._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    known = set(option_strings(export))
    message = explain(export, f"unrecognized arguments: {' '.join(tokens)}")
    for hint in re.findall(r"did you mean (.*)\?", message):
        assert set(hint.split(" or ")) <= known, message
    kernel = Parser(prog="%%xfl_export", raise_errors=True)
    kernel.add_argument("name")
    from xflwb.cli import add_export_options

    add_export_options(kernel)
    try:
        kernel.parse_args(["m", *tokens])
    except CommandLineError as exc:
        assert str(exc).startswith("usage: %%xfl_export")


def test_counts_print_as_integers_and_measurements_with_four_decimals():
    hist = pd.DataFrame({
        "round": [3] * 6, "platform": ["all", "all", "all", "android", "android", "android"],
        "metric": ["clients", "examples", "accuracy"] * 2,
        "value": [4.0, 1438.0, 0.891412, 2.0, 731.0, 1.0]})
    wide = hist.pivot_table(index="platform", columns="metric", values="value")
    text = _console.format_table(wide, index=True)
    assert re.search(r"all\s+0\.8914\s+4\s+1438\b", text), text
    assert re.search(r"android\s+1\.0000\s+2\s+731\b", text), text  # accuracy stays a float
    assert "4.0" not in text and "1438.0" not in text
