"""Canonical ↔ platform layouts and the wire codecs: exact, and loud on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TOY_MANIFEST as MANIFEST
from xflwb.bridge import params


def _canonical(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p["shape"]).astype(np.float32) for p in MANIFEST["parameters"]]


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_round_trip_is_exact(platform):
    canon = _canonical()
    plat = params.to_platform(canon, MANIFEST, platform)
    assert [list(a.shape) for a in plat] == [list(s) for s in
                                             params.platform_shapes(MANIFEST, platform)]
    back = params.from_platform(plat, MANIFEST, platform)
    for a, b in zip(back, canon, strict=True):
        np.testing.assert_array_equal(a, b)
    flat = params.from_platform([a.ravel() for a in plat], MANIFEST, platform)
    for a, b in zip(flat, canon, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ios_layouts_match_core_ml_documentation():
    canon = _canonical(1)
    conv, _, dense, _, out = params.to_platform(canon, MANIFEST, "ios")
    np.testing.assert_array_equal(conv, canon[0].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(out, canon[4].T)
    # Keras flattens (h, w, c); CHANNEL_FIRST orders (c, h, w): check element by element
    k = canon[2]
    c, h, w = 5, 3, 4
    for (ci, hi, wi) in [(0, 0, 0), (4, 2, 3), (2, 1, 0), (1, 0, 3)]:
        keras_row = (hi * w + wi) * c + ci
        coreml_col = (ci * h + hi) * w + wi
        np.testing.assert_array_equal(dense[:, coreml_col], k[keras_row])


def test_trained_mask_follows_updatable_flags():
    assert params.trained_mask(MANIFEST, "android") == [True] * 5
    assert params.trained_mask(MANIFEST, "ios") == [True, True, True, False, True]


def test_wrong_count_and_size_name_the_layer():
    plat = params.to_platform(_canonical(), MANIFEST, "ios")
    with pytest.raises(ValueError, match="expected 5 ios tensors, got 4"):
        params.from_platform(plat[:4], MANIFEST, "ios")
    bad = list(plat)
    bad[2] = np.zeros(59, np.float32)
    with pytest.raises(ValueError, match=r"layer dense weights has 59 elements, expected 420"):
        params.from_platform(bad, MANIFEST, "ios")
    bad = list(params.to_platform(_canonical(), MANIFEST, "android"))
    bad[1] = np.zeros((6,), np.float32)
    with pytest.raises(ValueError, match=r"a1 \(conv/bias\)"):
        params.from_platform(bad, MANIFEST, "android")
    bad = list(plat)
    bad[4] = np.zeros((7, 2), np.float32)  # right size, wrong (canonical) shape
    with pytest.raises(ValueError, match="shape"):
        params.from_platform(bad, MANIFEST, "ios")
    with pytest.raises(ValueError, match="unknown platform"):
        params.to_platform(_canonical(), MANIFEST, "web")


@pytest.mark.parametrize("codec", ["raw", "npy"])
def test_codecs_round_trip(codec):
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
              np.array([np.pi], np.float32)]
    blobs = params.encode_tensors(arrays, codec)
    if codec == "raw":
        assert blobs[0] == arrays[0].astype("<f4").tobytes()
        assert len(blobs[0]) == 48
    else:
        assert blobs[0].startswith(params.NPY_MAGIC)
    decoded, used = params.decode_tensors(blobs)
    assert used == codec
    np.testing.assert_array_equal(decoded[0].reshape(3, 4), arrays[0])
    np.testing.assert_array_equal(decoded[1].ravel(), arrays[1])


def test_raw_is_little_endian_even_from_big_endian_input():
    a = np.array([1.5, -2.0], dtype=">f4")
    assert params.encode_raw(a) == np.array([1.5, -2.0], "<f4").tobytes()


def test_codec_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        params.decode_raw(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"malformed \.npy"):
        params.decode_npy(params.NPY_MAGIC + b"garbage")
    with pytest.raises(ValueError, match="mix encodings"):
        params.decode_tensors([params.encode_raw(np.ones(2)), params.encode_npy(np.ones(2))])
    with pytest.raises(ValueError, match="unknown codec"):
        params.encode_tensors([np.ones(2)], "protobuf")


# -- property tests: every layout is an exact permutation; bad manifests are refused ------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _layout_shape(layout: str, dims: list[int]) -> tuple[int, ...]:
    a, b, c, d = dims
    return {"dense": (a, b), "dense_conv": (a, b), "conv": (a, b, c, d),
            "conv1d": (a, b, c), "depthwise": (a, b, c, d), "identity": (a,)}[layout]


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(["dense", "dense_conv", "conv", "conv1d", "depthwise",
                               "identity"]),
       dims=st.lists(st.integers(1, 5), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_every_layout_round_trips_exactly(layout, dims, seed):
    shape = _layout_shape(layout, dims)
    k = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w = params.to_platform_array(k, layout)
    assert w.size == k.size and sorted(w.ravel().tolist()) == sorted(k.ravel().tolist())
    back = params.from_platform_array(w, layout, shape=shape)
    np.testing.assert_array_equal(back, k)


@settings(max_examples=60, deadline=None)
@given(trained=st.lists(st.integers(-3, 8), max_size=6),
       canonical=st.one_of(st.none(), st.integers(-3, 8), st.text(max_size=3)))
def test_manifest_refuses_out_of_range_plan_indices(trained, canonical):
    from xflwb.bridge import manifest as manifest_mod

    m = json.loads(json.dumps(MANIFEST))
    m.update(schema=manifest_mod.SCHEMA, data_type="t", input={"shape": [3, 4, 2]}, classes=2,
             loss="mse", optimizer={"type": "sgd"}, batch_size=1, epochs=1)
    for entry in m["platforms"].values():
        entry.update(file="f", sha256="0" * 64, bytes=1)
    m["platforms"]["android"]["trained"] = trained
    m["platforms"]["ios"]["coreml_layers"][0]["canonical"] = canonical
    n = len(m["parameters"])
    ok = all(0 <= i < n for i in trained) and (
        canonical is None or (isinstance(canonical, int) and 0 <= canonical < n))
    if ok:
        manifest_mod.validate(m)
    else:
        with pytest.raises(manifest_mod.ManifestError):
            manifest_mod.validate(m)
