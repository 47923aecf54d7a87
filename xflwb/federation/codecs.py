"""Compression codecs: how an update (up-link) or a model (down-link) is squeezed on the wire.

A codec is a small object registered by name in :data:`CODECS` and chosen with a spec string
(``"fp16"``, ``"int8"``, ``"int8:block=64"``, ``"topk:0.01"``, ``"rotate+int8"``). The
float32 encodings every phone speaks (FedKit's raw bytes, Flower's ``.npy``) are not
codecs here: ``"float32"`` means "no compression, the client's own encoding"
(``xflwb.bridge.params``), so a phone that never heard of compression keeps working.

Each codec encodes one float32 tensor to bytes and back, and states its round-trip error
bound (:meth:`Codec.bound`, tested against it with hypothesis). Decoding reads bytes a phone
sent: it is told the element count the platform's layout has (from the manifest), checks
the header against it *before* allocating anything, and raises ``ValueError`` naming the
problem (the gate turns it into a ``MalformedUpdate`` costing only that client). Encoders
refuse NaN/inf by name: a codec never hides a broken update.

``delta`` codecs (int8, rotate+int8, top-k) carry an update as its difference to the model
the client received (:func:`encode_arrays` / :func:`decode_arrays` take that reference):
small numbers quantise well and top-k of a difference is meaningful, top-k of weights is
not. fp16 carries absolute values. Top-k's client keeps what it did not send
(:class:`ErrorFeedback`) and adds it to its next update (Stich et al. 2018; DGC).

Wire format of one tensor (little endian): ``b"\\x93XFL"``, version (u8), codec id (u8),
two reserved bytes, element count (u32), then the codec's body. Hand-written: the numpy
kernels are a few lines each, and no maintained library encodes these for two phone
runtimes (TFF's ``tensor_encoding`` needs TensorFlow graphs and is no longer developed).
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from xflwb.bridge.arrays import AnyArray, Array
from xflwb.errors import InputError

__all__ = ["CODECS", "DOWN_CODECS", "FLOAT32", "KEY_CODEC", "KEY_UP", "Codec", "ErrorFeedback",
           "Fp16", "Int8", "RotateInt8", "TopK", "announce", "capabilities",
           "codec_from_tensor_type", "decode_arrays", "encode_arrays", "parse", "tensor_type"]

#: the spec meaning "no compression": the client's own float32 encoding (raw / .npy)
FLOAT32 = "float32"
#: FitIns config key: the up-link codec spec the server asks this client to send
KEY_UP = "xfl_up"
#: FitRes metrics key: the codec spec the client's update is encoded with
KEY_CODEC = "xfl_codec"
#: a compressed down-link model's ``Parameters.tensor_type`` is this prefix + the spec
_TENSOR_TYPE_PREFIX = "xfl:"
#: what a client appends to its ``tensor_type`` (GetParameters answer) to say which codecs
#: it decodes and encodes: ``"ND;xfl-codecs=fp16,int8,topk,rotate+int8"``
_CAPS_KEY = "xfl-codecs="

_MAGIC = b"\x93XFL"
_VERSION = 1
_HEADER = struct.Struct("<4sBBxxI")  # magic, version, codec id, reserved, element count
_MAX_COUNT = 2**32 - 1


class Codec:
    """One compression scheme. Subclasses set ``name``, ``ident`` (the wire byte),
    ``delta`` and ``directions`` and implement ``_encode`` / ``_decode`` / ``bound``."""

    name: ClassVar[str]
    ident: ClassVar[int]
    #: carries an update as its difference to the model the client received
    delta: ClassVar[bool] = False
    #: "up" (updates), "down" (models) or both; top-k only makes sense for differences
    directions: ClassVar[tuple[str, ...]] = ("up", "down")
    #: ``_encode`` refuses NaN/inf itself (from the peaks it computes anyway): no extra pass
    _checks_finite: ClassVar[bool] = False
    #: ``_decode`` / ``_decode_added`` refuse NaN/inf themselves (while the values are in
    #: cache)
    _decodes_finite: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The canonical spec string (``parse(c.spec) == c``)."""
        return self.name

    def encode(self, array: AnyArray, rng: np.random.Generator | None = None) -> bytes:
        """One tensor → bytes. ``rng``: stochastic rounding where the codec has it (unbiased:
        E[decode(encode(x))] = x); ``None`` rounds to nearest (deterministic: a down-link
        model the server can reproduce)."""
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32: inf
            flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        if flat.size > _MAX_COUNT:
            raise ValueError(f"tensor of {flat.size} elements is too large for codec "
                             f"{self.spec!r} (at most {_MAX_COUNT})")
        if not self._checks_finite and not np.isfinite(flat).all():
            raise _not_finite(self.spec)
        return _HEADER.pack(_MAGIC, _VERSION, self.ident, flat.size) + self._encode(flat, rng)

    def decode(self, data: bytes | memoryview, size: int) -> Array:
        """Bytes → a flat float32 tensor of ``size`` elements (the platform layout's), or
        ``ValueError`` naming what is wrong with the bytes."""
        out = self._decode(self._body(data, size), size)
        if not self._decodes_finite and not np.isfinite(out).all():
            raise ValueError(f"{self.spec} payload decodes to NaN or inf")
        return out

    def decode_added(self, data: bytes | memoryview, reference: AnyArray) -> Array:
        """``reference`` (flat, the model the client received) + the decoded difference, in
        one pass where the codec can (int8 adds block by block while they are in cache);
        ``ValueError`` if the bytes are bad or the sum is not finite."""
        ref = np.asarray(reference, np.float32).reshape(-1)
        out = self._decode_added(self._body(data, ref.size), ref.size, ref)
        if not self._decodes_finite and not np.isfinite(out).all():
            raise _not_finite_sum(self.spec)
        return out

    def _body(self, data: bytes | memoryview, size: int) -> memoryview:
        """The payload after a header checked against this codec and ``size``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"a {self.spec} payload is bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise ValueError(f"{len(data)} bytes is shorter than a {self.spec} header")
        magic, version, ident, count = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError(f"not a compressed tensor (no xflwb codec header); codec "
                             f"{self.spec!r} was announced")
        if version != _VERSION:
            raise ValueError(f"codec header version {version}, this xflwb reads {_VERSION}")
        if ident != self.ident:
            raise ValueError(f"tensor is encoded with codec id {ident}, not {self.spec!r} "
                             f"(id {self.ident}) as announced")
        if count != size:
            raise ValueError(f"payload declares {count} elements, the platform's layout has "
                             f"{size}")
        return memoryview(data)[_HEADER.size:]

    def _decode_added(self, body: memoryview, count: int, reference: Array) -> Array:
        out = self._decode(body, count)  # a fresh array: added in place
        with np.errstate(over="ignore", invalid="ignore"):  # inf is refused by the caller
            np.add(out, reference, out=out)
        return out

    def bound(self, array: AnyArray) -> float:
        """The largest L2 norm of ``decode(encode(array)) - array`` this codec allows (with
        stochastic or nearest rounding, any seed): a documented contract (each class's
        docstring says how it is derived), tested with hypothesis."""
        raise NotImplementedError

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        raise NotImplementedError

    def _decode(self, body: memoryview, count: int) -> Array:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"codec({self.spec!r})"


def _not_finite(spec: str) -> ValueError:
    return ValueError(f"tensor contains NaN or inf (or values beyond float32's range); "
                      f"codec {spec!r} refuses it")


def _not_finite_sum(spec: str) -> ValueError:
    return ValueError(f"{spec} update is NaN or inf once added to the model the client "
                      "received (a forged scale, or it overflows float32)")


def _exact(body: memoryview, nbytes: int, what: str) -> None:
    if len(body) != nbytes:
        raise ValueError(f"{what}: {len(body)} payload bytes, expected {nbytes}")


class Fp16(Codec):
    """IEEE half precision: 2 bytes per value (2× smaller than float32).

    Bound: each value's error is at most max(|x| · 2⁻¹¹, 2⁻²⁵) (half a float16 ulp; 2⁻²⁵ is
    half the subnormal spacing), so ``bound(x)`` is the L2 norm of those. Values beyond
    ±65504 are refused, not turned into inf. No randomness: ``rng`` is ignored."""

    name = "fp16"
    ident = 1
    _checks_finite = True

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        peak = float(np.abs(flat).max()) if flat.size else 0.0
        if not math.isfinite(peak):
            raise _not_finite(self.spec)
        if peak > 65504.0:
            raise ValueError("tensor has values beyond float16's range (±65504); use int8, "
                             "which scales per block")
        return flat.astype("<f2").tobytes()

    def _decode(self, body: memoryview, count: int) -> Array:
        _exact(body, 2 * count, "fp16")
        return np.frombuffer(body, dtype="<f2").astype(np.float32)

    def bound(self, array: AnyArray) -> float:
        a = np.abs(np.asarray(array, np.float64).reshape(-1))
        return float(np.linalg.norm(np.maximum(a * 2.0**-11, 2.0**-25)))


#: smallest block scale: 1/scale stays a finite float32 (a block of subnormals or zeros)
_MIN_SCALE = np.float32(2.0**-126)


def _max_scale() -> np.float32:
    """The largest scale s with 127·s finite in float32 (a block peaking near float32's max
    must decode to finite values)."""
    s = np.float32(np.finfo(np.float32).max) / np.float32(127)
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(127) * s):
            s = np.nextafter(s, np.float32(0))
    return np.float32(s)


_MAX_SCALE = _max_scale()
#: slack over one scale per value: float32 rounding of x/scale, of the noise sum, of q·scale
_INT8_SLACK = 1 + 2.0**-10
#: the float32 bit pattern of 128.0; + k (k < 2¹⁶) is 128 + k·2⁻¹⁶ exactly
_BITS_128 = np.uint32(0x43000000)


def _quantise_rows(rows: Array, noise: Array | None, q: npt.NDArray[np.int8],
                   what: str) -> Array:
    """int8 codes of each row (a block) into ``q`` (same shape); returns the row scales.

    Each row is scaled by ``inv`` ≤ 127/peak (so |x·inv| ≤ 127 exactly), then floor(x·inv +
    128 + u) is cast to uint8 and shifted to int8 by flipping the top bit: one float pass
    for the scale, one for the noise, one cast. ``noise`` (float32 128 + u, u ∈ [0, 1)) is
    stochastic rounding (unbiased); ``None`` adds 128.5, i.e. rounds to nearest."""
    peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)
    if not np.isfinite(peak).all():  # max propagates NaN; |inf| is inf
        raise _not_finite(what)
    scales = np.clip(peak / np.float32(127), _MIN_SCALE, _MAX_SCALE).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):  # 127/0 or 127/subnormal: inf
        inv = np.minimum(np.float32(127) / peak, np.float32(1) / scales)
    inv = np.nextafter(inv, np.float32(0)).astype(np.float32)  # never above 127/peak
    t = np.multiply(rows, inv[:, None], dtype=np.float32)
    if noise is None:
        t += np.float32(128.5)
    else:
        t += noise
    # t ∈ [1, 256): the cast truncates, which is floor here; v - 128 as a signed byte is
    # v with its top bit flipped
    codes = q.view(np.uint8)
    np.copyto(codes, t, casting="unsafe")
    np.bitwise_xor(codes, np.uint8(0x80), out=codes)
    return scales


def _quantise(flat: Array, block: int, rng: np.random.Generator | None, what: str) -> bytes:
    """int8 body: per-block float32 scales, then one signed byte per value. Whole blocks are
    views of ``flat`` (no padded copy); a last partial block is quantised on its own."""
    n = flat.size
    full = n // block
    m = full * block
    noise: Array | None = None
    if rng is not None:  # 16 random bits per value → 128 + k·2⁻¹⁶ as float32, bit-exactly
        k = np.frombuffer(rng.bytes(2 * n), dtype="<u2")
        noise = np.add(k, _BITS_128, dtype=np.uint32).view(np.float32)
    q = np.empty(n, np.int8)
    parts = []
    if full:
        parts.append(_quantise_rows(flat[:m].reshape(full, block),
                                    None if noise is None else noise[:m].reshape(full, block),
                                    q[:m].reshape(full, block), what))
    if m < n:
        parts.append(_quantise_rows(flat[m:].reshape(1, n - m),
                                    None if noise is None else noise[m:].reshape(1, n - m),
                                    q[m:].reshape(1, n - m), what))
    scales = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return scales.astype("<f4").tobytes() + q.tobytes()


#: values dequantised (and added to the reference) per step: 128 KiB of float32 stays in cache
_CHUNK = 1 << 15


def _dequantise(body: memoryview, count: int, block: int, what: str,
                reference: Array | None = None) -> Array:
    """int8 body → float32 values (+ ``reference``), a cache-sized run of blocks at a time,
    each checked finite while in cache (``ValueError``)."""
    nblocks = -(-count // block)
    _exact(body, 4 * nblocks + count, what)
    scales = np.frombuffer(body, dtype="<f4", count=nblocks).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise ValueError(f"{what}: block scales must be finite and positive")
    q = np.frombuffer(body, dtype=np.int8, offset=4 * nblocks)
    out = np.empty(count, np.float32)
    full = count // block
    step = max(1, _CHUNK // block)
    finite = True
    with np.errstate(over="ignore", invalid="ignore"):  # forged scales: inf, refused below
        # without a reference, |q · scale| ≤ 128 · the largest scale bounds every value
        check = reference is not None or bool(
            nblocks and not np.isfinite(np.float32(128) * scales.max()))
        for b0 in range(0, full, step):
            b1 = min(full, b0 + step)
            lo, hi = b0 * block, b1 * block
            o = out[lo:hi].reshape(b1 - b0, block)
            np.multiply(q[lo:hi].reshape(b1 - b0, block), scales[b0:b1, None], out=o)
            if reference is not None:
                np.add(o, reference[lo:hi].reshape(b1 - b0, block), out=o)
            if check:
                finite = finite and bool(np.isfinite(o).all())
        m = full * block
        if m < count:
            np.multiply(q[m:], scales[full], out=out[m:])
            if reference is not None:
                np.add(out[m:], reference[m:], out=out[m:])
            if check:
                finite = finite and bool(np.isfinite(out[m:]).all())
    if not finite:
        raise (_not_finite_sum(what) if reference is not None
               else ValueError(f"{what} payload decodes to NaN or inf"))
    return out


def _int8_error(peaks: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64]) -> float:
    """L2 bound of blockwise int8 with these block peaks and sizes: at most one scale
    (max(peak/127, 2⁻¹²⁶)) per value, plus float32 rounding slack."""
    per = np.maximum(peaks / 127.0, float(_MIN_SCALE)) * _INT8_SLACK
    return float(np.sqrt((sizes * per**2).sum()))


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 2**20:
        raise InputError(f"int8 block must be an integer in [1, 1048576], got {block!r}")
    return block


@dataclass(frozen=True, eq=False, repr=False)
class Int8(Codec):
    """8-bit linear quantisation with one float32 scale per ``block`` values (max |x| / 127):
    about 3.9× smaller than float32 with the default block of 256.

    Bound: each value's error is below its block's scale s = max(peak / 127, 2⁻¹²⁶) (times
    1 + 2⁻¹⁰ for float32 rounding) with stochastic rounding (``rng``: unbiased, E[decode] =
    x), and half of that rounding to nearest (``rng=None``); ``bound(x)`` is the L2 norm of
    one s per value (valid for both)."""

    block: int = 256
    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 2
    delta: ClassVar[bool] = True
    _checks_finite: ClassVar[bool] = True
    _decodes_finite: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_block(self.block)

    @property
    def spec(self) -> str:
        return "int8" if self.block == 256 else f"int8:block={self.block}"

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        return _quantise(flat, self.block, rng, self.spec)

    def _decode(self, body: memoryview, count: int) -> Array:
        return _dequantise(body, count, self.block, self.spec)

    def _decode_added(self, body: memoryview, count: int, reference: Array) -> Array:
        return _dequantise(body, count, self.block, self.spec, reference)

    def bound(self, array: AnyArray) -> float:
        flat = np.abs(np.asarray(array, np.float32).reshape(-1))
        n = flat.size
        if not n:
            return 0.0
        b = self.block
        full = n // b
        peaks = [flat[:full * b].reshape(full, b).max(axis=1)] if full else []
        if full * b < n:
            peaks.append(flat[full * b:].max(keepdims=True))
        sizes = np.full(len(np.concatenate(peaks)), b, dtype=np.int64)
        sizes[-1] = n - b * (len(sizes) - 1)
        return _int8_error(np.concatenate(peaks).astype(np.float64), sizes)


def _fraction_text(f: float) -> str:
    """Shortest text that reads back as exactly ``f`` (``0.01``, not ``0.010000000``)."""
    short = f"{f:g}"
    return short if float(short) == f else repr(f)


@dataclass(frozen=True, eq=False, repr=False)
class TopK(Codec):
    """The ``fraction`` largest-magnitude values (at least one; ⌈fraction · n⌉) as (uint32
    index, float32 value) pairs: 8 bytes per kept value, so ``topk:0.01`` is ~50× smaller
    than float32. Up-link only: the top entries of a model's weights are not a model.

    Bound: exact — the error is the values not kept, ``bound(x)`` the L2 norm of the n - k
    smallest magnitudes; the kept ones travel bit-exactly. The client's
    :class:`ErrorFeedback` sends the rest later."""

    fraction: float = 0.01
    name: ClassVar[str] = "topk"
    ident: ClassVar[int] = 3
    delta: ClassVar[bool] = True
    directions: ClassVar[tuple[str, ...]] = ("up",)

    def __post_init__(self) -> None:
        f = self.fraction
        if (isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f)
                or not 0 < f <= 1):
            raise InputError(f"topk fraction must be in (0, 1], got {f!r} (e.g. topk:0.01 "
                             "keeps 1 %)")
        object.__setattr__(self, "fraction", float(f))

    @property
    def spec(self) -> str:
        return f"topk:{_fraction_text(self.fraction)}"

    def kept(self, n: int) -> int:
        """How many values of a tensor of ``n`` are sent."""
        # round away float noise first: 0.01 · 300 is 3.0000000000000004, and keeps 3
        return min(n, max(1, math.ceil(round(self.fraction * n, 6)))) if n else 0

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        k = self.kept(flat.size)
        idx = (np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:] if k < flat.size
               else np.arange(flat.size))
        idx = np.sort(idx).astype("<u4")
        return struct.pack("<I", k) + idx.tobytes() + flat[idx].astype("<f4").tobytes()

    def _decode(self, body: memoryview, count: int) -> Array:
        if len(body) < 4:
            raise ValueError(f"{self.spec}: payload has no count")
        (k,) = struct.unpack_from("<I", body)
        if k > count:
            raise ValueError(f"{self.spec}: {k} kept values for a tensor of {count}")
        _exact(body, 4 + 8 * k, self.spec)
        idx = np.frombuffer(body, dtype="<u4", count=k, offset=4)
        # strictly increasing (no np.diff: it wraps around on unsigned indices)
        if k and (int(idx.max()) >= count or (k > 1 and not (idx[1:] > idx[:-1]).all())):
            raise ValueError(f"{self.spec}: indices must be increasing (no duplicates) and "
                             f"below {count}")
        out = np.zeros(count, np.float32)
        out[idx] = np.frombuffer(body, dtype="<f4", count=k, offset=4 + 4 * k)
        return out

    def bound(self, array: AnyArray) -> float:
        flat = np.abs(np.asarray(array, np.float32).reshape(-1)).astype(np.float64)
        k = self.kept(flat.size)
        if k >= flat.size:
            return 0.0
        rest = np.partition(flat, flat.size - k)[:flat.size - k]
        return float(np.linalg.norm(rest)) * (1 + 2.0**-30)  # float64 summation order


#: largest Hadamard factor applied as one matrix product (32: a 1024 block is 32 ⊗ 32)
_FACTOR_BITS = 5


@functools.lru_cache(maxsize=64)
def _sylvester(bits: int, scale: float) -> Array:
    """``scale`` · H(2^bits) (Sylvester's ±1 matrix, symmetric), float32, read-only."""
    i = np.arange(1 << bits)
    parity = np.bitwise_count(i[:, None] & i[None, :]) & 1
    h = np.where(parity == 1, -scale, scale).astype(np.float32)
    h.setflags(write=False)
    return h


def _factors(d: int) -> list[int]:
    """log2(d) split into near-equal parts of at most ``_FACTOR_BITS`` bits."""
    k = d.bit_length() - 1
    parts = -(-k // _FACTOR_BITS)
    return [k // parts + (1 if j < k % parts else 0) for j in range(parts)] if k else []


def _hadamard(x: Array) -> Array:
    """Orthonormal Walsh–Hadamard transform of each row of ``x`` (row length d a power of two;
    its own inverse). H(d) = H(f₁) ⊗ H(f₂) ⊗ …, so it is one small matrix product per factor
    (f ≤ 32) along that axis of the row seen as an f₁ × f₂ × … array: BLAS does the
    butterflies, with no per-stage temporaries. Each factor is orthonormal (1/√f folded in),
    so no intermediate grows beyond what the result holds."""
    rows, d = x.shape
    bits = _factors(d)
    if not bits:
        return x.copy()
    y = x
    pre, post = rows, d
    for b in bits:
        f = 1 << b
        post //= f
        h = _sylvester(b, 1.0 / math.sqrt(f))
        # the last axis: one (rows·d/f × f) · (f × f) product; a leading axis: H · (f ×
        # post) for each of the ``pre`` slabs
        y = (np.matmul(y.reshape(-1, f), h) if post == 1
             else np.matmul(h, y.reshape(pre, f, post)))
        pre *= f
    return np.ascontiguousarray(y, dtype=np.float32).reshape(rows, d)


def _rotation_slack(d: int) -> float:
    """Relative float32 error of one rotation of width d: each factor's product sums f
    terms (at most γ_f · √f relative in L2), plus its inexact 1/√f."""
    return float(sum(((1 << b) ** 1.5 + 4) * 2.0**-24 for b in _factors(d)) * 1.01)


@dataclass(frozen=True, eq=False, repr=False)
class RotateInt8(Codec):
    """A seeded random rotation (sign flips, then a Walsh–Hadamard transform over blocks of
    ``block`` values, a power of two), then int8 with one scale per block, as TFF's
    ``EncodedSumFactory`` does: the rotation spreads an outlier over its block, so the scale
    fits the typical value, not the largest. The seed travels in the payload (0 when
    ``rng`` is None: deterministic).

    Bound: whatever the signs, a rotated value is at most ‖x_b‖₁/√d (x_b: its block, d the
    block width), so int8's d errors of at most one scale each total ‖x_b‖₁/127 per block;
    the rotation is orthonormal, so that is the error back in x's space too. ``bound(x)``
    is the L2 norm over blocks (plus float32 rounding of the rotations). A tensor whose
    rotation could overflow float32 (|x| above 3.4·10³⁸ / (√d (1 + √d/127)), about 8·10³⁶
    for the default block) is refused: use int8 for it."""

    block: int = 1024
    name: ClassVar[str] = "rotate+int8"
    ident: ClassVar[int] = 4
    delta: ClassVar[bool] = True
    _checks_finite: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_block(self.block)
        if self.block & (self.block - 1):
            raise InputError(f"rotate+int8 block must be a power of two, got {self.block}")

    @property
    def spec(self) -> str:
        return "rotate+int8" if self.block == 1024 else f"rotate+int8:block={self.block}"

    def _width(self, n: int) -> int:
        """Rotation width: the block, or the next power of two for a smaller tensor."""
        return min(self.block, 1 << max(0, (n - 1).bit_length()))

    @staticmethod
    def _largest(d: int) -> float:
        """The largest |x| whose rotation (≤ √d·|x|) and decoded value (≤ the block's norm
        plus the bound, ‖x_b‖(1 + √d/127)) stay finite in float32."""
        root = math.sqrt(d)
        return float(np.finfo(np.float32).max) / (root * (1 + root / 127) * 1.01)

    def _signs(self, seed: int, size: int) -> Array:
        bits = np.random.default_rng(seed).integers(0, 2, size, dtype=np.int8)
        signs: Array = bits.astype(np.float32)
        signs *= 2
        signs -= 1
        return signs

    def _encode(self, flat: Array, rng: np.random.Generator | None) -> bytes:
        n = flat.size
        d = self._width(n)
        nblocks = -(-n // d) if n else 0
        seed = int(rng.integers(0, 2**32)) if rng is not None else 0
        peak = float(np.abs(flat).max()) if n else 0.0
        if not math.isfinite(peak):
            raise _not_finite(self.spec)
        if peak > self._largest(d):
            raise ValueError(f"{self.spec}: values this large (|x| up to {peak:.3g}) overflow "
                             f"float32 once rotated and quantised; use int8")
        padded = np.zeros(nblocks * d, np.float32)
        np.multiply(flat, self._signs(seed, n), out=padded[:n])  # the padding stays 0
        rotated = _hadamard(padded.reshape(nblocks, d))
        return struct.pack("<I", seed) + _quantise(rotated.reshape(-1), d, rng, self.spec)

    def _decode(self, body: memoryview, count: int) -> Array:
        if len(body) < 4:
            raise ValueError(f"{self.spec}: payload has no seed")
        (seed,) = struct.unpack_from("<I", body)
        d = self._width(count)
        nblocks = -(-count // d) if count else 0
        rotated = _dequantise(body[4:], nblocks * d, d, self.spec)
        with np.errstate(over="ignore", invalid="ignore"):  # forged scales: inf, refused
            back = _hadamard(rotated.reshape(nblocks, d)).reshape(-1)[:count]
            back *= self._signs(seed, count)
        return back

    def bound(self, array: AnyArray) -> float:
        flat = np.asarray(array, np.float32).reshape(-1)
        n = flat.size
        if not n:
            return 0.0
        d = self._width(n)
        nblocks = -(-n // d)
        padded = np.zeros(nblocks * d, np.float64)
        padded[:n] = flat
        blocks = padded.reshape(nblocks, d)
        slack = _rotation_slack(d)
        peaks = np.abs(blocks).sum(axis=1) / math.sqrt(d) * (1 + slack)
        quant = _int8_error(peaks, np.full(nblocks, d, dtype=np.int64))
        # the inverse rotation's own rounding, of a vector of norm ≤ ‖x‖ + quant
        return quant * (1 + slack) + 2 * slack * float(np.linalg.norm(blocks))


#: codec name → its class; a spec is ``name`` or ``name:arg`` / ``name:key=value``
CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp16, Int8, TopK, RotateInt8)}
#: codecs that may carry a model down to a client
DOWN_CODECS = tuple(n for n, c in CODECS.items() if "down" in c.directions)
_ARG = re.compile(r"^(?:(?P<key>[a-z_]+)=)?(?P<value>[^=,]+)$")


def parse(spec: Any, direction: str | None = None) -> Codec | None:
    """A spec string (``"int8"``, ``"topk:0.01"``, ``"int8:block=64"``) → its codec; ``None``
    for ``"float32"`` (no compression). ``direction`` "up"/"down" refuses a codec that
    cannot go that way. Raises ``InputError`` naming the spec and the choices."""
    from xflwb._options import did_you_mean

    if isinstance(spec, Codec):
        codec: Codec = spec
    else:
        if not isinstance(spec, str):
            raise InputError(f"a codec is a string such as 'int8' or 'topk:0.01', got "
                             f"{type(spec).__name__} {spec!r}")
        text = spec.strip().lower()
        if text in (FLOAT32, "", "none", "raw", "npy"):
            return None
        name, _, arg = text.partition(":")
        cls = CODECS.get(name)
        if cls is None:
            hint = did_you_mean(name, [FLOAT32, *CODECS]).strip()
            raise InputError(f"unknown codec {spec!r}" + (f": {hint}" if hint else ".")
                             + f" Choose {FLOAT32!r} or one of {sorted(CODECS)} (topk takes "
                             "a fraction: 'topk:0.01').")
        kwargs: dict[str, Any] = {}
        if arg:
            m = _ARG.match(arg)
            if m is None:
                raise InputError(f"codec {spec!r}: cannot read the argument {arg!r}")
            key = m["key"] or {"topk": "fraction"}.get(name, "block")
            try:
                value: Any = float(m["value"]) if key == "fraction" else int(m["value"])
            except ValueError:
                raise InputError(f"codec {spec!r}: {key} must be a number, got "
                                 f"{m['value']!r}") from None
            kwargs[key] = value
        try:
            codec = cls(**kwargs)
        except TypeError:
            raise InputError(f"codec {name!r} takes no argument {arg!r}") from None
    if direction is not None and direction not in codec.directions:
        raise InputError(f"codec {codec.spec!r} cannot carry the {direction}-link"
                         + (": a model is sent whole; use fp16 or int8 down"
                            if direction == "down" else ""))
    return codec


def encode_arrays(arrays: Sequence[AnyArray], codec: Codec, *,
                  reference: Sequence[AnyArray] | None = None,
                  rng: np.random.Generator | None = None) -> list[bytes]:
    """Tensors → wire bytes; a ``delta`` codec encodes ``arrays - reference`` (the model the
    client received, in the same layout)."""
    if codec.delta:
        if reference is None:
            raise ValueError(f"codec {codec.spec!r} sends differences: pass the reference")
        with np.errstate(over="ignore", invalid="ignore"):  # inf: refused by encode
            diffs = [np.subtract(a, r, dtype=np.float32)
                     for a, r in zip(arrays, reference, strict=True)]
        return [codec.encode(d, rng) for d in diffs]
    return [codec.encode(a, rng) for a in arrays]


def decode_arrays(blobs: Sequence[bytes], codec: Codec, shapes: Sequence[tuple[int, ...]], *,
                  reference: Sequence[AnyArray] | None = None) -> list[Array]:
    """Wire bytes → tensors of ``shapes`` (the platform's layout); a ``delta`` codec adds
    ``reference``. ``ValueError`` names the tensor and the problem."""
    if len(blobs) != len(shapes):
        raise ValueError(f"{len(blobs)} tensors, the platform's layout has {len(shapes)}")
    if codec.delta and reference is None:
        raise ValueError(f"codec {codec.spec!r} sends differences: pass the reference")
    if reference is not None and len(reference) != len(shapes):
        raise ValueError(f"{len(reference)} reference tensors for {len(shapes)} tensors")
    out = []
    for k, (blob, shape) in enumerate(zip(blobs, shapes, strict=True)):
        try:
            if codec.delta:
                assert reference is not None
                ref = np.asarray(reference[k], np.float32)
                if ref.size != math.prod(shape):
                    raise ValueError(f"reference has {ref.size} elements, the layout "
                                     f"{math.prod(shape)}")
                flat = codec.decode_added(blob, ref)
            else:
                flat = codec.decode(blob, math.prod(shape))
        except ValueError as exc:
            raise ValueError(f"tensor {k}: {exc}") from None
        out.append(flat.reshape(shape))
    return out


class ErrorFeedback:
    """A client's memory of what its lossy up-link did not send: added to the next update
    before encoding, so nothing is lost, only delayed (needed by top-k; harmless for the
    others). ``residual`` is a list of arrays (or ``None``); clients persist it."""

    def __init__(self, residual: Sequence[AnyArray] | None = None) -> None:
        self.residual: list[Array] | None = (
            None if residual is None else [np.asarray(r, np.float32) for r in residual])

    def encode(self, delta: Sequence[AnyArray], codec: Codec,
               rng: np.random.Generator | None = None) -> list[bytes]:
        """``delta`` (plus the residual) → wire bytes of a delta codec; keeps what the
        decoder will not see as the new residual."""
        want = [np.asarray(d, np.float32) for d in delta]
        if self.residual is not None and [r.shape for r in self.residual] == [
                w.shape for w in want]:
            want = [w + r for w, r in zip(want, self.residual, strict=True)]
        blobs = [codec.encode(w, rng) for w in want]
        self.residual = [w - codec.decode(b, w.size).reshape(w.shape)
                         for w, b in zip(want, blobs, strict=True)]
        return blobs


def tensor_type(codec: Codec) -> str:
    """The ``Parameters.tensor_type`` of a model sent down with ``codec``."""
    return _TENSOR_TYPE_PREFIX + codec.spec


def codec_from_tensor_type(value: str) -> Codec | None:
    """The codec a down-link ``tensor_type`` names, or ``None`` (float32: "ND", "ndarray")."""
    if isinstance(value, str) and value.startswith(_TENSOR_TYPE_PREFIX):
        return parse(value[len(_TENSOR_TYPE_PREFIX):], "down")
    return None


def announce(native: str, codecs: Sequence[str] = tuple(CODECS)) -> str:
    """A client's GetParameters ``tensor_type``: its own float32 type ("ND" / "ndarray")
    plus the codecs it can decode and encode (stock clients send only the first part)."""
    return f"{native};{_CAPS_KEY}{','.join(codecs)}" if codecs else native


def capabilities(value: Any) -> frozenset[str]:
    """The codec names a client announced in its ``tensor_type`` (``announce``); empty for
    FedKit and stock Flower clients, which announce none. Unknown names are ignored (a newer
    client may know more codecs)."""
    if not isinstance(value, str) or _CAPS_KEY not in value:
        return frozenset()
    listed = value.split(_CAPS_KEY, 1)[1].split(";", 1)[0]
    return frozenset(n.strip() for n in listed.split(",") if n.strip() in CODECS)

