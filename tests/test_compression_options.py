"""The ``compression`` option (issue 23): one declaration (``RoundOptions.compression``,
``xflwb.Compression``) that every front-end takes and normalises the same way, checked with
a clear error before anything starts, stored and restored as a plain dict.

Front-ends: the Python API (``Workbench.train``, ``xflwb.simulate``, ``wb.simulate``,
``AdminClient.train``), the command line and the magics (their generated parsers, and the
commands run in-process), and the admin API's body (a real backend on loopback). Spec
strings cross a trust boundary (the admin body): hypothesis feeds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sqlite3

import httpx
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xflwb
from tests.test_registry_migrations import _old_database
from xflwb import _options, cli, magics
from xflwb.admin import AdminClient
from xflwb.federation.codecs import FLOAT32, parse
from xflwb.federation.compression import compression_dict
from xflwb.server.config import SessionConfig
from xflwb.server.http.session_in import SessionIn
from xflwb.sessions.options import core_parameters
from xflwb.sessions.registry import Registry
from xflwb.simulation.config import SimulationConfig

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": "Bearer secret"}
UP_INT8_DOWN_FP16 = {"up": "int8", "down": "fp16"}


def _configs():
    """Both option sets that carry the round options, as (class, required keywords)."""
    return [(SessionConfig, {}), (SimulationConfig, {"android": 2})]


# -- one declaration, public -----------------------------------------------------------------
def test_compression_is_a_public_option_set_with_canonical_specs():
    assert "Compression" in xflwb.__all__ and xflwb.Compression.__module__ == "xflwb"
    assert repr(xflwb.Compression(up=" INT8 ", down="npy")) == (
        "Compression(up='int8', down='float32')")
    assert xflwb.Compression(up="int8:block=64").up == "int8:block=64"
    assert xflwb.Compression(up="topk:fraction=0.05").up == "topk:0.05"
    assert not xflwb.Compression().enabled and xflwb.Compression(down="fp16").enabled
    with pytest.raises(xflwb.OptionError, match="cannot carry the down-link"):
        xflwb.Compression(down="topk:0.01")
    with pytest.raises(xflwb.UnknownOptionError,
                       match=r"^xflwb\.Compression got an unexpected option 'dwn': did you "
                             r"mean 'down'\?$"):
        xflwb.Compression(dwn="fp16")


@pytest.mark.parametrize("cls, kw", _configs(), ids=["session", "simulation"])
def test_every_spelling_is_stored_as_one_dict(cls, kw):
    spellings = [xflwb.Compression(up="int8", down="fp16"), UP_INT8_DOWN_FP16,
                 "up=int8,down=fp16", " down = FP16 , up = int8 ", {"up": "INT8",
                                                                    "down": "fp16"}]
    for value in spellings:
        assert cls(compression=value, **kw).compression == UP_INT8_DOWN_FP16, value
    # a bare spec is the up-link's, its argument's "=" included
    assert cls(compression="int8", **kw).compression == {"up": "int8", "down": FLOAT32}
    assert cls(compression="int8:block=64", **kw).compression == {"up": "int8:block=64",
                                                                    "down": FLOAT32}
    assert cls(compression="down=fp16", **kw).compression == {"up": FLOAT32, "down": "fp16"}
    # nothing compressed is None, whatever the spelling: the stored row says "off" one way
    for off in (None, "float32", "", "up=float32,down=npy", xflwb.Compression(), {}):
        assert cls(compression=off, **kw).compression is None, off
    assert cls(**kw).compression is None
    # stored as JSON in the registry: a plain dict of strings
    cfg = cls(compression=xflwb.Compression(up="topk:0.01", down="int8"), **kw)
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["compression"] == {
        "up": "topk:0.01", "down": "int8"}


@pytest.mark.parametrize("value, match", [
    ("int9", r"compression: unknown codec 'int9': did you mean 'int8'\?"),
    ("up=fp61", r"unknown codec 'fp61': did you mean 'fp16'\?"),
    ("down=topk:0.01", r"codec 'topk:0\.01' cannot carry the down-link: a model is sent "
                       "whole; use fp16 or int8 down"),
    (xflwb.Compression, "compression must be xflwb.Compression"),
    ("topk:0", r"topk fraction must be in \(0, 1\]"),
    ("topk:1.5", r"topk fraction must be in \(0, 1\]"),
    ("topk:nan", r"topk fraction must be in \(0, 1\]"),
    ("topk:lots", "fraction must be a number"),
    ("int8:block=0", "int8 block must be an integer in"),
    ("int8:block=1.5", "block must be a number"),
    ("fp16:3", "codec 'fp16' takes no argument"),
    ("upp=int8", r"unexpected option 'upp': did you mean 'up'\?"),
    ("up=int8,fp16", "write 'up=int8,down=fp16'"),
    ("up=int8,up=fp16", "gives 'up' twice"),
    ({"up": 8}, "up must be a string, got 8"),
    (8, "compression must be xflwb.Compression"),
    (True, "compression must be xflwb.Compression"),
    (["int8"], "compression must be xflwb.Compression"),
])
def test_bad_compression_is_refused_in_one_line_naming_it(value, match):
    for cls, kw in _configs():
        with pytest.raises(xflwb.OptionError, match=match) as err:
            cls(compression=value, **kw)
        assert "\n" not in str(err.value) and "compression" in str(err.value)


def test_a_bad_compression_starts_nothing(tmp_path):
    """Refused at the call, before a registry, a process or Ray exists."""
    with pytest.raises(xflwb.OptionError, match="did you mean 'int8'"):
        xflwb.simulate("never-exported", android=2, compression="int9",
                       data_dir=tmp_path / "sim")
    wb = xflwb.Workbench(data_dir=tmp_path / "wb", port=0)
    with pytest.raises(xflwb.OptionError, match="cannot carry the down-link"):
        wb.train("never-published", compression={"down": "topk:0.1"})
    with pytest.raises(xflwb.OptionError, match="did you mean 'int8'"):
        wb.simulate("never-published", android=2, compression="int9")
    with pytest.raises(xflwb.OptionError, match="did you mean 'int8'"):  # nothing sent
        AdminClient("http://127.0.0.1:9", "token").train("m", compression="int9")
    assert not (tmp_path / "sim").exists() and not (tmp_path / "wb").exists()


# -- with the other features -------------------------------------------------------------------
def test_secagg_refuses_compression_and_says_what_to_do(tmp_path):
    with pytest.raises(xflwb.InputError,
                       match=r"^SecAgg\+ masks quantised vectors already; compression "
                             r"'up=int8,down=fp16' cannot be combined with it: use "
                             r"compression=None or secagg=None$"):
        SimulationConfig(android=3, secagg=xflwb.SecAgg(), compression="up=int8,down=fp16")
    with pytest.raises(xflwb.InputError, match="SecAgg"):
        xflwb.simulate("m", android=3, secagg={}, compression="int8",
                       data_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()
    # float32 both ways is no compression: secagg runs as before
    cfg = SimulationConfig(android=3, secagg={}, compression="up=float32,down=float32")
    assert cfg.compression is None and cfg.secagg is not None


def test_compression_composes_with_dp_and_fedbuff():
    dp = xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0)
    for cls, kw in _configs():
        cfg = cls(compression="int8", privacy=dp, **kw)
        assert cfg.compression == {"up": "int8", "down": FLOAT32} and cfg.privacy
    fb = SessionConfig(strategy="fedbuff", strategy_options=xflwb.FedBuff(buffer_size=2),
                       compression="up=topk:0.01,down=fp16")
    assert fb.compression == {"up": "topk:0.01", "down": "fp16"}


def test_strategy_arguments_pass_compression_exactly_when_the_core_takes_it():
    """The round core gains a ``compression`` keyword (issue 23); until it has one the
    option is stored and shown, and the strategy is built as before."""
    from tests.conftest import SERVED_TOY_MANIFEST, toy_canonical
    from xflwb.sessions.flower_strategy import CrossPlatformStrategy

    for cfg in (SessionConfig(compression="int8", min_clients=1),
                SessionConfig(strategy="fedbuff", compression="int8")):
        args = cfg.strategy_arguments()
        assert ("compression" in args) == ("compression" in core_parameters())
        if "compression" in args:
            assert args["compression"] == {"up": "int8", "down": FLOAT32}
        strategy = CrossPlatformStrategy(SERVED_TOY_MANIFEST, toy_canonical(0), **args)
        assert strategy.core.min_clients == cfg.min_clients


# -- Python signatures -------------------------------------------------------------------------
@pytest.mark.parametrize("func", [xflwb.Workbench.train, AdminClient.train, xflwb.simulate,
                                  xflwb.Workbench.simulate],
                         ids=lambda f: f.__qualname__)
def test_the_python_functions_show_the_option(func):
    param = inspect.signature(func).parameters["compression"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
    assert "compression = None: codecs of updates (up)" in func.__doc__
    assert "[a dict, a spec string or None]" in func.__doc__


# -- command line and magics -------------------------------------------------------------------
def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


PARSERS = {
    "xflwb train": (lambda: _sub("train"), SessionConfig, ["m"]),
    "%xfl_train": (magics._train_parser, SessionConfig, ["m"]),
    "xflwb simulate": (lambda: _sub("simulate"), SimulationConfig, ["m", "--android", "2"]),
    "%xfl_simulate": (magics._simulate_parser, SimulationConfig, ["m", "--android", "2"]),
}


@pytest.mark.parametrize("front", sorted(PARSERS))
def test_command_lines_take_a_spec_json_or_none(front):
    factory, cls, base = PARSERS[front]
    parser = factory()
    action = parser._option_string_actions["--compression"]
    assert action.metavar == "SPEC" and action.default is argparse.SUPPRESS
    for typed, stored in [("up=int8,down=fp16", UP_INT8_DOWN_FP16),
                          ("int8:block=64", {"up": "int8:block=64", "down": FLOAT32}),
                          ('{"up": "int8", "down": "fp16"}', UP_INT8_DOWN_FP16),
                          ("none", None), ("float32", None)]:
        ns = parser.parse_args([*base, "--compression", typed])
        options = _options.given(ns, cls)
        assert cls(**{**options, **({"android": 2} if cls is SimulationConfig else {})}
                   ).compression == stored, (front, typed)
    assert "compression" not in _options.given(parser.parse_args(base), cls)


def test_the_commands_refuse_a_bad_codec_before_starting(tmp_path, capsys):
    code = cli.main(["simulate", "m", "--android", "2", "--compression", "up=int9",
                     "--data-dir", str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("xflwb simulate: error: compression: unknown codec")
    assert "did you mean 'int8'?" in err and not (tmp_path / "sim").exists()
    code = cli.main(["train", "m", "--compression", "down=topk:0.01", "--url",
                     "http://127.0.0.1:9", "--admin-token", "t"])  # refused before sending
    err = capsys.readouterr().err
    assert code == 2 and "cannot carry the down-link" in err


def test_the_magics_refuse_a_bad_codec_in_one_line(ip, tmp_path):
    from xflwb.magics import XflMagicError

    with pytest.raises(XflMagicError, match=r"^%xfl_simulate: compression: unknown codec "
                                            r"'int9': did you mean 'int8'\?") as err:
        ip.run_line_magic("xfl_simulate", f"m --android 2 --compression int9 --data-dir "
                                          f"{tmp_path / 'd'}")
    assert "\n" not in str(err.value) and not (tmp_path / "d").exists()


# -- the admin API (a real backend on loopback) -----------------------------------------------
@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A backend on loopback with one tiny model (both platforms) published as ``tiny``."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    export = xflwb.export(model, name="tiny", data_type="tiny-data",
                          out_dir=tmp_path_factory.mktemp("compression-export"))
    wb = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("compression") / "xfl", port=0,
                         admin_token="secret").start()
    try:
        wb.publish(export)
        yield wb
    finally:
        wb.stop()


def _stop(wb: xflwb.Workbench, session_id: int) -> None:
    r = httpx.post(f"{wb.url}/api/v1/sessions/{session_id}/stop", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text


def test_a_session_started_over_http_or_the_command_stores_the_dict(backend, capsys):
    """The real start path: the admin body's spec string, and ``xflwb train`` (which sends
    the dict AdminClient normalised), each stored once, as the session process reads it."""
    r = httpx.post(f"{backend.url}/api/v1/sessions",
                   json={"model": "tiny", "compression": "up=topk:0.05,down=fp16"},
                   headers=AUTH, timeout=150)
    assert r.status_code == 201, r.text
    first = r.json()["id"]
    row = backend.registry.get_session(first)
    assert row["config"]["compression"] == {"up": "topk:0.05", "down": "fp16"}
    assert row["status"] in ("starting", "running")  # the session process took the row
    assert SessionConfig.from_stored(row["config"]).compression == {"up": "topk:0.05",
                                                                     "down": "fp16"}
    _stop(backend, first)

    code = cli.main(["train", "tiny", "--compression", "int8:block=64", "--url", backend.url,
                     "--admin-token", "secret"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("session "), out
    second = int(out.split()[1])
    assert second != first
    assert backend.registry.get_session(second)["config"]["compression"] == {
        "up": "int8:block=64", "down": FLOAT32}
    _stop(backend, second)


def test_the_admin_body_documents_the_object_or_the_spec_string(backend):
    spec = httpx.get(f"{backend.url}/openapi.json", timeout=30).json()
    field = spec["components"]["schemas"]["SessionIn"]["properties"]["compression"]
    kinds = {s.get("type") for s in field["anyOf"]}
    assert kinds == {"object", "string", "null"}
    assert next(s for s in field["anyOf"] if s.get("type") == "string")["maxLength"] == 256
    assert field["description"] == _options.options(SessionConfig)[
        _options.names(SessionConfig).index("compression")].spec.help


@pytest.mark.parametrize("compression", ["up=int8,down=fp16", UP_INT8_DOWN_FP16, "int8",
                                         None])
def test_the_admin_api_takes_the_option_as_python_does(backend, compression):
    """A good value passes validation and reaches the model lookup (404: nothing is
    published), as it would start a session."""
    r = httpx.post(f"{backend.url}/api/v1/sessions", json={"model": "nothing",
                                                           "compression": compression},
                   headers=AUTH, timeout=30)
    assert r.status_code == 404 and "no published model named 'nothing'" in r.text, r.text


@pytest.mark.parametrize("compression, status, match", [
    ("int9", 400, "did you mean 'int8'"),
    ({"up": "int8", "down": "topk:0.1"}, 400, "cannot carry the down-link"),
    ({"upp": "int8"}, 400, "did you mean 'up'"),
    ("up=int8,up=fp16", 400, "gives 'up' twice"),
    (8, 422, "compression"),
    (["int8"], 422, "compression"),
    ("x" * 257, 422, "compression"),
])
def test_the_admin_api_refuses_bad_values_by_name(backend, compression, status, match):
    r = httpx.post(f"{backend.url}/api/v1/sessions", json={"model": "nothing",
                                                           "compression": compression},
                   headers=AUTH, timeout=30)
    assert r.status_code == status and match in r.text, r.text


# -- spec strings from anywhere: a normalised dict or a clear error ----------------------------
_CODECS = ["int8", "fp16", "topk:0.01", "rotate+int8", "float32", "npy", "raw", "none",
           "int8:block=64", "INT8", "topk:0", "topk:1.5", "int8:block=0", "int9", "", "fp16:3",
           "topk:fraction=0.5", "int8:block=2048", "topk:1e-3"]
_KEYS = ["up", "down", "UP", "upp", "", "dwn"]


@st.composite
def _specs(draw: st.DrawFn) -> object:
    """Structured spec strings and dicts, near-misses and junk."""
    argument = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.integers(-10, 10**7).map(str), st.text(max_size=6))
    codec = st.one_of(st.sampled_from(_CODECS), st.builds(
        lambda n, x: f"{n}:{x}", st.sampled_from(["topk", "int8", "fp16"]), argument))
    pairs = draw(st.lists(st.tuples(st.sampled_from(_KEYS), codec), max_size=3))
    space = draw(st.sampled_from(["", " "]))
    joined = f",{space}".join(f"{k}{space}={space}{v}" for k, v in pairs)
    return draw(st.one_of(
        st.just(joined), codec, st.text(max_size=40),
        st.just(dict(pairs)),
        st.dictionaries(st.sampled_from(_KEYS), st.one_of(codec, st.integers(), st.none()),
                        max_size=3),
        st.one_of(st.none(), st.integers(), st.booleans(), st.lists(codec, max_size=2))))


def _check_normalised(got: object) -> None:
    if got is None:
        return
    assert isinstance(got, dict) and set(got) == {"up", "down"}, got
    for direction, spec in got.items():
        codec = parse(spec, direction)
        assert (spec == FLOAT32) if codec is None else (codec.spec == spec), got
    assert got != {"up": FLOAT32, "down": FLOAT32}
    assert compression_dict(got) == got  # stored once, reads back the same


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_specs())
def test_any_compression_value_is_a_normalised_dict_or_an_option_error(value):
    try:
        got = compression_dict(value)
    except xflwb.OptionError as exc:
        assert "compression" in str(exc) and "\n" not in str(exc)
        return
    _check_normalised(got)
    assert SessionConfig(compression=value).compression == got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_specs())
def test_the_admin_body_path_normalises_or_refuses_by_name(value):
    """What the admin API does with a body: the generated model, then ``SessionConfig``
    (the route's one validation)."""
    try:
        body = SessionIn(model="m", compression=value)
    except pydantic.ValidationError as exc:
        assert "compression" in str(exc)
        return
    try:
        cfg = SessionConfig(**{k: v for k, v in body.model_dump().items() if k != "model"})
    except xflwb.OptionError as exc:
        assert "compression" in str(exc)
        return
    _check_normalised(cfg.compression)


# -- stored, restored, and rows from before the option -----------------------------------------
@pytest.mark.parametrize("cfg", [
    SessionConfig(compression="up=topk:0.01,down=fp16"),
    SimulationConfig(android=2, ios=1, compression=xflwb.Compression(up="rotate+int8")),
], ids=["session", "simulation"])
def test_from_stored_restores_the_dict_without_validating(cfg):
    stored = json.loads(json.dumps(dataclasses.asdict(cfg)))
    before = _options.validations.copy()
    again = type(cfg).from_stored(stored)
    assert _options.validations == before and again == cfg
    assert again.compression == cfg.compression and again.compression is not None


def test_a_session_row_from_before_the_option_restores_without_compression(tmp_path):
    """An older registry (its session rows have no ``compression`` key) is migrated and its
    rows read back as uncompressed sessions; a new row stores the dict."""
    old = tmp_path / "old" / "xflwb.db"
    old.parent.mkdir()
    _old_database(old)
    with sqlite3.connect(old) as db:  # the config an xflwb before issue 23 wrote, whole
        previous = {k: v for k, v in dataclasses.asdict(SessionConfig(rounds=3)).items()
                    if k != "compression"}
        db.execute("UPDATE sessions SET config = ? WHERE id = 2", (json.dumps(previous),))
    reg = Registry(old.parent)
    try:
        for sid in (1, 2):
            stored = reg.get_session(sid)["config"]
            assert "compression" not in stored
            restored = SessionConfig.from_stored(stored)
            assert restored.compression is None and restored.rounds == 3
        model = reg.latest_model("m")
        sid = reg.create_session(model, SessionConfig(compression="int8", rounds=2))
        stored = reg.get_session(sid)["config"]
        assert stored["compression"] == {"up": "int8", "down": FLOAT32}
        assert SessionConfig.from_stored(stored).compression == stored["compression"]
    finally:
        reg.close()
