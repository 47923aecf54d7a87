"""``xflwb.export``: one Keras model → trainable TFLite + updatable Core ML + manifest + parity.

Each export is built in a hidden staging directory and renamed to ``<out>/<name>/v<N>`` only
when complete, so a failed export leaves nothing behind and an existing version is never
touched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xflwb._quiet import quiet
from xflwb.bridge import coreml as coreml_builder
from xflwb.bridge import graph as graph_mod
from xflwb.bridge import health, params
from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge import parity as parity_mod
from xflwb.bridge import tflite as tflite_builder
from xflwb.bridge.arrays import Array
from xflwb.bridge.graph import ExportError
from xflwb.bridge.health import ExportWarning
from xflwb.bridge.manifest import Input, Manifest, PlanRow
from xflwb.bridge.optim import did_you_mean, resolve_optimizer
from xflwb.bridge.params import PLATFORMS
from xflwb.errors import InputError

LOSS_ALIASES = {"categorical_crossentropy": "categorical_crossentropy",
                "sparse_categorical_crossentropy": "categorical_crossentropy",
                "cce": "categorical_crossentropy", "crossentropy": "categorical_crossentropy",
                "mse": "mse", "mean_squared_error": "mse"}
INITIAL_FILE = "initial_parameters.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DropoutWarning(UserWarning):
    """Core ML trains without dropout, so iOS and Android/Keras training differ."""

    __module__ = "xflwb"  # public as xflwb.DropoutWarning in every process (xflwb/__init__.py)


@dataclass
class ExportResult:
    """What ``export`` produced; ``_repr_html_`` renders the export report in notebooks."""

    name: str
    version: int
    directory: Path
    paths: dict[str, Path]
    manifest: Manifest
    parity: pd.DataFrame
    layers: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def parameters(self) -> pd.DataFrame:
        from xflwb.bridge.report import parameter_table

        return parameter_table(self.manifest)

    def _repr_html_(self) -> str:
        from xflwb.bridge.report import export_report_html

        return export_report_html(self)

    def __repr__(self) -> str:
        ok = bool(self.parity["ok"].all()) if len(self.parity) else True
        return (f"ExportResult(name={self.name!r}, version={self.version}, "
                f"platforms={list(self.manifest['platforms'])}, parity={'ok' if ok else 'FAILED'},"
                f" directory='{self.directory}')")


def _check_args(name: Any, loss: Any, batch_size: Any, epochs: Any,
                platforms: Any) -> tuple[str, tuple[str, ...]]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"name {name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit")
    if not isinstance(loss, str) or loss.lower() not in LOSS_ALIASES:
        raise InputError(f"unsupported loss {loss!r}{did_you_mean(loss, LOSS_ALIASES)} (use "
                         "'categorical_crossentropy' for integer labels, or 'mse')")
    for what, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be a positive integer, got {value!r}")
    if isinstance(platforms, str):
        platforms = tuple(p.strip() for p in platforms.split(",") if p.strip())
    plats = tuple(dict.fromkeys(platforms))
    bad = [p for p in plats if p not in PLATFORMS]
    if bad or not plats:
        hint = did_you_mean(bad[0], PLATFORMS) if bad else ""
        raise InputError(f"platforms must be a non-empty subset of {PLATFORMS}, got "
                         f"{platforms!r}{hint}")
    return LOSS_ALIASES[loss.lower()], plats


def next_version(root: Path) -> int:
    versions = [int(m.group(1)) for p in root.glob("v*") if (m := re.fullmatch(r"v(\d+)", p.name))]
    return max(versions, default=0) + 1


def _android_plan(graph: graph_mod.ModelGraph) -> dict[str, tuple[str, str]]:
    """TFLite trains every canonical parameter; frozen layers are baked."""
    plan = {}
    for n in graph.nodes:
        if n.frozen:
            plan[n.name] = ("frozen", "trainable=False: baked into the artifact")
        elif n.params:
            plan[n.name] = ("trained", "")
        else:
            plan[n.name] = ("runs", "")
    return plan


def layer_table(graph: graph_mod.ModelGraph, plans: dict[str, dict[str, tuple[str, str]]]
                ) -> pd.DataFrame:
    """The trainability plan as a table: one row per layer, one column per platform."""
    rows = []
    for n in graph.nodes:
        # every weight, frozen ones too (Keras' count): a frozen conv is not "0 parameters"
        row = {"layer": n.name, "type": n.keras_class, "output_shape": str(n.out_shape),
               "params": sum(int(np.prod(w.shape)) for w in getattr(n.layer, "weights", [])),
               "frozen": n.frozen}
        for p in PLATFORMS:
            if p not in plans:
                row[p] = "-"
                continue
            status, why = plans[p][n.name]
            if n.keras_class == "Dropout" and p == "ios":
                status, why = "identity", "no dropout in Core ML"
            row[p] = status
            row[f"{p}_why"] = why
        rows.append(row)
    cols = ["layer", "type", "output_shape", "params", "frozen"]
    for p in PLATFORMS:
        cols += [p] + ([f"{p}_why"] if p in plans else [])
    return pd.DataFrame(rows, columns=cols)


def export(model: Any, name: str, *, data_type: str | None = None,
           out_dir: str | os.PathLike[str] = "artifacts",
           loss: str = "categorical_crossentropy", optimizer: Any = None,
           batch_size: int = 32, epochs: int = 1,
           platforms: Sequence[str] | str = PLATFORMS,
           strict: bool = True, check_parity: bool = True,
           ios_training: str = "auto", verbose: bool | None = None) -> ExportResult:
    """Export ``model`` for Android (TFLite) and iOS (Core ML) and prove they agree.

    Each platform trains what it can: Android every trainable weight; iOS the convolution /
    innerProduct layers Core ML can update. ``ios_training="auto"`` freezes the rest on iOS
    (Android still trains them; the masked aggregation keeps iOS's frozen copies out of
    their average), ``"strict"`` refuses instead, naming each layer. Layers with
    ``trainable=False`` are baked into both artifacts and never travel.

    Raises ``ExportError`` naming every layer a platform cannot handle, and
    ``ParityError`` when the artifacts disagree with Keras beyond 1e-4 (unless
    ``strict=False``, which keeps the export and reports the failure in ``res.parity``).
    Warns (``ExportWarning``, also listed in the report) when the model cannot learn: a
    frozen backbone whose output is constant on a probe batch, or one training step that
    leaves the loss where it was. ``xflwb.export`` also warns when ``data_type`` names a
    registered dataset the model cannot train on.

    TensorFlow's and the converter's log lines are hidden (``verbose=True`` shows them;
    ``None`` follows ``XFLWB_VERBOSE``); a failed conversion's error carries its log.
    """
    res, pending = build_export(model, name, data_type=data_type, out_dir=out_dir, loss=loss,
                                optimizer=optimizer, batch_size=batch_size, epochs=epochs,
                                platforms=platforms, strict=strict,
                                check_parity=check_parity, ios_training=ios_training,
                                verbose=verbose)
    issue(pending, stacklevel=2)  # the caller of export()
    return res


#: warnings an export found, issued by whoever called it (so they point at the user's line)
Pending = list[tuple[type[Warning], str]]


def issue(pending: Pending, stacklevel: int) -> None:
    """Issue ``pending``; ``stacklevel`` as ``warnings.warn`` counts from issue's caller."""
    for category, message in pending:
        warnings.warn(message, category, stacklevel=stacklevel + 1)


#: the latest export of this process per data type, while the caller holds it: a fleet
#: spawned in this kernel checks its dataset against it before it is even published
_LATEST: weakref.WeakValueDictionary[str, ExportResult] = weakref.WeakValueDictionary()


def latest_export(data_type: str) -> ExportResult | None:
    """The newest export for ``data_type`` this process made and still holds, if any."""
    return _LATEST.get(data_type)


def build_export(model: Any, name: str, *, data_type: str | None = None,
                 out_dir: str | os.PathLike[str] = "artifacts",
                 loss: str = "categorical_crossentropy", optimizer: Any = None,
                 batch_size: int = 32, epochs: int = 1,
                 platforms: Sequence[str] | str = PLATFORMS,
                 strict: bool = True, check_parity: bool = True,
                 ios_training: str = "auto", verbose: bool | None = None
                 ) -> tuple[ExportResult, Pending]:
    """``export`` without issuing its warnings: returns them, for the caller to issue."""
    with quiet(verbose):
        res, pending = _export(model, name, data_type, out_dir, loss, optimizer, batch_size,
                               epochs, platforms, strict, check_parity, ios_training)
    _LATEST[str(res.manifest["data_type"])] = res
    return res, pending


def _export(model: Any, name: str, data_type: str | None, out_dir: str | os.PathLike[str],
            loss: str, optimizer: Any, batch_size: int, epochs: int,
            platforms: Sequence[str] | str, strict: bool, check_parity: bool,
            ios_training: str) -> tuple[ExportResult, Pending]:
    t0 = time.perf_counter()
    loss, plats = _check_args(name, loss, batch_size, epochs, platforms)
    if ios_training not in coreml_builder.IOS_TRAINING:
        raise InputError(f"ios_training must be one of {coreml_builder.IOS_TRAINING}, got "
                         f"{ios_training!r}"
                         f"{did_you_mean(ios_training, coreml_builder.IOS_TRAINING)}")
    opt = resolve_optimizer(optimizer)
    graph = graph_mod.analyze(model)
    if not graph.parameters:
        raise ExportError(f"model '{model.name}' has no trainable weights: nothing to train "
                          "federatedly; unfreeze at least its head")
    if loss == "categorical_crossentropy":
        if len(graph.output_shape) != 1 or graph.final_activation != "softmax":
            raise ExportError(
                f"loss 'categorical_crossentropy' needs a model that ends in softmax over a "
                f"flat output (got activation '{graph.final_activation}', output shape "
                f"{graph.output_shape}); add activation='softmax' to the last layer or use "
                "loss='mse'")
        classes: int | None = int(graph.output_shape[0])
    else:
        classes = None
    # iOS first: it refuses more, and nothing unsupported may reach either converter
    ios_build = None
    if "ios" in plats:
        ios_build = coreml_builder.build(graph, loss, opt, batch_size, epochs, ios_training)
    notes: list[str] = []
    pending: Pending = []
    if graph.has_dropout and "ios" in plats:
        msg = ("model uses Dropout; Core ML has no dropout layer, so iOS trains without it "
               "(Keras/Android training differs from iOS training)")
        pending.append((DropoutWarning, msg))
        notes.append(msg)
    plans = {"android": _android_plan(graph)} if "android" in plats else {}
    if ios_build is not None:
        plans["ios"] = ios_build.plan
        frozen_ios = [k for k, (st, _) in ios_build.plan.items() if st != "trained"
                      and st.endswith("on iOS")]
        if frozen_ios:
            notes.append(f"iOS freezes {len(frozen_ios)} layer(s) Core ML cannot update "
                         f"({', '.join(frozen_ios[:4])}{' …' if len(frozen_ios) > 4 else ''}); "
                         "Android trains them (see the plan table)")

    canon = params.canonical(model)
    root = Path(out_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(out_dir) / f".{name}.staging-{os.getpid()}-{time.time_ns()}"
    stage.mkdir(parents=True)
    try:
        m = _build(model, graph, canon, stage, name, data_type or name, loss, opt, batch_size,
                   epochs, plats, classes, ios_build, plans, ios_training)
        m["_dir"] = str(stage.resolve())
        report = pd.DataFrame(columns=parity_mod.COLUMNS)
        keras_rt = _keras_runtime(m)
        if check_parity:
            report = run_parity(m, graph, plats, keras_rt)
            if strict:
                parity_mod.assert_ok(report)
        for msg in learning_warnings(m, graph, keras_rt):
            pending.append((ExportWarning, msg))
            notes.append(msg)
        # claim the next version atomically: rename fails if another export took it
        while True:
            version = next_version(root)
            final = root / f"v{version}"
            m["version"] = version
            try:
                _finalise(stage, m, version, plats)
                stage.rename(final)
                break
            except OSError:
                if final.exists():
                    _unfinalise(stage, m, plats)
                    continue
                raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    m["_dir"] = str(final.resolve())
    paths = {"manifest": final / manifest_mod.FILENAME,
             "keras": final / m["source"]["keras_file"]}
    for p in plats:
        paths[p] = final / m["platforms"][p]["file"]
    return ExportResult(name, version, final.resolve(), paths, m, report,
                        layer_table(graph, plans), notes, time.perf_counter() - t0), pending


def _keras_runtime(m: Manifest) -> Any:
    from xflwb.bridge import runtime

    return runtime.load(m, "keras")


def learning_warnings(m: Manifest, graph: graph_mod.ModelGraph,
                      keras_rt: Any) -> list[str]:
    """Can the model learn? A constant frozen backbone, a loss one step cannot move."""
    x, y = parity_mod.sample_data(m)
    out = []
    backbone = health.constant_backbone(graph, x)
    if backbone:
        out.append(backbone)
    before, after = parity_mod.loss_step(keras_rt, x, y)
    still = health.still_loss(before, after, float(m["optimizer"].get("learning_rate", 0)))
    if still:
        out.append(still)
    return out


def _plan_rows(plan: dict[str, tuple[str, str]], graph: graph_mod.ModelGraph
               ) -> list[PlanRow]:
    return [{"layer": n.name, "class": n.keras_class, "status": plan[n.name][0],
             "why": plan[n.name][1]} for n in graph.nodes]


def _build(model: Any, graph: graph_mod.ModelGraph, canon: list[Array], stage: Path, name: str,
           data_type: str, loss: str, opt: Any, batch_size: int, epochs: int,
           plats: tuple[str, ...], classes: int | None, ios_build: Any,
           plans: dict[str, dict[str, tuple[str, str]]], ios_training: str) -> Manifest:
    keras_file = "model.keras"
    model.save(str(stage / keras_file))
    # the starting point for sessions, readable without TensorFlow (servers stay light)
    params.save_npz(stage / INITIAL_FILE, [np.asarray(a, np.float32) for a in canon])
    model_input: Input = {"shape": list(graph.input_shape), "dtype": "float32",
                          "layout": {1: "ND", 2: "NTC", 3: "NHWC"}[len(graph.input_shape)]}
    if graph.ids_below:
        model_input["ids_below"] = graph.ids_below
    m: Manifest = {
        "schema": manifest_mod.SCHEMA, "name": name, "version": 0, "data_type": data_type,
        "input": model_input,
        "output_shape": list(graph.output_shape),
        "classes": classes, "loss": loss, "optimizer": opt.to_dict(),
        "batch_size": batch_size, "epochs": epochs,
        "parameters": graph.parameters, "has_dropout": graph.has_dropout,
        "frozen": graph.frozen, "ios_training": ios_training,
        "batchnorm": "moving statistics, frozen on every platform",
        "platforms": {},
        "source": {"keras_file": keras_file, "keras_class": type(model).__name__,
                   "initial_parameters": INITIAL_FILE},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "android" in plats:
        data = tflite_builder.build(model, graph, loss, opt)
        (stage / _STAGED["android"]).write_bytes(data)
        m["platforms"]["android"] = {
            "file": _STAGED["android"], "sha256": "", "bytes": len(data),
            "tflite_layers": [int(np.prod(p["shape"])) * 4 for p in graph.parameters],
            "signatures": {"train": {"inputs": ["x", "y"], "outputs": ["loss"]},
                           "infer": {"inputs": ["x"], "outputs": ["logits"]},
                           "parameters": {"inputs": [],
                                          "outputs": [f"a{i}" for i in
                                                      range(len(graph.parameters))]},
                           "restore": {"inputs": [f"a{i}" for i in
                                                  range(len(graph.parameters))]}},
            "label_format": "one_hot_float32" if loss == "categorical_crossentropy"
            else "float32",
            "trained": list(range(len(graph.parameters))),
            "plan": _plan_rows(plans["android"], graph),
        }
    if ios_build is not None:
        coreml_builder.save(ios_build.spec, stage / _STAGED["ios"])
        io = ios_build.io
        m["platforms"]["ios"] = {"file": _STAGED["ios"], "sha256": "",
                                 "bytes": (stage / _STAGED["ios"]).stat().st_size,
                                 "coreml_layers": ios_build.coreml_layers,
                                 "input_name": io["input_name"],
                                 "input_shape": io["input_shape"],
                                 "output_name": io["output_name"],
                                 "target_name": io["target_name"],
                                 "target_dtype": io["target_dtype"],
                                 "flatten_mode": io["flatten_mode"],
                                 "allowed_epochs": io["allowed_epochs"],
                                 "allowed_batch_sizes": io["allowed_batch_sizes"],
                                 "specification_version": io["specification_version"],
                                 "layers": io["layers"],
                                 "trained": ios_build.trained,
                                 "plan": _plan_rows(plans["ios"], graph)}
    return m


# artifacts are staged under fixed names until the version is known; _finalise renames them
_STAGED = {"android": "android.tflite", "ios": "ios.mlmodel"}
_EXT = {"android": "tflite", "ios": "mlmodel"}


def _finalise(stage: Path, m: Manifest, version: int, plats: tuple[str, ...]) -> None:
    """Give artifacts versioned names (phones cache by file name), hash them, write JSON."""
    for p in plats:
        src = stage / m["platforms"][p]["file"]
        dst = stage / f"{m['name']}-v{version}.{_EXT[p]}"
        src.rename(dst)
        m["platforms"][p]["file"] = dst.name
        m["platforms"][p]["sha256"] = manifest_mod.sha256(dst)
        m["platforms"][p]["bytes"] = dst.stat().st_size
    m["source"]["sha256"] = manifest_mod.sha256(stage / m["source"]["keras_file"])
    manifest_mod.validate(m)
    manifest_mod.save(m, stage)


def _unfinalise(stage: Path, m: Manifest, plats: tuple[str, ...]) -> None:
    (stage / manifest_mod.FILENAME).unlink(missing_ok=True)
    for p in plats:
        cur = stage / m["platforms"][p]["file"]
        cur.rename(stage / _STAGED[p])
        m["platforms"][p]["file"] = _STAGED[p]


def run_parity(m: Manifest, graph: graph_mod.ModelGraph,
               plats: tuple[str, ...], keras_rt: Any = None) -> pd.DataFrame:
    """Parity of every platform against Keras trained with *that platform's* plan."""
    from xflwb.bridge import runtime
    from xflwb.bridge.runtime.keras import KerasRuntime

    runtimes = {"keras": keras_rt if keras_rt is not None else runtime.load(m, "keras")}
    for p in plats:
        runtimes[p] = runtime.load(m, p)
    references: dict[str, Any] = {}
    if "ios" in plats:
        mask = params.trained_mask(m, "ios")
        if not all(mask) or graph.has_dropout:
            references["ios"] = KerasRuntime(m, manifest_mod.artifact_path(m, "keras"),
                                             dropout=False, train_mask=mask)
    return parity_mod.check(m, runtimes, references)
