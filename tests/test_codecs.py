"""Compression codecs: every codec keeps its documented error bound on every shape and value
range, refuses NaN/inf, and decodes hostile bytes to ``ValueError`` only (never another
exception, never a large allocation); specs, directions and capability strings round-trip."""

from __future__ import annotations

import math
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xflwb.errors import InputError
from xflwb.federation import codecs
from xflwb.federation.codecs import (
    CODECS,
    DOWN_CODECS,
    FLOAT32,
    ErrorFeedback,
    Int8,
    RotateInt8,
    TopK,
    announce,
    capabilities,
    codec_from_tensor_type,
    decode_arrays,
    encode_arrays,
    parse,
    tensor_type,
)

SPECS = ["fp16", "int8", "int8:block=1", "int8:block=7", "int8:block=64", "int8:block=1024",
         "topk:0.01", "topk:0.3", "topk:1", "rotate+int8", "rotate+int8:block=1",
         "rotate+int8:block=2", "rotate+int8:block=64", "rotate+int8:block=4096"]
#: sizes at and around blocks and powers of two, odd sizes, and the largest tested
SIZES = [0, 1, 2, 3, 5, 7, 31, 63, 64, 65, 255, 256, 257, 511, 513, 1000, 1023, 1024, 1025,
         2047, 2049, 4095, 4096, 4097, 65535, 65537, 100_003]
F32_MAX = float(np.finfo(np.float32).max)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    """Float32 tensors: 0-d, empty, single, odd and block-sized shapes up to 100k values;
    tiny, huge, subnormal, all-zero, constant, one-outlier and arbitrary float32 values."""
    kind = draw(st.sampled_from(["normal", "zero", "constant", "outlier", "subnormal",
                                 "huge", "arbitrary", "scalar"]))
    if kind == "scalar":
        return np.asarray(draw(st.floats(-F32_MAX, F32_MAX, width=32)), np.float32)
    if kind == "arbitrary":  # hypothesis's own float32 values (signed zeros, subnormals, …)
        return draw(hnp.arrays(np.float32, draw(st.integers(0, 600)),
                               elements=st.floats(-F32_MAX, F32_MAX, width=32)))
    n = draw(st.one_of(st.sampled_from(SIZES), st.integers(0, 3000)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-30, 30))
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "zero":
        x = np.zeros(n)
    elif kind == "constant":
        x = np.full(n, draw(st.floats(-1e30, 1e30).map(np.float32)))
    elif kind == "outlier":
        x = rng.standard_normal(n) * scale
        if n:
            x[draw(st.integers(0, n - 1))] = scale * 10.0 ** draw(st.integers(1, 6))
    elif kind == "subnormal":
        x = rng.standard_normal(n) * 1e-42
    else:  # huge: up to float32's largest
        x = rng.uniform(-1, 1, n) * F32_MAX
    x = x.astype(np.float32)
    if n and n % 2 == 0 and draw(st.booleans()):
        x = x.reshape(2, n // 2)
    return x


def _err(codec: codecs.Codec, x: np.ndarray, rng: np.random.Generator | None) -> float:
    back = codec.decode(codec.encode(x, rng), x.size)
    assert back.dtype == np.float32 and back.shape == (x.size,)
    assert np.isfinite(back).all()
    return float(np.linalg.norm(back.astype(np.float64) - x.reshape(-1).astype(np.float64)))


@SETTINGS
@given(spec=st.sampled_from(SPECS), x=tensors(), seed=st.one_of(st.none(), st.integers(0, 99)))
def test_round_trip_stays_within_the_stated_bound(spec, x, seed):
    codec = parse(spec)
    rng = None if seed is None else np.random.default_rng(seed)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if codec.name == "fp16" and peak > 65504:
        with pytest.raises(ValueError, match="float16's range"):
            codec.encode(x, rng)
        return
    try:
        err = _err(codec, x, rng)
    except ValueError as exc:  # rotate+int8 refuses what its rotation cannot hold
        assert codec.name == "rotate+int8" and peak > 1e36, exc
        assert "overflow float32 once rotated" in str(exc)
        return
    bound = codec.bound(x)
    assert err <= bound, (spec, x.shape, err, bound)
    if codec.name == "int8" and rng is None:
        assert err <= bound / 2  # rounding to nearest: half a scale per value
    if codec.name == "topk":  # exact: the error is what was not sent
        assert err == pytest.approx(bound, rel=1e-6, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(200, 5000), scale=st.integers(-20, 20), seed=st.integers(0, 2**32 - 1))
def test_int8_bound_is_tight_for_rounding_to_nearest(n, scale, seed):
    """The bound is not slack: with values half-way between codes, nearest rounding
    spends (almost) half a scale on each, and the stated bound is twice that."""
    rng = np.random.default_rng(seed)
    codec = Int8(block=64)
    scale_v = 10.0**scale
    codes = rng.integers(-126, 126, n) + 0.5
    x = (codes * scale_v).astype(np.float32)
    x[::64] = np.float32(127 * scale_v)  # every block peaks at 127 scales exactly
    err = _err(codec, x, None)
    assert err >= 0.45 * codec.bound(x)


def test_rotation_bound_is_tighter_than_the_norm_bound():
    """‖x_b‖₁/127 per block (the largest any sign pattern gives), not √d‖x_b‖/127."""
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    codec = RotateInt8()
    norm_bound = math.sqrt(1024) * float(np.linalg.norm(x)) / 127
    assert codec.bound(x) < 0.85 * norm_bound
    assert _err(codec, x, np.random.default_rng(1)) <= codec.bound(x)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_encode_refuses_nan_and_inf(spec, bad):
    x = np.ones(300, np.float64)
    x[123] = bad  # 1e39 is inf in float32
    with pytest.raises(ValueError, match="NaN or inf"):
        parse(spec).encode(x)


def test_fp16_refuses_beyond_its_range():
    with pytest.raises(ValueError, match=r"±65504.*use int8"):
        parse("fp16").encode(np.array([1.0, 70000.0], np.float32))
    assert parse("fp16").decode(parse("fp16").encode(np.float32([65504.0])), 1)[0] == 65504.0


@pytest.mark.parametrize("spec", ["int8", "rotate+int8"])
def test_stochastic_rounding_is_unbiased(spec):
    """Mean over many seeds converges to x; nearest rounding is the same every time."""
    codec = parse(spec)
    x = np.random.default_rng(7).standard_normal(2000).astype(np.float32)
    x[17] = 40.0  # an outlier: coarse scale in its block, large rounding steps
    seeds = 400
    total = np.zeros(x.size)
    for seed in range(seeds):
        total += codec.decode(codec.encode(x, np.random.default_rng(seed)), x.size)
    mean = total / seeds
    one = codec.decode(codec.encode(x, None), x.size) - x
    step = float(np.abs(one).max()) * 2  # at least one rounding step (nearest ≤ ½ step)
    # per value: mean of 400 draws, each within one step; 6σ with σ ≤ step / (2 √400)
    assert np.abs(mean - x).max() <= 6 * step / (2 * math.sqrt(seeds))
    # on average over values: no systematic bias
    assert abs(float((mean - x).mean())) <= 0.01 * step
    # and the stochastic draws really differ (the rng is used)
    a, b = (codec.encode(x, np.random.default_rng(s)) for s in (1, 2))
    assert a != b
    assert codec.encode(x, None) == codec.encode(x, None)


@pytest.mark.parametrize("spec", ["int8", "topk:0.05", "rotate+int8", "int8:block=16"])
def test_error_feedback_loses_nothing(spec):
    """Sum of what the server decoded over rounds + the final residual = sum of the inputs."""
    codec = parse(spec)
    rng = np.random.default_rng(3)
    shapes = [(40, 30), (30,), ()]
    fb = ErrorFeedback()
    sent = [np.zeros(s) for s in shapes]
    given_in = [np.zeros(s) for s in shapes]
    for rnd in range(12):
        delta = [(rng.standard_normal(s) * 10.0 ** -(rnd % 4)).astype(np.float32)
                 for s in shapes]
        blobs = fb.encode(delta, codec, np.random.default_rng(rnd))
        for k, (b, d, s) in enumerate(zip(blobs, delta, shapes, strict=True)):
            sent[k] += codec.decode(b, int(np.prod(s))).reshape(s)
            given_in[k] += d
    assert fb.residual is not None
    for s, g, r in zip(sent, given_in, fb.residual, strict=True):
        np.testing.assert_allclose(s + r, g, rtol=0, atol=1e-4)
    if codec.name == "topk":  # top-k really withheld something, and it is in the residual
        assert max(float(np.abs(r).max()) for r in fb.residual) > 0.01


def test_error_feedback_starts_over_when_the_model_changes_shape():
    fb = ErrorFeedback([np.ones(3, np.float32)])
    blobs = fb.encode([np.zeros(5, np.float32)], parse("topk:0.2"))
    assert codecs.TopK(0.2).decode(blobs[0], 5).tolist() == [0.0] * 5
    assert fb.residual is not None and fb.residual[0].shape == (5,)


# -- hostile bytes --------------------------------------------------------------------------

def _payload(spec: str, n: int, seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return parse(spec).encode(x, np.random.default_rng(seed))


def _decodes_or_refuses(codec: codecs.Codec, data: bytes, size: int) -> None:
    """``ValueError`` or a finite float32 vector of ``size``: nothing else."""
    try:
        out = codec.decode(data, size)
    except ValueError as exc:
        assert str(exc)
        return
    assert out.dtype == np.float32 and out.shape == (size,) and np.isfinite(out).all()


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(SPECS), n=st.sampled_from([0, 1, 5, 64, 300, 1025]),
       seed=st.integers(0, 2**16), data=st.data())
def test_mutated_truncated_and_extended_payloads_raise_value_error_only(spec, n, seed, data):
    codec = parse(spec)
    good = bytearray(_payload(spec, n, seed))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "random", "header"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(good) - 1))
            good[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        good = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "extend":
        good += data.draw(st.binary(min_size=1, max_size=64))
    elif how == "random":
        good = bytearray(data.draw(st.binary(max_size=200)))
    else:  # a valid header (any codec id/count/version) on the body
        good[:12] = struct.pack("<4sBBxxI", b"\x93XFL", data.draw(st.integers(0, 3)),
                                data.draw(st.integers(0, 6)),
                                data.draw(st.sampled_from([n, n + 1, max(n - 1, 0),
                                                           2**32 - 1])))
    _decodes_or_refuses(codec, bytes(good), n)
    _decodes_or_refuses(codec, memoryview(bytes(good)), n)


@settings(max_examples=100, deadline=None)
@given(spec=st.sampled_from(SPECS), body=st.binary(max_size=64))
def test_huge_declared_count_is_refused_before_allocating(spec, body):
    """A header declaring 2³²-1 elements with a short body: refused, with no big buffer —
    even when the platform's layout claims that many elements."""
    codec = parse(spec)
    header = struct.pack("<4sBBxxI", b"\x93XFL", 1, codec.ident, 2**32 - 1)
    tracemalloc.start()
    try:
        for size in (2**32 - 1, 10):
            with pytest.raises(ValueError):
                codec.decode(header + body, size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decode_names_what_is_wrong():
    x = np.arange(10, dtype=np.float32)
    blob = parse("int8").encode(x)
    with pytest.raises(ValueError, match=r"codec id 2, not 'fp16'"):
        parse("fp16").decode(blob, 10)
    with pytest.raises(ValueError, match="declares 10 elements, the platform's layout has 11"):
        parse("int8").decode(blob, 11)
    with pytest.raises(ValueError, match="shorter than"):
        parse("int8").decode(blob[:5], 10)
    with pytest.raises(ValueError, match="no xflwb codec header"):
        parse("int8").decode(b"\x93NUMPY" + blob[6:], 10)
    with pytest.raises(ValueError, match="version 9"):
        parse("int8").decode(blob[:4] + b"\x09" + blob[5:], 10)
    with pytest.raises(ValueError, match="payload bytes, expected"):
        parse("int8").decode(blob + b"\0", 10)
    with pytest.raises(ValueError, match="payload is bytes"):
        parse("int8").decode("not bytes", 10)  # type: ignore[arg-type]
    forged = bytearray(blob)
    forged[12:16] = struct.pack("<f", -1.0)  # a negative scale
    with pytest.raises(ValueError, match="finite and positive"):
        parse("int8").decode(bytes(forged), 10)
    forged[12:16] = struct.pack("<f", 3e38)  # finite scale, inf values
    with pytest.raises(ValueError, match="NaN or inf"):
        parse("int8").decode(bytes(forged), 10)


def _topk_blob(n: int, idx: list[int], vals: list[float]) -> bytes:
    return (struct.pack("<4sBBxxI", b"\x93XFL", 1, TopK.ident, n)
            + struct.pack("<I", len(idx)) + np.asarray(idx, "<u4").tobytes()
            + np.asarray(vals, "<f4").tobytes())


@pytest.mark.parametrize(("idx", "why"), [([1, 1], "no duplicates"), ([3, 1], "increasing"),
                                          ([3, 1, 3], "no duplicates"),
                                          ([0, 10], "below 10"), ([2**32 - 1], "below 10")])
def test_topk_refuses_duplicate_unsorted_and_out_of_range_indices(idx, why):
    with pytest.raises(ValueError, match=why):
        TopK(0.5).decode(_topk_blob(10, idx, [1.0] * len(idx)), 10)
    ok = TopK(0.5).decode(_topk_blob(10, [0, 9], [1.5, -2.0]), 10)
    assert ok[0] == 1.5 and ok[9] == -2.0 and not ok[1:9].any()
    with pytest.raises(ValueError, match="11 kept values for a tensor of 10"):
        TopK(0.5).decode(_topk_blob(10, list(range(11)), [0.0] * 11), 10)
    with pytest.raises(ValueError, match="NaN or inf"):
        TopK(0.5).decode(_topk_blob(10, [2], [float("nan")]), 10)


# -- arrays, deltas ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.5", "rotate+int8"])
def test_encode_decode_arrays_carry_deltas_against_the_received_model(spec):
    codec = parse(spec)
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), ()]
    received = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    trained = [r + np.float32(0.01) * rng.standard_normal(s).astype(np.float32)
               for r, s in zip(received, shapes, strict=True)]
    blobs = encode_arrays(trained, codec, reference=received, rng=np.random.default_rng(1))
    back = decode_arrays(blobs, codec, shapes, reference=received)
    assert [b.shape for b in back] == shapes
    for b, t, r in zip(back, trained, received, strict=True):
        want = codec.bound(t - r) if codec.delta else codec.bound(t)
        assert float(np.linalg.norm(b - t)) <= want + 1e-6
    if codec.delta:
        with pytest.raises(ValueError, match="pass the reference"):
            encode_arrays(trained, codec)
        with pytest.raises(ValueError, match="pass the reference"):
            decode_arrays(blobs, codec, shapes)
    with pytest.raises(ValueError, match="3 tensors, the platform's layout has 2"):
        decode_arrays(blobs, codec, shapes[:2], reference=received[:2])
    with pytest.raises(ValueError, match=r"^tensor 1: "):
        decode_arrays([blobs[0], blobs[0], blobs[2]], codec, shapes, reference=received)


def test_decoded_delta_that_overflows_the_reference_is_refused():
    codec = parse("int8")
    blob = codec.encode(np.full(4, 3e38, np.float32))
    with pytest.raises(ValueError, match=r"^tensor 0: int8 update is NaN or inf once added.*"
                                         r"overflows float32"):
        decode_arrays([blob], codec, [(4,)], reference=[np.full(4, 3e38, np.float32)])


# -- specs ----------------------------------------------------------------------------------

@given(codec=st.one_of(
    st.builds(Int8, block=st.integers(1, 2**20)),
    st.builds(TopK, fraction=st.floats(1e-9, 1.0, exclude_min=False)),
    st.builds(RotateInt8, block=st.integers(0, 20).map(lambda k: 1 << k)),
    st.just(codecs.Fp16())))
@settings(max_examples=200, deadline=None)
def test_every_codec_round_trips_through_its_spec(codec):
    again = parse(codec.spec)
    assert again == codec and again.spec == codec.spec and type(again) is type(codec)
    assert vars(again) == vars(codec)  # same block / fraction, not just the same text
    assert parse(f"  {codec.spec.upper()} ") == codec
    assert parse(codec) is codec


@pytest.mark.parametrize("alias", ["float32", "FLOAT32", "raw", "npy", "none", "", "  "])
def test_float32_aliases_mean_no_compression(alias):
    assert parse(alias) is None
    assert parse(alias, "down") is None


@pytest.mark.parametrize(("spec", "match"), [
    ("int9", r"^unknown codec 'int9': did you mean 'int8'\? Choose 'float32' or one of"),
    ("flot32", r"did you mean 'float32'\?"),
    ("zstd", r"^unknown codec 'zstd'\. Choose 'float32'"),
    ("int8:block=0", r"block must be an integer in \[1, 1048576\], got 0"),
    ("int8:block=2.5", "block must be a number, got '2.5'"),
    ("int8:width=3", "takes no argument 'width=3'"),
    ("fp16:3", "takes no argument '3'"),
    ("topk:0", r"fraction must be in \(0, 1\], got 0.0"),
    ("topk:1.5", r"fraction must be in \(0, 1\]"),
    ("topk:nan", r"fraction must be in \(0, 1\]"),
    ("topk:one", "fraction must be a number"),
    ("rotate+int8:block=100", "must be a power of two, got 100"),
    ("int8:a=b=c", "cannot read the argument"),
    (3, "a codec is a string such as 'int8'"),
    (None, "a codec is a string"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(InputError, match=match) as info:
        parse(spec)
    assert "?;" not in str(info.value)


def test_directions_are_enforced():
    assert parse("topk:0.01", "up") == TopK(0.01)
    with pytest.raises(InputError, match=r"'topk:0.01' cannot carry the down-link: a model is "
                                         "sent whole; use fp16 or int8 down"):
        parse("topk:0.01", "down")
    assert "topk" not in DOWN_CODECS and set(DOWN_CODECS) == {"fp16", "int8", "rotate+int8"}
    for name in CODECS:
        codec = parse(name)
        assert codec is not None
        for direction in ("up", "down"):
            if direction in codec.directions:
                assert parse(name, direction) == codec
            else:
                with pytest.raises(InputError):
                    parse(name, direction)


def test_topk_spec_is_short_and_exact():
    assert TopK(0.01).spec == "topk:0.01" and TopK(1).spec == "topk:1"
    assert TopK(0.0123456789).spec == "topk:0.0123456789"
    assert TopK(0.01).kept(300) == 3 and TopK(0.01).kept(1) == 1 and TopK(0.01).kept(0) == 0


# -- negotiation strings --------------------------------------------------------------------

@given(names=st.lists(st.sampled_from(sorted(CODECS)), unique=True),
       native=st.sampled_from(["ND", "ndarray", "numpy.ndarray"]))
@settings(max_examples=60, deadline=None)
def test_capabilities_round_trip_through_announce(names, native):
    tt = announce(native, names)
    assert tt.startswith(native)
    assert capabilities(tt) == frozenset(names)


@pytest.mark.parametrize("stock", ["ND", "ndarray", "numpy.ndarray", "", None, 7,
                                   "ND;xfl-codecs=", "ND;other=1"])
def test_stock_clients_announce_nothing(stock):
    assert capabilities(stock) == frozenset()


def test_unknown_codec_names_in_an_announcement_are_ignored():
    assert capabilities("ND;xfl-codecs=int8, zstd ,topk;future=1") == {"int8", "topk"}


@pytest.mark.parametrize("spec", ["fp16", "int8", "int8:block=64", "rotate+int8"])
def test_down_link_tensor_type_round_trips(spec):
    codec = parse(spec, "down")
    assert codec is not None
    assert tensor_type(codec) == f"xfl:{codec.spec}"
    assert codec_from_tensor_type(tensor_type(codec)) == codec


@pytest.mark.parametrize("tt", ["ND", "ndarray", "numpy.ndarray", ""])
def test_float32_tensor_types_have_no_codec(tt):
    assert codec_from_tensor_type(tt) is None
    with pytest.raises(InputError, match="cannot carry the down-link"):
        codec_from_tensor_type("xfl:topk:0.01")


def test_the_float32_constant_and_keys():
    assert FLOAT32 == "float32" and parse(FLOAT32) is None
    assert codecs.KEY_UP != codecs.KEY_CODEC


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from([s for s in SPECS if parse(s).delta]),  # type: ignore[union-attr]
       n=st.sampled_from(SIZES[:20]), seed=st.integers(0, 2**16))
def test_decode_added_is_the_reference_plus_the_decoded_difference(spec, n, seed):
    codec = parse(spec)
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(np.float32)
    blob = codec.encode(rng.normal(0, 0.01, n).astype(np.float32), rng)
    np.testing.assert_array_equal(codec.decode_added(blob, ref), ref + codec.decode(blob, n))
    with pytest.raises(ValueError, match="the platform's layout has"):
        codec.decode_added(blob, np.zeros(n + 1, np.float32))



# -- the wire format, against independent references ----------------------------------------

def _header(ident: int, n: int) -> bytes:
    return struct.pack("<4sBBxxI", b"\x93XFL", 1, ident, n)


def test_wire_format_is_pinned():
    """Hand-built payloads decode as the format says (a kernel change must keep them)."""
    int8 = _header(2, 5) + struct.pack("<2f", 0.5, 2.0) + bytes([0x81, 0, 3, 127, 0xFF])
    np.testing.assert_array_equal(Int8(block=4).decode(int8, 5), [-63.5, 0, 1.5, 63.5, -2.0])
    fp16 = _header(1, 2) + np.float16([1.5, -2.0]).astype("<f2").tobytes()
    np.testing.assert_array_equal(parse("fp16").decode(fp16, 2), [1.5, -2.0])
    topk = _header(3, 4) + struct.pack("<I2I2f", 2, 0, 3, 1.25, -4.0)
    np.testing.assert_array_equal(TopK(0.5).decode(topk, 4), [1.25, 0, 0, -4.0])
    # and the encoder writes exactly these fields (nearest rounding, int8 block 4)
    blob = Int8(block=4).encode(np.float32([-63.5, 0, 1.5, 63.5, -2.0]))
    assert blob[:12] == _header(2, 5)
    scales = np.frombuffer(blob, "<f4", count=2, offset=12)
    np.testing.assert_allclose(scales, [63.5 / 127, 2.0 / 127], rtol=1e-6)
    assert np.frombuffer(blob, np.int8, offset=20).tolist() == [-127, 0, 3, 127, -127]


@pytest.mark.parametrize("d", [1, 2, 4, 8, 32, 64, 128, 1024, 2048, 4096])
def test_hadamard_matches_sylvester_and_is_its_own_inverse(d):
    from scipy.linalg import hadamard

    x = np.random.default_rng(d).standard_normal((3, d)).astype(np.float32)
    want = x.astype(np.float64) @ hadamard(d).T / math.sqrt(d)
    got = codecs._hadamard(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * math.sqrt(d))
    np.testing.assert_allclose(codecs._hadamard(got), x, rtol=0, atol=1e-5 * math.sqrt(d))


@pytest.mark.parametrize(("n", "block"), [(5, 1024), (1000, 256), (3000, 1024)])
def test_rotate_int8_payload_is_the_documented_transform(n, block):
    """Independent decode: signs from numpy's PCG64(seed), Sylvester Hadamard of each block
    (orthonormal), int8 codes times block scales, inverse rotation, padding dropped."""
    from scipy.linalg import hadamard

    codec = RotateInt8(block)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    blob = codec.encode(x, np.random.default_rng(9))
    (seed,) = struct.unpack_from("<I", blob, 12)
    d = min(block, 1 << (n - 1).bit_length())
    nb = -(-n // d)
    scales = np.frombuffer(blob, "<f4", count=nb, offset=16).astype(np.float64)
    q = np.frombuffer(blob, np.int8, offset=16 + 4 * nb).astype(np.float64).reshape(nb, d)
    h = hadamard(d) / math.sqrt(d)
    signs = np.random.default_rng(seed).integers(0, 2, nb * d, dtype=np.int8) * 2.0 - 1
    want = ((q * scales[:, None]) @ h).reshape(-1)[:n] * signs[:n]
    np.testing.assert_allclose(codec.decode(blob, n), want, rtol=0, atol=1e-5)
    # the codes are the rotated input, scaled by its block peak over 127, rounded
    padded = np.zeros(nb * d)
    padded[:n] = x * signs[:n]
    rotated = (padded.reshape(nb, d) @ h) / scales[:, None]
    assert np.abs(rotated - q).max() < 1.0 + 1e-3
