"""One error tree (issue 22 item 4): every error xflwb raises on purpose is an ``XflwbError``.

The walk imports every module of the package and collects each ``Exception`` subclass it
defines, so a new error class that forgets the root fails here; the builtin each one was
before the tree (``ValueError``, ``TimeoutError``, ...) is kept so ``except ValueError``
in a caller's code still works.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import keras
import pytest

import xflwb
from xflwb import errors

#: private control-flow exceptions: never reach a user (each is caught inside its module)
PRIVATE: dict[str, str] = {
    "_Dropped": "xflwb.devices.device: a simulated connection loss mid-fit, caught by the "
                "device's own loop (it reconnects, as a phone would)",
    "_BadArg": "xflwb.devices.partition: a partition argument's problem, caught by "
               "partition.parse and re-raised as an InputError naming the whole spec",
    "_TooLarge": "xflwb.server.http.limits: Starlette's HTTPException turned into the 413 "
                 "response by the ASGI middleware; Python callers never see it",
}

#: internal, though not underscored: collected, never raised past its module
INTERNAL: dict[str, str] = {
    "Refused": "xflwb.bridge.coreml_emit: one layer iOS cannot run; coreml.build gathers "
               "every layer's Refused into one ExportError (test below)",
}

#: the builtin base each class had before the tree, which callers may catch
BUILTINS: dict[str, type[BaseException]] = {
    "OptionError": ValueError,
    "UnknownOptionError": TypeError,
    "CommandLineError": ValueError,
    "MagicUsageError": ValueError,
    "ManifestError": ValueError,
    "ExportError": ValueError,
    "CoreMLRuleError": ValueError,
    "IncompatibleData": ValueError,
    "DeviceError": RuntimeError,
    "CorruptModelError": RuntimeError,
    "RegistryError": ValueError,
    "NotFound": ValueError,
    "TelemetryRefused": ValueError,
    "DeviceNotYours": ValueError,
    "SessionConflict": ValueError,
    "SessionTimeout": TimeoutError,
    "CheckpointError": RuntimeError,
    "BackendRunning": OSError,
    "AdminError": RuntimeError,
    "PrivacyLineageError": RuntimeError,
}

#: the category each class sits under
CATEGORY: dict[str, type[errors.XflwbError]] = {
    "OptionError": errors.InputError,
    "CommandLineError": errors.InputError,
    "MagicUsageError": errors.InputError,
    "ManifestError": errors.InputError,
    "IncompatibleData": errors.InputError,
    "TraceError": errors.InputError,
    "NoClientAvailable": errors.InputError,
    "ExportError": errors.ExportFailure,
    "CoreMLRuleError": errors.ExportFailure,
    "ParityError": errors.ExportFailure,
    "DeviceError": errors.DeviceFailure,
    "RegistryError": errors.BackendError,
    "TokenRefused": errors.BackendError,
    "AdminError": errors.BackendError,
    "BackendRunning": errors.BackendError,
    "SessionTimeout": errors.SessionFailure,
    "CheckpointError": errors.SessionFailure,
    "PrivacyLineageError": errors.PrivacyError,
}


def _xflwb_exceptions() -> dict[str, type[Exception]]:
    """Every Exception subclass (warnings aside) defined in a module of xflwb, by name."""
    found: dict[str, type[Exception]] = {}
    for info in pkgutil.walk_packages(xflwb.__path__, "xflwb."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # importing it runs the command
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, Exception)
                    and not issubclass(obj, Warning)
                    and obj.__module__.split(".")[0] == "xflwb"):
                other = found.setdefault(obj.__name__, obj)
                assert other is obj, f"two xflwb exceptions named {obj.__name__}"
    return found


FOUND = _xflwb_exceptions()


def test_the_walk_sees_the_known_classes():
    """The walk is no vacuous pass: it finds the classes the tables name."""
    for name in {*PRIVATE, *INTERNAL, *BUILTINS, *CATEGORY}:
        assert name in FOUND, f"{name} is gone: update the tables of this test"


def test_every_xflwb_error_derives_from_the_root():
    left_out = {*PRIVATE, *INTERNAL}
    stray = sorted(f"{cls.__module__}.{cls.__qualname__}" for name, cls in FOUND.items()
                   if name not in left_out and not issubclass(cls, errors.XflwbError))
    assert not stray, f"not under xflwb.XflwbError: {stray}"


def test_private_ones_are_private():
    assert all(name.startswith("_") for name in PRIVATE)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_the_builtin_base_is_kept(name):
    assert issubclass(FOUND[name], BUILTINS[name])


@pytest.mark.parametrize("name", sorted(CATEGORY))
def test_each_class_sits_under_its_category(name):
    assert issubclass(FOUND[name], CATEGORY[name])


def test_categories_keep_their_builtins():
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.UpdateRejected, ValueError)
    for cat in (errors.SessionFailure, errors.BackendError, errors.DeviceFailure):
        assert issubclass(cat, RuntimeError)


def test_parity_error_is_no_assertion_error():
    """``python -O`` strips asserts, and ``except AssertionError`` is for test failures:
    a parity failure is an export failure."""
    assert not issubclass(xflwb.ParityError, AssertionError)
    assert issubclass(xflwb.ParityError, errors.ExportFailure)


def test_the_facade_exports_the_tree():
    for name in errors.__all__:
        assert name in xflwb.__all__ and getattr(xflwb, name) is getattr(errors, name)


def test_the_magics_error_is_an_xflwb_error():
    from xflwb.magics import MagicUsageError, XflMagicError

    assert issubclass(XflMagicError, errors.XflwbError)
    assert MagicUsageError.__mro__.index(XflMagicError) < MagicUsageError.__mro__.index(
        errors.InputError)


def test_refused_never_escapes_the_core_ml_build():
    """``Refused`` (per layer) stays inside the bridge: the user gets one ExportError
    naming each layer."""
    from xflwb.bridge import coreml, graph

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Normalization(invert=True, mean=0.0, variance=1.0),
        keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(xflwb.ExportError, match=r"layer 'normalization'.*invert=True"):
        coreml.build(graph.analyze(model), "categorical_crossentropy", xflwb.SGD(), 8, 1)


def test_a_bad_option_is_an_input_error_and_still_a_value_error():
    with pytest.raises(errors.InputError, match=r"min_clients must be in 1\.\.2") as info:
        xflwb.SimulationConfig(android=2, min_clients=3)
    assert isinstance(info.value, ValueError)
    with pytest.raises(errors.InputError, match="secagg needs at least 2 clients"):
        xflwb.SimulationConfig(android=1, min_clients=1, secagg={})
    with pytest.raises(xflwb.UnknownOptionError) as typo:
        xflwb.SessionConfig(min_client=2)
    assert isinstance(typo.value, TypeError) and isinstance(typo.value, errors.XflwbError)
