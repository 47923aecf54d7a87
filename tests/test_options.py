"""Each option set is declared once (``xflwb._options``), and every front-end agrees with it.

The Python functions, the command line, the magics and the admin API's body are generated
from the same dataclasses; these tests hold them to it: the same names, the same defaults,
the same accepted and refused values, and docs/options.md tables that match.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xflwb
from xflwb import _options, cli, magics
from xflwb.admin import AdminClient
from xflwb.devices.device import DeviceOptions
from xflwb.devices.fleet import FleetOptions
from xflwb.server.config import BackendOptions, SessionConfig, TLSOptions
from xflwb.server.http.session_in import SessionIn
from xflwb.sessions.options import STRATEGIES
from xflwb.simulation.config import SimulationConfig

ROOT = Path(__file__).resolve().parents[1]


def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


#: every parser generated from a declaration: (parser factory, option sets it carries)
PARSERS = {
    "xflwb train": (lambda: _sub("train"), [SessionConfig]),
    "%xfl_train": (magics._train_parser, [SessionConfig]),
    "xflwb simulate": (lambda: _sub("simulate"), [SimulationConfig]),
    "%xfl_simulate": (magics._simulate_parser, [SimulationConfig]),
    "xflwb server": (lambda: _sub("server"), [BackendOptions, TLSOptions]),
    "%xfl_server": (magics._server_parser, [BackendOptions, TLSOptions]),
    "%xfl_devices": (magics._devices_parser, [FleetOptions, DeviceOptions]),
    "xflwb device": (lambda: _sub("device"), [DeviceOptions]),
}


def test_docs_option_tables_are_generated_from_the_declarations():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "options_tables.py"),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (ROOT / "docs" / "options.md").read_text()
    for cls in (SessionConfig, SimulationConfig, BackendOptions, DeviceOptions):
        assert f"<!-- options:{cls.__name__} -->" in text
        for name in _options.names(cls):
            assert f"| `{name}` |" in text


def test_strategy_names_match_flowers_classes():
    from xflwb.flower_legacy import SERVER_STRATEGIES
    from xflwb.sessions.options import ASYNC_STRATEGIES

    # Flower's synchronous strategies, plus FedBuff's asynchronous loop (xflwb's own)
    assert set(STRATEGIES) == set(SERVER_STRATEGIES) | set(ASYNC_STRATEGIES)
    assert not set(SERVER_STRATEGIES) & set(ASYNC_STRATEGIES)


@pytest.mark.parametrize("front", sorted(PARSERS))
def test_every_declared_option_is_on_every_parser_and_defaults_stay_declared(front):
    factory, classes = PARSERS[front]
    parser = factory()
    flags = {s for a in parser._actions for s in a.option_strings}
    for cls in classes:
        for o in _options.options(cls):
            assert o.flag in flags, f"{front} lacks {o.flag} ({cls.__name__}.{o.name})"
            action = parser._option_string_actions[o.flag]
            # the default is the declaration's, applied by the dataclass: never a copy here
            assert action.default is argparse.SUPPRESS, f"{front} {o.flag} has its own default"


@pytest.mark.parametrize("func, classes", [
    (xflwb.Workbench.train, [SessionConfig]),
    (AdminClient.train, [SessionConfig]),
    (xflwb.simulate, [SimulationConfig]),
    (xflwb.Workbench.simulate, [SimulationConfig]),
    (xflwb.Workbench.__init__, [BackendOptions]),
    (xflwb.Workbench.spawn_devices, [FleetOptions, DeviceOptions]),
])
def test_python_signatures_show_every_option_with_its_declared_default(func, classes):
    params = inspect.signature(func).parameters
    for cls in classes:
        for o in _options.options(cls):
            assert o.name in params, f"{func.__qualname__} lacks {o.name}"
            assert params[o.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[o.name].default == o.default
            assert o.name in (func.__doc__ or "")


def test_the_admin_body_is_the_session_declaration():
    fields = SessionIn.model_fields
    assert set(fields) == set(_options.names(SessionConfig)) | {"model"}
    for o in _options.options(SessionConfig):
        assert fields[o.name].get_default(call_default_factory=True) == o.default, o.name
        assert fields[o.name].description == o.spec.help


def test_export_is_keyword_only_after_the_name():
    params = inspect.signature(xflwb.export).parameters
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == ["model",
                                                                                   "name"]


def test_unknown_keywords_are_refused_by_name_with_a_suggestion(tmp_path):
    with pytest.raises(TypeError, match=r"'num_rounds': did you mean 'rounds'\?"):
        xflwb.simulate("nothing", android=1, num_rounds=3, data_dir=tmp_path / "d")
    with pytest.raises(TypeError, match="'lr' \\(it takes data_dir, "):
        xflwb.Workbench(data_dir=tmp_path / "w", lr=0.1)
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()


def test_the_public_types_are_exported():
    assert xflwb.Session.__name__ == "Session" and xflwb.Fleet.__name__ == "Fleet"
    for name in ("Session", "Fleet", "SessionConfig", "SimulationConfig", "DeviceOptions",
                 "AdminClient"):
        assert name in xflwb.__all__


# -- the same values are accepted and refused everywhere ------------------------------------------
_NUMERIC = [(cls, o) for cls in (SessionConfig, SimulationConfig, DeviceOptions)
            for o in _options.options(cls) if o.kind in (int, float) and not o.spec.choices]


def _make(cls: type, **values: object) -> object:
    base = {"android": 1, "ios": 1} if cls is SimulationConfig else {}
    return cls(**{**base, **values})


def _accepts_python(cls: type, name: str, value: object) -> bool:
    try:
        _make(cls, **{name: value})
    except ValueError:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(_NUMERIC), data=st.data())
def test_python_and_the_command_line_accept_the_same_values(case, data):
    """A value typed on the command line builds the same config as the same value passed
    from Python, or both refuse it (each with the option's name)."""
    cls, o = case
    value = data.draw(st.one_of(
        st.integers(-5, 10**7),
        st.floats(-2, 2, allow_nan=False) if o.kind is float else st.integers(-2, 2),
        st.sampled_from([b for b in (o.spec.ge, o.spec.gt, o.spec.le, o.spec.lt)
                         if b is not None] or [0])))
    if o.kind is int:
        value = int(value)
    parser = _options_parser(cls)
    # --flag=value: argparse reads "-1e-05" after a space as an option
    ns = parser.parse_args([f"{o.flag}={value!r}"])
    from_cli = _options.given(ns, cls)
    ok = _accepts_python(cls, o.name, value)
    assert _accepts_python(cls, o.name, from_cli[o.name]) == ok
    if ok:
        a = _make(cls, **{o.name: value})
        b = _make(cls, **from_cli)
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    else:
        with pytest.raises(ValueError, match=o.name):
            _make(cls, **{o.name: value})


def _options_parser(cls: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    _options.add_arguments(p, cls)
    return p


_SESSION_NUMERIC = [o for c, o in _NUMERIC if c is SessionConfig]


@settings(max_examples=200, deadline=None)
@given(o=st.sampled_from(_SESSION_NUMERIC),
       value=st.one_of(st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True),
                       st.booleans(), st.none()))
def test_http_and_python_refuse_the_same_session_values(o, value):
    """The admin body (pydantic, generated) and ``SessionConfig`` (``_options.check``) are
    two implementations of one declaration: they agree on every value."""
    try:
        SessionIn(model="m", **{o.name: value})
        http_ok = True
    except pydantic.ValidationError:
        http_ok = False
    python_ok = _accepts_python(SessionConfig, o.name, value)
    if isinstance(value, float) and o.kind is int and value.is_integer() and math.isfinite(
            value):
        return  # JSON has one number type: 3.0 is an integer to pydantic, not to Python
    if isinstance(value, bool):
        return  # pydantic's lax mode takes true for 1 in a JSON body; Python refuses bools
    assert http_ok == python_ok, (o.name, value, http_ok, python_ok)


def test_device_knobs_take_one_value_or_one_per_device():
    ns = magics._devices_parser().parse_args(
        ["spawn", "--android", "2", "--ios", "1", "--slowdown", "1,1,10", "--max-wait", "30",
         "--encoding", "npy"])
    knobs = _options.given(ns, DeviceOptions)
    assert knobs == {"slowdown": [1.0, 1.0, 10.0], "max_wait": 30.0, "encoding": "npy"}
    assert _options.given(ns, FleetOptions) == {"android": 2, "ios": 1}
    with pytest.raises(ValueError, match=r"slowdown must be a number >= 1, got 0\.5"):
        DeviceOptions(slowdown=0.5)
    with pytest.raises(ValueError, match="encoding must be one of 'raw', 'npy'"):
        DeviceOptions(encoding="json")


# -- "did you mean", in one line ----------------------------------------------------------------
#: every declared option set a user constructs, by its public name
OPTION_SETS = [xflwb.DP, xflwb.FedBuff, xflwb.SecAgg, xflwb.DeviceProfiles, DeviceOptions,
               FleetOptions,
               SessionConfig, SimulationConfig, BackendOptions, TLSOptions]


def _typo(name: str) -> str:
    """``clipping_norm`` → ``clippin_norm``: one letter dropped from the middle."""
    i = len(name) // 2
    return name[:i] + name[i + 1:]


@pytest.mark.parametrize("cls", OPTION_SETS, ids=lambda c: c.__name__)
def test_every_option_set_refuses_a_typo_in_one_line_with_the_option_meant(cls):
    for name in _options.names(cls):
        if len(name) < 5:
            continue
        with pytest.raises(xflwb.UnknownOptionError) as err:
            cls(**{_typo(name): 1})
        message = str(err.value)
        assert message == (f"xflwb.{cls.__name__} got an unexpected option "
                           f"{_typo(name)!r}: did you mean {name!r}?")
        # Python's own type for an unexpected keyword, and a ValueError like a bad value
        assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)


def test_the_issues_typos_get_their_suggestion():
    with pytest.raises(TypeError, match=r"^xflwb\.DP got an unexpected option 'cliping_norm': "
                       r"did you mean 'clipping_norm'\?$"):
        xflwb.DP(cliping_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match=r"'bufer_size': did you mean 'buffer_size'\?$"):
        xflwb.FedBuff(bufer_size=2)
    # a word with no close option lists what the set takes instead
    with pytest.raises(TypeError, match=r"'colour' \(it takes buffer_size, max_concurrency"):
        xflwb.FedBuff(colour=2)


@pytest.mark.parametrize("make", [
    lambda: SessionConfig(strategy="fedbuf"),
    lambda: SimulationConfig(android=2, strategy="FedAdm"),
    lambda: xflwb.simulate("nothing", android=1, strategy="krumm"),
], ids=["session", "simulation", "simulate"])
def test_a_choice_typo_suggests_the_closest_choice_in_one_line(make):
    with pytest.raises(xflwb.OptionError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and len(message) < 240
    assert re.search(r"; did you mean '(fedbuff|fedadam|krum)'\?$", message), message


def test_a_choice_nothing_resembles_gets_the_list_without_a_guess():
    with pytest.raises(xflwb.OptionError, match=r"strategy must be one of 'fedavg'.*got 'zz'$"):
        SessionConfig(strategy="zz")


def test_option_errors_are_raised_from_the_callers_line_without_a_chain(tmp_path):
    """Without ``%load_ext xflwb`` too: the traceback is the user's call and the API's
    boundary, not the validation's internals nor "during handling of …"."""
    calls = [lambda: xflwb.DP(cliping_norm=1.0),
             lambda: SessionConfig(strategy="fedbuff", strategy_options={"bufer_size": 3}),
             lambda: SessionConfig(privacy={"noise_multiplier": -1, "clipping_norm": 1}),
             lambda: xflwb.simulate("m", android=1, min_client=2, data_dir=tmp_path / "d")]
    for call in calls:
        with pytest.raises(xflwb.OptionError) as err:
            call()
        shown = "".join(traceback.format_exception(err.value))
        assert shown.count('  File "') <= 3, shown
        assert "During handling" not in shown and "direct cause" not in shown, shown
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("cell, expected", [
    ("xflwb.DP(cliping_norm=1.0)", "did you mean 'clipping_norm'?"),
    ("xflwb.simulate('m', android=1, min_client=2)", "did you mean 'min_clients'?"),
    ("xflwb.SessionConfig(strategy='fedbuf')", "did you mean 'fedbuff'?"),
    ("xflwb.Workbench(data_dir=_tmp, port=-1)", "port must be"),
])
def test_a_notebook_shows_an_option_error_as_one_line(ip, capsys, tmp_path, cell, expected):
    ip.user_ns.update(xflwb=xflwb, _tmp=str(tmp_path / "wb"))
    capsys.readouterr()
    result = ip.run_cell(cell)
    out, err = capsys.readouterr()
    assert isinstance(result.error_in_exec, xflwb.OptionError)  # the cell still fails
    shown = (out + err).strip()
    assert expected in shown and shown.count("\n") == 0, shown
    assert shown.startswith(type(result.error_in_exec).__name__ + ": ")
    # other errors keep IPython's full traceback
    ip.run_cell("def _deep():\n    return 1 / 0\n_deep()")
    shown = "".join(capsys.readouterr())
    assert "ZeroDivisionError" in shown and "_deep" in shown and shown.count("\n") > 3


def test_export_choices_suggest_the_closest_in_one_line():
    """The export's choices (optimizer, loss, platforms, ios_training) say what was meant,
    as the option sets do, before anything is converted."""
    import keras

    from xflwb.bridge.export import _check_args
    from xflwb.bridge.optim import resolve_optimizer

    for bad, meant in (("adma", "'adam'"), ({"type": "sdg"}, "'sgd'")):
        with pytest.raises(ValueError, match=f"did you mean {meant}") as err:
            resolve_optimizer(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'mse'"):
        _check_args("m", "mes", 1, 1, ("android",))
    with pytest.raises(ValueError, match="did you mean 'android'"):
        _check_args("m", "mse", 1, 1, ("andriod",))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"ios_training must be one of .*did you mean"):
        xflwb.export(model, name="m", data_type="mine", out_dir="/nonexistent-never-written",
                     ios_training="stict")
