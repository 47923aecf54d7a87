"""The manifest: what an export contains and how every parameter maps between layouts.

Saved as ``manifest.json`` beside the artifacts; file names inside it are relative to that
directory. A loaded manifest carries its directory under the private key ``_dir`` (never
written back), so runtimes can find the artifacts from the dict alone.

``Manifest`` describes that dict for the type checker (a ``TypedDict``: at runtime it stays
the plain JSON dict, so every reader of ``manifest.json`` keeps working). Keys marked
``NotRequired`` are absent from some exports: schema /1 lacks the frozen digest and the
per-platform ``trained`` / ``plan``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from xflwb.bridge.params import PLATFORMS
from xflwb.errors import InputError

if TYPE_CHECKING:
    from xflwb.bridge.arrays import Array

SCHEMA = "xflwb.manifest/2"
#: schemas this version reads: /2 added the frozen-weights digest and per-platform plans,
#: and lets iOS hold only the tensors it trains
SCHEMAS = ("xflwb.manifest/1", SCHEMA)
FILENAME = "manifest.json"
REQUIRED = ("schema", "name", "version", "data_type", "input", "classes", "loss", "optimizer",
            "batch_size", "epochs", "parameters", "platforms")
LOSSES = ("categorical_crossentropy", "mse")


class Parameter(TypedDict):
    """One canonical parameter (a Keras trainable weight), in ``trainable_weights`` order."""

    name: str  # the weight's path, e.g. "dense/kernel"
    shape: list[int]
    dtype: str  # "float32"
    layer: str
    role: str  # "kernel", "bias", "gamma", ...


class Input(TypedDict):
    """One sample's input (the batch axis is not listed)."""

    shape: list[int]
    dtype: str
    layout: str  # "ND", "NTC" or "NHWC"
    ids_below: NotRequired[int]  # token ids below the vocabulary size (an Embedding input)


class Optimizer(TypedDict):
    """``xflwb.bridge.optim``'s ``to_dict``: the type and its hyper-parameters."""

    type: str  # "sgd" or "adam"
    learning_rate: float
    momentum: NotRequired[float]  # sgd
    beta_1: NotRequired[float]  # adam
    beta_2: NotRequired[float]
    epsilon: NotRequired[float]


class FrozenDigest(TypedDict):
    """sha256 of the non-trainable weights baked into every artifact (schema /2)."""

    sha256: str
    tensors: int
    elements: int


class CoreMLLayer(TypedDict):
    """One tensor an iOS phone holds, in its order: an updatable layer's weights or bias."""

    name: str  # the Core ML layer
    type: str  # "weights" or "bias"
    updatable: bool
    shape: list[int]  # Core ML layout
    canonical: int | None  # index into ``parameters``
    layout: str  # how ``params.to_platform_array`` maps it
    chw: NotRequired[list[int]]  # schema /1's "dense_chw" layout: the flattened map


class Signature(TypedDict):
    """A TFLite signature's tensor names."""

    inputs: list[str]
    outputs: NotRequired[list[str]]  # "restore" has none


#: one row of a platform's trainability plan (``class`` is a keyword, hence this spelling)
PlanRow = TypedDict("PlanRow", {"layer": str, "class": str, "status": str, "why": str})


class Platform(TypedDict):
    """One platform's artifact and how its tensors map to the canonical parameters.

    One type for both platforms, because code indexes ``platforms`` by a platform name
    held in a variable; the keys only one platform has are ``NotRequired``.
    """

    file: str  # relative to the manifest's directory
    sha256: str
    bytes: int
    trained: NotRequired[list[int]]  # canonical indices this platform trains (schema /2)
    plan: NotRequired[list[PlanRow]]  # per layer: trained / frozen / runs (schema /2)
    # android
    tflite_layers: NotRequired[list[int]]  # bytes of each canonical parameter
    signatures: NotRequired[dict[str, Signature]]
    label_format: NotRequired[str]
    # ios
    coreml_layers: NotRequired[list[CoreMLLayer]]
    input_name: NotRequired[str]
    input_shape: NotRequired[list[int]]
    output_name: NotRequired[str]
    target_name: NotRequired[str]
    target_dtype: NotRequired[str]
    flatten_mode: NotRequired[str]
    allowed_epochs: NotRequired[list[int]]  # [min, max]
    allowed_batch_sizes: NotRequired[list[int]]  # [min, max]
    specification_version: NotRequired[int]
    layers: NotRequired[int]


class Source(TypedDict):
    """The Keras model the export came from, and the initial parameters beside it."""

    keras_file: str
    keras_class: str
    initial_parameters: str
    sha256: NotRequired[str]  # set once the export is final


class Manifest(TypedDict):
    """``manifest.json``: the keys of ``REQUIRED`` and the ones exports add."""

    schema: str
    name: str
    version: int
    data_type: str
    input: Input
    classes: int | None  # None unless the loss is categorical cross-entropy
    loss: str
    optimizer: Optimizer
    batch_size: int
    epochs: int
    parameters: list[Parameter]
    platforms: dict[str, Platform]  # "android" and/or "ios"
    output_shape: NotRequired[list[int]]
    has_dropout: NotRequired[bool]
    frozen: NotRequired[FrozenDigest]  # schema /2
    ios_training: NotRequired[str]  # schema /2: "auto" or "strict"
    batchnorm: NotRequired[str]
    source: NotRequired[Source]
    created: NotRequired[str]
    _dir: NotRequired[str]  # a loaded manifest's directory (never written)


class ManifestError(InputError):
    """A manifest is missing keys or contradicts itself."""

    __module__ = "xflwb"  # public as xflwb.ManifestError in every process (xflwb/__init__.py)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(manifest: dict[str, Any] | Manifest) -> Manifest:
    """Check the keys and the internal consistency that aggregation relies on; the checked
    dict comes back typed as the ``Manifest`` it now is (the same object)."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks required keys {missing}")
    if manifest["schema"] not in SCHEMAS:
        raise ManifestError(f"unknown manifest schema {manifest['schema']!r}; expected one of "
                            f"{SCHEMAS}")
    if manifest["loss"] not in LOSSES:
        raise ManifestError(f"unknown loss {manifest['loss']!r}")
    n = len(manifest["parameters"])
    plats = manifest["platforms"]
    if not plats:
        raise ManifestError("manifest lists no platform")
    for name in plats:
        if name not in PLATFORMS:
            raise ManifestError(f"unknown platform {name!r} in manifest")
        for key in ("file", "sha256", "bytes"):
            if key not in plats[name]:
                raise ManifestError(f"platforms.{name} lacks {key!r}")
    if "android" in plats:
        layers = plats["android"].get("tflite_layers")
        if layers is None or len(layers) != n:
            raise ManifestError(f"platforms.android.tflite_layers must list {n} sizes")
    if "ios" in plats:
        entries = plats["ios"].get("coreml_layers")
        if entries is None:
            raise ManifestError("platforms.ios lacks coreml_layers")
        covered = {e.get("canonical") for e in entries}
        for e in entries:
            idx = e.get("canonical")
            if idx is not None and not (isinstance(idx, int) and 0 <= idx < n):
                raise ManifestError(f"coreml_layers entry {e.get('name')!r} points at canonical "
                                    f"parameter {idx!r}, outside 0..{n - 1}")
        if manifest["schema"] == "xflwb.manifest/1":
            for i in range(n):
                if i not in covered:
                    raise ManifestError(f"canonical parameter {i} "
                                        f"({manifest['parameters'][i]['name']}) has no iOS tensor")
    for name in plats:
        trained = plats[name].get("trained")
        if trained is not None and any(not isinstance(i, int) or not 0 <= i < n
                                       for i in trained):
            raise ManifestError(f"platforms.{name}.trained lists indices outside 0..{n - 1}")
    return cast("Manifest", manifest)


def save(manifest: Manifest, directory: Path) -> Path:
    """Write ``manifest.json`` into ``directory``; refuses to overwrite."""
    path = Path(directory) / FILENAME
    if path.exists():
        raise FileExistsError(f"{path} exists; exports never overwrite")
    public = {k: v for k, v in manifest.items() if not k.startswith("_")}
    path.write_text(json.dumps(public, indent=2, sort_keys=False) + "\n")
    return path


def load(path: str | Path) -> Manifest:
    """Load a manifest from a ``manifest.json`` path or an export directory."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    manifest = validate(raw)
    manifest["_dir"] = str(path.parent.resolve())
    return manifest


def class_count(manifest: Manifest) -> int:
    """The classes of a cross-entropy model (the only loss that has them)."""
    classes = manifest["classes"]
    if classes is None:
        raise ManifestError(f"model '{manifest['name']}' lists no classes; only a "
                            "categorical_crossentropy export has them (re-export it)")
    return int(classes)


def initial_parameters(manifest: Manifest) -> list[Array]:
    """The exported model's canonical parameters, read without TensorFlow."""
    import numpy as np

    base = manifest.get("_dir")
    fname = manifest.get("source", {}).get("initial_parameters")
    if base is None or fname is None:
        raise ManifestError("manifest has no initial parameters file (re-export the model)")
    from xflwb.bridge.params import load_npz

    arrays = [a.astype(np.float32) for a in load_npz(Path(base) / fname)]
    shapes = [tuple(p["shape"]) for p in manifest["parameters"]]
    if [a.shape for a in arrays] != shapes:
        raise ManifestError(f"{fname} does not match the manifest's parameter shapes")
    return arrays


def artifact_path(manifest: Manifest, platform: str) -> Path:
    """Absolute path of a platform's artifact; needs a manifest that knows its directory."""
    if platform == "keras":
        entry = manifest.get("source", {})
        if "keras_file" not in entry:
            raise ManifestError("manifest has no Keras source model")
        fname = entry["keras_file"]
    else:
        if platform not in manifest.get("platforms", {}):
            raise ManifestError(f"model '{manifest.get('name')}' was not exported for {platform}")
        fname = manifest["platforms"][platform]["file"]
    base = manifest.get("_dir")
    if base is None:
        raise ManifestError("this manifest dict does not know its directory; load it with "
                            "xflwb.bridge.manifest.load(path) or pass the manifest path")
    return Path(base) / fname
