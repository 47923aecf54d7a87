"""One parameter representation (canonical = Keras ``trainable_weights``) and its platform views.

Android holds the canonical tensors as they are (the ``parameters`` signature returns
``a0..aN``). iOS holds the tensors it trains — the weights and bias of each updatable
convolution / innerProduct layer, in Core ML layout, in ``coreml_layers`` order; canonical
parameters iOS does not train are baked into its artifact and never travel. Every mapping is
a pure permutation of elements, so round trips are exact. The wire carries tensors as raw
little-endian float32 (FedKit, Flower Android) or ``.npy`` (Flower's iOS SDK);
``decode_tensor`` accepts both.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from xflwb.bridge.arrays import AnyArray, Array

if TYPE_CHECKING:  # manifest imports this module (PLATFORMS)
    from xflwb.bridge.manifest import CoreMLLayer, Manifest

PLATFORMS = ("android", "ios")
NPY_MAGIC = b"\x93NUMPY"


# -- canonical -------------------------------------------------------------------------------
def canonical(keras_model: Any) -> list[Array]:
    """The model's trainable weights, in Keras order and layout, as float32 copies."""
    return [np.array(v.numpy(), dtype=np.float32) for v in keras_model.trainable_weights]


# -- single-array layout transforms -----------------------------------------------------------
def to_platform_array(k: Array, layout: str, chw: Sequence[int] | None = None
                      ) -> Array:
    """Canonical (Keras) array → Core ML layout."""
    if layout == "identity":
        return k
    if layout == "dense":  # Dense (in, out) → innerProduct [out, in]
        return np.ascontiguousarray(k.T)
    if layout == "dense_chw":
        # Keras flattens (h, w, c); Core ML's CHANNEL_FIRST flatten orders (c, h, w):
        # permute the kernel's rows to match, then transpose to [out, in].
        if chw is None:
            raise ValueError("the dense_chw layout needs the flattened map's (c, h, w)")
        c, h, w = chw
        out = k.shape[1]
        return np.ascontiguousarray(
            k.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(-1, out).T)
    if layout == "conv":  # (kh, kw, in/g, out) → [out, in/g, kh, kw]
        return np.ascontiguousarray(k.transpose(3, 2, 0, 1))
    if layout == "conv1d":  # Conv1D (k, in/g, out) → [out, in/g, 1, k]
        return np.ascontiguousarray(k.transpose(2, 1, 0)[:, :, None, :])
    if layout == "depthwise":  # (kh, kw, in, mult) → [in·mult, 1, kh, kw]
        kh, kw, cin, mult = k.shape
        return np.ascontiguousarray(k.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None])
    if layout == "dense_conv":  # Dense on a map / Embedding table (in, out) → [out, in, 1, 1]
        return np.ascontiguousarray(k.T[:, :, None, None])
    raise ValueError(f"unknown layout {layout!r}")


def from_platform_array(w: Array, layout: str, chw: Sequence[int] | None = None,
                        shape: Sequence[int] | None = None) -> Array:
    """Core ML layout → canonical (Keras) array; the exact inverse of ``to_platform_array``."""
    if layout == "identity":
        return w
    if layout == "dense":
        return np.ascontiguousarray(w.T)
    if layout == "dense_chw":
        if chw is None:
            raise ValueError("the dense_chw layout needs the flattened map's (c, h, w)")
        c, h, ww = chw
        out = w.shape[0]
        return np.ascontiguousarray(
            w.T.reshape(c, h, ww, out).transpose(1, 2, 0, 3).reshape(-1, out))
    if layout == "conv":
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if layout == "conv1d":
        return np.ascontiguousarray(w[:, :, 0, :].transpose(2, 1, 0))
    if layout == "depthwise":
        if shape is None:
            raise ValueError("the depthwise layout needs the canonical shape to invert")
        return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0).reshape(shape))
    if layout == "dense_conv":
        return np.ascontiguousarray(w[:, :, 0, 0].T)
    raise ValueError(f"unknown layout {layout!r}")


# -- whole parameter lists --------------------------------------------------------------------
def _check_platform(manifest: Manifest, platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; use one of {PLATFORMS}")
    if platform not in manifest.get("platforms", {}):
        raise ValueError(f"model '{manifest.get('name')}' v{manifest.get('version')} was not "
                         f"exported for {platform}")


def _canonical_shapes(manifest: Manifest) -> list[tuple[int, ...]]:
    return [tuple(p["shape"]) for p in manifest["parameters"]]


def platform_shapes(manifest: Manifest, platform: str) -> list[tuple[int, ...]]:
    """Shapes of the tensors a phone of ``platform`` holds, in its order."""
    _check_platform(manifest, platform)
    if platform == "android":
        return _canonical_shapes(manifest)
    return [tuple(e["shape"]) for e in manifest["platforms"]["ios"]["coreml_layers"]]


def _platform_names(manifest: Manifest, platform: str) -> list[str]:
    if platform == "android":
        return [f"a{i} ({p['name']})" for i, p in enumerate(manifest["parameters"])]
    return [f"{e['name']} {e['type']}" for e in manifest["platforms"]["ios"]["coreml_layers"]]


def _shaped(arrays: Sequence[Any], shapes: list[tuple[int, ...]], names: list[str],
            what: str) -> list[Array]:
    if len(arrays) != len(shapes):
        raise ValueError(f"expected {len(shapes)} {what} tensors, got {len(arrays)}")
    out = []
    for arr, shape, name in zip(arrays, shapes, names, strict=True):
        a = np.asarray(arr, dtype=np.float32)
        size = math.prod(shape)  # np.prod's dispatch costs more than the whole check
        if a.size != size:
            raise ValueError(f"{what} tensor for layer {name} has {a.size} elements, "
                             f"expected {size} (shape {list(shape)})")
        if a.shape != shape:
            if a.ndim > 1 and a.shape != shape:
                raise ValueError(f"{what} tensor for layer {name} has shape {list(a.shape)},"
                                 f" expected {list(shape)} (or a flat array of {size})")
            a = a.reshape(shape)
        out.append(a)
    return out


def to_platform(canonical: Sequence[AnyArray], manifest: Manifest,
                platform: str) -> list[Array]:
    """Canonical parameters → the tensors a phone of ``platform`` holds, in its order."""
    _check_platform(manifest, platform)
    canon = _shaped(canonical, _canonical_shapes(manifest),
                    [p["name"] for p in manifest["parameters"]], "canonical")
    if platform == "android":
        return [a.copy() for a in canon]
    return [to_platform_array(canon[_canonical_index(e)], e["layout"], e.get("chw")).copy()
            for e in manifest["platforms"]["ios"]["coreml_layers"]]


def _canonical_index(entry: CoreMLLayer) -> int:
    """The canonical parameter an iOS tensor holds (every tensor a phone sends has one)."""
    idx = entry["canonical"]
    if idx is None:
        raise ValueError(f"coreml_layers entry {entry['name']!r} ({entry['type']}) maps to no "
                         "canonical parameter; re-export the model")
    return idx


def from_platform(arrays: Sequence[AnyArray], manifest: Manifest, platform: str,
                  base: Sequence[AnyArray] | None = None) -> list[Array]:
    """A phone's tensors (shaped or flat, as on the wire) → canonical parameters.

    An iOS phone holds only the tensors it trains; the canonical parameters it does not
    hold are baked into its artifact at their exported values, so they are taken from
    ``base`` when given (e.g. the current global model, for a masked aggregation) and
    otherwise from the export's initial parameters — what the phone really computes with.
    """
    shaped = _shaped(arrays, platform_shapes(manifest, platform),
                     _platform_names(manifest, platform), platform)
    if platform == "android":
        return [a.copy() for a in shaped]
    out: list[Array | None] = [None] * len(manifest["parameters"])
    for arr, e in zip(shaped, manifest["platforms"]["ios"]["coreml_layers"], strict=True):
        idx = e.get("canonical")
        if idx is not None:
            out[idx] = from_platform_array(arr, e["layout"], e.get("chw"),
                                           manifest["parameters"][idx]["shape"]).copy()
    if any(a is None for a in out):
        fill = base
        if fill is None:
            from xflwb.bridge.manifest import initial_parameters

            fill = initial_parameters(manifest)
        if len(fill) != len(out):
            raise ValueError(f"base has {len(fill)} tensors, expected {len(out)}")
        out = [np.asarray(fill[i], np.float32).reshape(manifest["parameters"][i]["shape"])
               if a is None else a for i, a in enumerate(out)]
    return cast("list[Array]", out)  # every None was filled just above


def trained_mask(manifest: Manifest, platform: str) -> list[bool]:
    """Per canonical parameter: does a phone of ``platform`` train it?

    Exports since the per-platform plan record it (``platforms.<p>.trained``); older ones
    are read from the updatable flags (iOS) or mean "everything" (Android).
    """
    _check_platform(manifest, platform)
    n = len(manifest["parameters"])
    recorded = manifest["platforms"][platform].get("trained")
    if recorded is not None:
        mask = [False] * n
        for i in recorded:
            mask[int(i)] = True
        return mask
    if platform == "android":
        return [True] * n
    mask = [False] * n
    for e in manifest["platforms"]["ios"]["coreml_layers"]:
        idx = e.get("canonical")
        if idx is not None and e.get("updatable"):
            mask[idx] = True
    return mask


# -- differential privacy: clipping, shared by the server and the clients ----------------------
def update_norm(update: Sequence[AnyArray], previous: Sequence[AnyArray],
                trained: Sequence[bool]) -> float:
    """L2 norm of ``update − previous`` over the trained parameters, in float64 (NaN or
    inf when the update holds them: callers refuse those)."""
    total = 0.0
    with np.errstate(all="ignore"):
        for a, p, t in zip(update, previous, trained, strict=True):
            if t:
                d = np.asarray(a, np.float64) - np.asarray(p, np.float64)
                total += float(np.dot(d.reshape(-1), d.reshape(-1)))
    return float(np.sqrt(total))


def clip_update(update: Sequence[AnyArray], base: Sequence[AnyArray],
                trained: Sequence[bool], clipping_norm: float
                ) -> tuple[list[Array], float]:
    """(``update`` with its delta to ``base`` scaled to L2 norm ≤ ``clipping_norm`` over the
    ``trained`` tensors, the delta's norm before clipping: :func:`update_norm`). Untrained
    tensors come back as given (no aggregate reads them). Canonical space, so every platform
    is clipped over the same tensors it is averaged over; a zero update stays as it is.
    Idempotent up to float32 rounding."""
    norm = update_norm(update, base, trained)
    if not norm > clipping_norm:  # within the norm (or NaN: left to the aggregate's checks)
        return [np.asarray(a, np.float32) for a in update], norm
    scale = clipping_norm / norm
    out = []
    with np.errstate(all="ignore"):
        for a, b, t in zip(update, base, trained, strict=True):
            if t:
                b64 = np.asarray(b, np.float64)
                a = (b64 + (np.asarray(a, np.float64) - b64) * scale).astype(np.float32)
            out.append(np.asarray(a, np.float32))
    return out, norm


def clip_platform_update(trained: Sequence[AnyArray], received: Sequence[AnyArray],
                         manifest: Manifest, platform: str, clipping_norm: float
                         ) -> tuple[list[Array], float]:
    """A client's local clipping: its ``trained`` tensors (platform layout) with their delta
    to the ``received`` global model clipped in canonical space over the tensors
    ``platform`` trains (``clip_update``), back in platform layout; and the norm before
    clipping (norm_bit: norm ≤ clipping_norm). The server clips the same way."""
    zeros = [np.zeros(s, np.float32) for s in _canonical_shapes(manifest)]
    new = from_platform(trained, manifest, platform, base=zeros)
    old = from_platform(received, manifest, platform, base=zeros)
    clipped, norm = clip_update(new, old, trained_mask(manifest, platform), clipping_norm)
    return to_platform(clipped, manifest, platform), norm


# -- wire codecs ------------------------------------------------------------------------------
def encode_raw(array: AnyArray) -> bytes:
    """Raw little-endian float32, row-major, no header (FedKit / Flower Android)."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def decode_raw(data: bytes) -> Array:
    if len(data) % 4:
        raise ValueError(f"raw float32 tensor has {len(data)} bytes, not a multiple of 4")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def encode_npy(array: AnyArray) -> bytes:
    """``.npy`` bytes (Flower's iOS SDK, ``tensor_type='ndarray'``)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], bool]] = {}
#: the element types a phone's tensor may have: real floats (any byte order); anything else
#: (ints, bools, complex, structured, object, strings) is refused by name, never converted
TENSOR_DTYPES = ("float16", "float32", "float64")


def check_tensor_dtype(dtype: np.dtype[Any]) -> None:
    """Refuse, naming it, any dtype but a real float16/float32/float64.

    A silent ``astype(float32)`` would drop a complex tensor's imaginary part, read a
    structured record's fields as one number (or raise ``TypeError`` mid-round), and turn
    ints into weights nobody trained."""
    if dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"tensor has a structured dtype {dtype.str!r} {dtype.descr}; phones "
                         f"send plain tensors of {', '.join(TENSOR_DTYPES)}")
    if dtype.kind != "f" or dtype.name not in TENSOR_DTYPES:
        raise ValueError(f"tensor has dtype {dtype.name} ({dtype.str!r}); phones send real "
                         f"{', '.join(TENSOR_DTYPES)}")


def decode_npy(data: bytes) -> Array:
    """``.npy`` bytes → float32 array.

    Every client of a round sends the same few headers, so parsed headers are cached and the
    payload is read with ``np.frombuffer`` (``np.load`` re-parses each header: it was the
    largest cost of aggregating .npy updates). Whatever the bytes hold, the only exception
    is ``ValueError`` naming what is wrong: the bytes come from a phone.
    """
    try:
        major = data[6]
        start, size = (10, 2) if major == 1 else (12, 4)
        end = start + int.from_bytes(data[8:8 + size], "little")
        header = bytes(data[:end])
        parsed = _NPY_HEADERS.get(header)
        if parsed is None:
            buf = io.BytesIO(header)
            # numpy's stubs leave read_magic unannotated and omit the private header reader
            # (the one that parses a header without reading a payload)
            version = np.lib.format.read_magic(buf)  # type: ignore[no-untyped-call]
            shape, fortran, dtype = np.lib.format._read_array_header(  # type: ignore[attr-defined]
                buf, version)
            check_tensor_dtype(dtype)
            if any(d < 0 for d in shape):
                raise ValueError(f"negative dimension in shape {tuple(shape)}")
            parsed = (dtype, tuple(shape), bool(fortran))
            if len(_NPY_HEADERS) < 4096:
                _NPY_HEADERS[header] = parsed
        dtype, shape, fortran = parsed
        count = math.prod(shape)  # exact: np.prod wraps around on absurd shapes
        if len(data) != end + count * dtype.itemsize:
            raise ValueError(f"{len(data) - end} payload bytes for shape {shape} {dtype}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
        arr = arr.reshape(shape, order="F" if fortran else "C")
        with np.errstate(over="ignore"):  # float64 beyond float32 → inf, refused downstream
            return np.asarray(arr, dtype=np.float32)
    except Exception as exc:  # any failure is the sender's malformed tensor
        what = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"malformed .npy tensor: {what}") from exc


CODECS = {"raw": (encode_raw, decode_raw), "npy": (encode_npy, decode_npy)}


def detect_codec(data: bytes) -> str:
    return "npy" if data[:6] == NPY_MAGIC else "raw"


def decode_tensor(data: bytes) -> tuple[Array, str]:
    """Decode one wire tensor, whichever encoding it used; returns (array, codec name)."""
    codec = detect_codec(data)
    return CODECS[codec][1](data), codec


def encode_tensors(arrays: Sequence[AnyArray], codec: str = "raw") -> list[bytes]:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {sorted(CODECS)}")
    enc = CODECS[codec][0]
    return [enc(a) for a in arrays]


def decode_tensors(blobs: Sequence[bytes]) -> tuple[list[Array], str]:
    """Decode a list of wire tensors; all must use one codec (answers reuse it)."""
    decoded = [decode_tensor(b) for b in blobs]
    codecs = {c for _, c in decoded}
    if len(codecs) > 1:
        raise ValueError(f"tensors mix encodings {sorted(codecs)}")
    return [a for a, _ in decoded], (codecs.pop() if codecs else "raw")


def save_npz(path: Any, arrays: Sequence[AnyArray]) -> None:
    """Tensors in order as an ``.npz`` (``arr_0``, ``arr_1``, …): initial weights and
    checkpoints share this format and :func:`load_npz`."""
    np.savez(path, *arrays)


def load_npz(path: Any) -> list[AnyArray]:
    """The tensors of an ``.npz`` written by :func:`save_npz`, in order; never unpickles
    (a checkpoint file is not code)."""
    with np.load(path, allow_pickle=False) as data:
        return [np.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
