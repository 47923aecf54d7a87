"""The manifest: what an export contains and how every parameter maps between layouts.

Saved as ``manifest.json`` beside the artifacts; file names inside it are relative to that
directory. A loaded manifest carries its directory under the private key ``_dir`` (never
written back), so runtimes can find the artifacts from the dict alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xflwb.bridge.params import PLATFORMS
from xflwb.errors import InputError

SCHEMA = "xflwb.manifest/2"
#: schemas this version reads: /2 added the frozen-weights digest and per-platform plans,
#: and lets iOS hold only the tensors it trains
SCHEMAS = ("xflwb.manifest/1", SCHEMA)
FILENAME = "manifest.json"
REQUIRED = ("schema", "name", "version", "data_type", "input", "classes", "loss", "optimizer",
            "batch_size", "epochs", "parameters", "platforms")
LOSSES = ("categorical_crossentropy", "mse")


class ManifestError(InputError):
    """A manifest is missing keys or contradicts itself."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(manifest: dict[str, Any]) -> dict[str, Any]:
    """Check the keys and the internal consistency that aggregation relies on."""
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
    return manifest


def save(manifest: dict[str, Any], directory: Path) -> Path:
    """Write ``manifest.json`` into ``directory``; refuses to overwrite."""
    path = Path(directory) / FILENAME
    if path.exists():
        raise FileExistsError(f"{path} exists; exports never overwrite")
    public = {k: v for k, v in manifest.items() if not k.startswith("_")}
    path.write_text(json.dumps(public, indent=2, sort_keys=False) + "\n")
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a manifest from a ``manifest.json`` path or an export directory."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    validate(manifest)
    manifest["_dir"] = str(path.parent.resolve())
    return manifest


def initial_parameters(manifest: dict[str, Any]) -> list:
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


def artifact_path(manifest: dict[str, Any], platform: str) -> Path:
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
