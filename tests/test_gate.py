"""``UpdateGate``: the one place a payload is read or a model is written, on the toy manifest
(Android holds every tensor; iOS has a frozen dense bias and its own layouts)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import toy_canonical
from xflwb.bridge import params
from xflwb.errors import InputError, UpdateRejected
from xflwb.federation.gate import (
    BadExampleCount,
    FrozenMismatch,
    MalformedManifest,
    MalformedUpdate,
    NonFiniteUpdate,
    UnknownPlatform,
    UpdateGate,
    UpdateNormExceeded,
)

IOS = params.trained_mask(MANIFEST, "ios")


def gate(manifest: dict = MANIFEST, **kw) -> UpdateGate:
    g = UpdateGate(manifest, **kw)
    g.check_manifest(toy_canonical(0))
    return g


def test_an_ios_update_maps_to_canonical_with_its_frozen_tensor_masked_out():
    base, trained = toy_canonical(0), toy_canonical(1)
    g = gate()
    wire = params.encode_tensors(params.to_platform(trained, MANIFEST, "ios"), "npy")
    u = g.accept("ios", "i1", wire, 12, {"loss": 0.5}, base, base_version=3)
    assert (u.platform, u.client, u.examples, u.capped, u.codec, u.base_version) == (
        "ios", "i1", 12, False, "npy", 3)
    assert u.trained == IOS and IOS[3] is False  # dense/bias is frozen on iOS
    for k in range(5):  # Core ML's layouts mapped back (conv OIHW, dense_chw, dense)
        np.testing.assert_allclose(u.tensors[k], trained[k], atol=1e-6)
    assert u.metrics == {"loss": 0.5}


def test_encode_writes_each_platform_layout_and_codec_and_caches_per_model():
    model = toy_canonical(2)
    g = gate()
    raw = g.encode(model, "android", "raw")
    npy = g.encode(model, "ios", "npy")
    assert raw[0][:6] != params.NPY_MAGIC and npy[0][:6] == params.NPY_MAGIC
    back = params.from_platform([params.decode_npy(t) for t in npy], MANIFEST, "ios",
                                base=model)
    for a, b in zip(back, model, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert g.encode(model, "android", "raw") is raw  # the same model: encoded once
    newer = [a + 1 for a in model]
    assert g.encode(newer, "android", "raw") is not raw
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        g.encode(model, "android", "zip")


@pytest.mark.parametrize("value, n, capped", [(5, 5, False), (np.int64(7), 7, False),
                                               (10**6 + 1, 10**6, True), (2**63 - 1, 10**6,
                                                                          True)])
def test_examples_are_capped_by_max_examples(value, n, capped):
    assert gate().examples(value) == (n, capped)


@pytest.mark.parametrize("value", [0, -3, 2.5, "10", None, True])
def test_examples_must_be_a_positive_integer(value):
    with pytest.raises(BadExampleCount, match="num_examples must be"):
        gate().examples(value)


def test_each_refusal_is_an_update_rejected_naming_the_problem():
    base = toy_canonical(0)
    good = params.encode_tensors(toy_canonical(1))
    frozen = copy.deepcopy(MANIFEST)
    frozen["frozen"] = {"sha256": "a" * 64}
    cases = [
        (lambda: gate().accept("web", "w", good, 5, {}, base), UnknownPlatform,
         "platform 'web'"),
        (lambda: gate(frozen).accept("android", "a", good, 5, {"frozen_sha256": "b" * 64},
                                     base), FrozenMismatch, "different frozen weights"),
        (lambda: gate().accept("android", "a", good[:-1], 5, {}, base), MalformedUpdate,
         "expected 5 android tensors, got 4"),
        (lambda: gate().accept("android", "a", [b"\x93NUMPY garbage"] * 5, 5, {}, base),
         MalformedUpdate, "malformed .npy tensor"),
        (lambda: gate().accept("android", "a", good, 0, {}, base), BadExampleCount,
         "must be positive"),
        (lambda: gate(check_finite=True).accept(
            "android", "a", params.encode_tensors([np.full_like(a, np.nan) for a in base]),
            5, {}, base), NonFiniteUpdate, "parameter 0 contains NaN or inf"),
        (lambda: gate(max_update_norm=1.0).accept("android", "a", good, 5, {}, base),
         UpdateNormExceeded, "exceeds max_update_norm 1"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words) as info:
            call()
        assert isinstance(info.value, UpdateRejected) and isinstance(info.value, ValueError)


def test_a_matching_frozen_digest_passes_and_a_missing_one_is_not_required():
    m = copy.deepcopy(MANIFEST)
    m["frozen"] = {"sha256": "a" * 64}
    good = params.encode_tensors(toy_canonical(1))
    g = gate(m)
    assert g.accept("android", "a", good, 5, {"frozen_sha256": "a" * 64},
                    toy_canonical(0)).examples == 5
    assert g.accept("android", "a", good, 5, None, toy_canonical(0)).examples == 5


def test_the_norm_is_measured_from_the_base_the_client_trained_on():
    base = toy_canonical(0)
    near = [a + 1e-3 for a in base]
    g = gate(max_update_norm=0.5)
    g.accept("android", "a", params.encode_tensors(near), 5, {}, base)  # close to its base
    with pytest.raises(UpdateNormExceeded):  # far from another model
        g.accept("android", "a", params.encode_tensors(near), 5, {}, toy_canonical(9))


def test_a_broken_manifest_fails_at_check_and_a_round_keyerror_propagates():
    m = copy.deepcopy(MANIFEST)
    del m["platforms"]["ios"]["coreml_layers"][0]["layout"]
    with pytest.raises(MalformedManifest, match=r"malformed for platform 'ios' \(KeyError"):
        UpdateGate(m).check_manifest(toy_canonical(0))
    assert issubclass(MalformedManifest, InputError)
    g = gate()
    g.manifest = m  # corrupted after the start-up check: the export's fault, not the phone's
    wire = params.encode_tensors(params.to_platform(toy_canonical(1), MANIFEST, "ios"))
    with pytest.raises(KeyError, match="layout"):
        g.accept("ios", "i", wire, 5, {}, toy_canonical(0))


def test_decode_sums_keeps_float64_precision():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1 / 3], np.float64))
    (got,) = gate().decode_sums([buf.getvalue()])
    assert got.dtype == np.float64 and got[0] == 1 / 3


# -- fuzz: whatever bytes a client sends, the gate refuses them or accepts a valid update ----
SIZES = [int(np.prod(p["shape"])) for p in MANIFEST["parameters"]]


@st.composite
def payloads(draw: st.DrawFn) -> list[bytes]:
    """Garbage of every kind: random bytes, truncated or padded raw tensors, .npy headers
    with any dtype or shape, the right count or not."""
    count = draw(st.sampled_from([0, 1, 4, 5, 6]))
    out = []
    for k in range(count):
        size = SIZES[k % len(SIZES)]
        kind = draw(st.sampled_from(["random", "raw", "npy", "magic"]))
        if kind == "random":
            out.append(draw(st.binary(max_size=64)))
        elif kind == "raw":
            n = draw(st.sampled_from([size, size - 1, size + 1, 0]))
            out.append(draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\x7f",
                                             b"\0\0\x80\x7f"])) * max(n, 0)
                       + draw(st.binary(max_size=3)))
        elif kind == "npy":
            dtype = draw(st.sampled_from(["<f4", ">f8", "<f2", "<i4", "|b1", "<c8", "|O",
                                          "<U2", "[('a', '<f4')]"]))
            shape = draw(st.sampled_from([(size,), (size, 1), (-1,), (), (size + 1,)]))
            header = (f"{{'descr': {dtype!r}, 'fortran_order': False, 'shape': {shape}, }}"
                      if not dtype.startswith("[") else
                      f"{{'descr': {dtype}, 'fortran_order': False, 'shape': {shape}, }}")
            raw = header.encode() + b" " * (-(len(header) + 11) % 64) + b"\n"
            out.append(params.NPY_MAGIC + b"\x01\x00" + len(raw).to_bytes(2, "little") + raw
                       + draw(st.binary(max_size=128)))
        else:
            out.append(params.NPY_MAGIC + draw(st.binary(max_size=40)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=payloads(), platform=st.sampled_from(["android", "ios", "web"]),
       n=st.one_of(st.integers(-2, 2**64), st.floats(), st.none(), st.text(max_size=3)),
       finite=st.booleans())
def test_fuzz_any_payload_is_refused_cleanly_or_accepted_valid(tensors, platform, n, finite):
    base = toy_canonical(0)
    g = gate(check_finite=finite, max_update_norm=None if finite else 1e3)
    try:
        u = g.accept(platform, "x", tensors, n, {}, base)
    except ValueError:  # UpdateRejected is a ValueError: only the client's update is lost
        return
    # accepted: a full canonical model of the right shapes, float32, counted sanely
    assert [a.shape for a in u.tensors] == [a.shape for a in base]
    assert all(a.dtype == np.float32 for a in u.tensors)
    assert 1 <= u.examples <= 10**6
    if finite:
        assert all(np.isfinite(a).all() for a, t in zip(u.tensors, u.trained, strict=True)
                   if t)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=300), count=st.integers(1, 6))
def test_fuzz_random_bytes_never_raise_anything_but_a_rejection(blob, count):
    with pytest.raises(UpdateRejected):
        gate().accept("android", "x", [blob] * count, 3, {}, toy_canonical(0))


def test_a_compressed_model_goes_down_deterministically_and_is_cached_per_codec():
    from xflwb.federation.codecs import parse
    from xflwb.federation.gate import tensor_type_of

    model = toy_canonical(2)
    g = gate()
    fp16, int8 = parse("fp16", "down"), parse("int8", "down")
    down = g.encode(model, "ios", int8)
    assert g.encode(model, "ios", int8) is down  # cached beside raw / npy
    assert g.encode(model, "ios", int8, cache=False) == down  # nearest rounding: reproducible
    assert g.encode(model, "ios", fp16) != down
    assert [tensor_type_of(c) for c in ("raw", "npy", fp16)] == ["ND", "ndarray", "xfl:fp16"]
    assert g.float32_bytes("ios") == 4 * sum(
        int(np.prod(s)) for s in params.platform_shapes(MANIFEST, "ios"))
    with pytest.raises(ValueError, match="cannot carry a model down"):
        g.encode(model, "ios", parse("topk:0.1"))
