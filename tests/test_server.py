"""The backend end to end: real HTTP (uvicorn), real gRPC (Flower's legacy transport), real
session processes, and test phones written only from FEDKIT_PROTOCOL.md (tests/wirephone.py).
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import keras
import numpy as np
import pytest

import xflwb
from tests.support import wait_until
from tests.wirephone import WirePhone

pytestmark = pytest.mark.timeout(300)


def _cnn(seed: int, classes: int = 4):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(classes, activation="softmax"),
    ])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Three small models, exported for both platforms, with distinct data types."""
    out = tmp_path_factory.mktemp("exports")
    return {name: xflwb.export(_cnn(i), name=name, data_type=f"{name}-data", out_dir=out)
            for i, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture
def wb(tmp_path):
    bench = xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, admin_token="secret").start()
    yield bench
    bench.stop()


# -- helpers written from the documents, not from xflwb's code ----------------------------------
def to_canonical(ios_tensors, manifest):
    """Core ML layout → Keras layout, per COREML_TRAINING.md (independent of xflwb.params)."""
    canon = [None] * len(manifest["parameters"])
    for t, e in zip(ios_tensors, manifest["platforms"]["ios"]["coreml_layers"], strict=True):
        w = np.asarray(t, np.float32).reshape(e["shape"])
        if e["layout"] == "conv":
            w = w.transpose(2, 3, 1, 0)
        elif e["layout"] == "dense":
            w = w.T
        elif e["layout"] == "dense_chw":
            c, h, ww = e["chw"]
            w = w.T.reshape(c, h, ww, -1).transpose(1, 2, 0, 3).reshape(c * h * ww, -1)
        canon[e["canonical"]] = w
    return canon


def shapes(manifest):
    return [tuple(p["shape"]) for p in manifest["parameters"]]


class Updates:
    """update_fn for a phone: remembers what it was sent, answers with seeded tensors."""

    def __init__(self, seed: int, mode: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.mode = mode  # "delta": received + noise; "random": fresh random tensors

    def __call__(self, tensors, _round):
        if self.mode == "delta":
            return [t + self.rng.standard_normal(t.shape).astype(np.float32) * 0.1
                    for t in tensors]
        return [self.rng.standard_normal(t.shape).astype(np.float32) for t in tensors]


def test_mixed_round_global_is_cross_platform_weighted_average(wb, exports):
    res = exports["alpha"]
    m = res.manifest
    wb.publish(res)
    # textbook FedAvg weights (30 vs 10 examples): the default max_weight_ratio would count
    # the 30 as 2 × the lower median claim, 20 (tests/test_influence.py tests that)
    s = wb.train("alpha", rounds=2, min_clients=2, local_epochs=3, round_timeout=60,
                 max_weight_ratio=None)
    assert s.status == "running" and set(s.ports) == {"android", "ios"}
    android = WirePhone(wb.url, "android", "alpha-data", Updates(1, "delta"), num_examples=30,
                        device_id=11)
    ios = WirePhone(wb.url, "ios", "alpha-data", Updates(2, "random"), num_examples=10,
                    device_id=12, eval_loss=0.25, eval_accuracy=0.75, test_size=7)
    threads = [android.start(), ios.start()]
    assert s.wait(timeout=120) == "finished"
    for t in threads:
        t.join(30)
    for phone in (android, ios):
        assert phone.report.error is None, phone.report.error
        assert phone.report.rounds_fit == 2
        assert phone.report.local_epochs == [3, 3]  # sint64 config value FedKit reads
    # expected global, computed here from what the phones sent
    expected = [a.copy() for a in xflwb.bridge.manifest.initial_parameters(res.manifest)]
    for rnd in range(2):
        a = [np.asarray(t).reshape(sh) for t, sh in zip(android.report.sent[rnd], shapes(m),
                                                         strict=True)]
        i = to_canonical(ios.report.sent[rnd], m)
        # what each phone received this round is the previous global in its own layout
        for got, want in zip(android.report.received[rnd], expected, strict=True):
            np.testing.assert_allclose(got, want.ravel(), atol=1e-6)
        got_ios = to_canonical(ios.report.received[rnd], m)
        for got, want in zip(got_ios, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)
        expected = [(30 * x + 10 * y) / 40 for x, y in zip(a, i, strict=True)]
    final = s.global_parameters()
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    h = s.history
    assert set(h.columns) == {"round", "platform", "metric", "value"}
    assert {"android", "ios", "all"} <= set(h.platform)
    by = h.set_index(["round", "platform", "metric"])["value"]
    assert by[(1, "android", "examples")] == 30 and by[(1, "ios", "examples")] == 10
    assert by[(2, "all", "clients")] == 2
    assert by[(1, "ios", "bytes_up")] == sum(int(np.prod(e["shape"])) * 4 for e in
                                             m["platforms"]["ios"]["coreml_layers"])
    assert by[(1, "ios", "eval_loss")] == pytest.approx(0.25)
    assert by[(2, "ios", "accuracy")] == pytest.approx(0.75)  # telemetry, attributed to iOS
    assert by[(2, "android", "accuracy")] == pytest.approx(0.8)
    assert by[(1, "android", "fit_seconds")] >= 0
    # the same metrics over HTTP
    r = httpx.get(f"{wb.url}/api/v1/sessions/{s.id}/metrics",
                  headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200 and len(r.json()) == len(h)


def test_malformed_client_is_rejected_and_round_goes_on(wb, exports):
    res = exports["beta"]
    wb.publish(res)
    s = wb.train("beta", rounds=1, min_clients=2, round_timeout=60)
    good = WirePhone(wb.url, "android", "beta-data", Updates(3, "delta"), num_examples=5,
                     device_id=21)

    def nan_update(tensors, _r):
        return [np.full(t.shape, np.nan, np.float32) for t in tensors]

    bad = WirePhone(wb.url, "ios", "beta-data", nan_update, num_examples=50, device_id=22)
    threads = [good.start(), bad.start()]
    assert s.wait(timeout=120) == "finished"
    for t in threads:
        t.join(30)
    assert good.report.error is None
    want = [np.asarray(t).reshape(sh) for t, sh in zip(good.report.sent[0],
                                                       shapes(res.manifest), strict=True)]
    for got, w in zip(s.global_parameters(), want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-6)
    rej = s.rejections
    assert list(rej.platform) == ["ios"] and "nan or inf" in rej.reason[0].lower()
    by = s.history.set_index(["round", "platform", "metric"])["value"]
    assert by[(1, "ios", "rejected")] == 1 and by[(1, "all", "clients")] == 1


def test_wrong_tensor_count_names_the_problem(wb, exports):
    res = exports["gamma"]
    wb.publish(res)
    s = wb.train("gamma", rounds=1, min_clients=2, round_timeout=60)
    good = WirePhone(wb.url, "ios", "gamma-data", Updates(4, "random"), device_id=31)
    short = WirePhone(wb.url, "android", "gamma-data", lambda t, r: t[:-1], device_id=32)
    threads = [good.start(), short.start()]
    assert s.wait(timeout=120) == "finished"
    for t in threads:
        t.join(30)
    reason = s.rejections.reason[0]
    assert "expected 4 android tensors, got 3" in reason
    want = to_canonical(good.report.sent[0], res.manifest)
    for got, w in zip(s.global_parameters(), want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-6)


def test_three_sessions_run_side_by_side(wb, exports):
    sessions = {}
    for name, res in exports.items():
        wb.publish(res)
        sessions[name] = wb.train(name, rounds=2, min_clients=1, round_timeout=60)
    ports = [p for s in sessions.values() for p in s.ports.values()]
    assert len(set(ports)) == 6
    phones = {name: WirePhone(wb.url, "android", f"{name}-data", Updates(i, "delta"),
                              device_id=40 + i)
              for i, name in enumerate(sessions)}
    threads = [p.start() for p in phones.values()]
    for s in sessions.values():
        assert s.wait(timeout=120) == "finished"
    for t in threads:
        t.join(30)
    for name, phone in phones.items():
        assert phone.report.error is None, (name, phone.report.error)
        assert phone.report.rounds_fit == 2
        assert phone.report.advertised["name"] == name
    table = wb.session_table
    assert list(table.status) == ["finished"] * 3


def test_crashed_session_resumes_from_checkpoint(wb, exports):
    res = exports["alpha"]
    wb.publish(res)
    s = wb.train("alpha", rounds=5, min_clients=1, round_timeout=60)
    # The phone holds its third update until the kill, so the session cannot finish first
    # (rounds take milliseconds; without the hold, all 5 can end before the SIGKILL lands).
    release = threading.Event()
    updates = Updates(5, "delta")

    def held(tensors, round_idx):
        if round_idx >= 2:
            release.wait(60)
        return updates(tensors, round_idx)

    phone = WirePhone(wb.url, "android", "alpha-data", held, device_id=51)
    thread = phone.start()
    wait_until(lambda: s.round >= 2, 60, "round 2", describe=lambda: s.info)
    assert s.round == 2
    os.kill(s.info["pid"], signal.SIGKILL)  # the session process dies without a word
    wait_until(lambda: s.status == "crashed", 10, "the killed session to read crashed",
               describe=lambda: s.info)
    assert "exited unexpectedly" in s.info["error"]
    release.set()
    thread.join(60)
    saved = s.global_parameters()
    # the kernel (this process) and the API survive; a new session resumes from the checkpoint
    r = httpx.get(f"{wb.url}/api/v1/sessions", headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200
    s2 = wb.train("alpha", rounds=1, min_clients=1, round_timeout=60, resume=True)
    assert s2.info["resumed_from"] is not None
    assert s2.started_from == f"resumed from session {s.id}, round 2"
    phone2 = WirePhone(wb.url, "android", "alpha-data", Updates(6, "delta"), device_id=52)
    phone2.start().join(60)
    assert s2.wait(timeout=60) == "finished"
    for got, want in zip(phone2.report.received[0], saved, strict=True):
        np.testing.assert_allclose(got, want.ravel(), atol=1e-7)
    fresh = wb.train("alpha", rounds=1, min_clients=1, round_timeout=60)  # fresh by default
    phone3 = WirePhone(wb.url, "android", "alpha-data", Updates(7, "delta"), device_id=53)
    phone3.start().join(60)
    assert fresh.wait(timeout=60) == "finished"
    initial = xflwb.bridge.manifest.initial_parameters(res.manifest)
    for got, want in zip(phone3.report.received[0], initial, strict=True):
        np.testing.assert_allclose(got, want.ravel(), atol=1e-7)


def test_train_server_statuses_and_auto_start(tmp_path, exports):
    bench = xflwb.Workbench(data_dir=tmp_path / "auto", port=0, auto_start=True,
                            session_defaults={"rounds": 1, "min_clients": 1,
                                              "round_timeout": 30},
                            allow_phone_start_fresh=True)  # FedKit's started_non_fresh
    with bench:
        bench.publish(exports["beta"])
        ad = httpx.post(f"{bench.url}/train/advertised",
                        json={"data_type": "beta-data", "tflite": False, "coreml": True}).json()
        assert ad["coreml"] and not ad["tflite"] and ad["coreml_path"].startswith("static/")
        assert [e["type"] for e in ad["coreml_layers"]] == ["weights", "bias"] * 2
        r = httpx.post(f"{bench.url}/train/server", json={"id": ad["id"]}).json()
        assert r["status"] == "new" and r["port"] > 0
        again = httpx.post(f"{bench.url}/train/server", json={"id": ad["id"]}).json()
        assert again == {"status": "started", "session_id": r["session_id"], "port": r["port"]}
        fresh = httpx.post(f"{bench.url}/train/server",
                           json={"id": ad["id"], "start_fresh": True}).json()
        assert fresh["status"] == "started_non_fresh" and fresh["port"] is None
        ad_android = httpx.post(f"{bench.url}/train/advertised",
                                json={"data_type": "beta-data"}).json()
        assert ad_android["id"] != ad["id"]
        r2 = httpx.post(f"{bench.url}/train/server", json={"id": ad_android["id"]}).json()
        assert r2["status"] == "started" and r2["port"] != r["port"]  # a port per platform
        phone = WirePhone(bench.url, "ios", "beta-data", Updates(8, "random"), device_id=61)
        phone.start().join(60)
        assert phone.report.error is None and phone.report.rounds_fit == 1
    off = xflwb.Workbench(data_dir=tmp_path / "auto", port=0)
    with off:
        r = httpx.post(f"{off.url}/train/server", json={"id": ad["id"]}).json()
        assert r == {"status": "no_session", "session_id": None, "port": None}


def test_http_bad_input_gets_4xx_with_reason(wb, exports):
    wb.publish(exports["alpha"])
    u = wb.url
    cases = [
        ("post", "/train/advertised", {"data_type": "nope"}, 404, "no android model"),
        ("post", "/train/advertised", {"data_type": "alpha-data", "coreml": True}, 400,
         "exactly one"),
        ("post", "/train/advertised", {"tflite": True}, 422, "data_type"),
        ("post", "/train/server", {"id": 999}, 404, "no model with id 999"),
        ("post", "/train/server", {"id": "x"}, 422, "id"),
        ("post", "/telemetry/fit_ins", {"device_id": 1, "session_id": 77, "start": 1, "end": 2},
         404, "no session"),
        ("post", "/telemetry/fit_ins", {"device_id": 1}, 422, "session_id"),
        ("get", "/static/alpha--missing.tflite", None, 404, "no model file"),
    ]
    for method, path, body, code, needle in cases:
        r = getattr(httpx, method)(u + path, **({"json": body} if body is not None else {}))
        assert r.status_code == code, (path, body, r.text)
        assert needle in r.text, (path, r.text)
    bad_json = httpx.post(u + "/train/advertised", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 422


def test_download_matches_manifest_and_openapi(wb, exports):
    wb.publish(exports["alpha"])
    ad = httpx.post(f"{wb.url}/train/advertised", json={"data_type": "alpha-data"}).json()
    assert ad["tflite_path"] == "static/alpha--alpha-v1.tflite"
    assert ad["tflite_layers"] == exports["alpha"].manifest["platforms"]["android"][
        "tflite_layers"]
    blob = httpx.get(f"{wb.url}/{ad['tflite_path']}").content
    assert blob == exports["alpha"].paths["android"].read_bytes()
    spec = httpx.get(f"{wb.url}/openapi.json").json()
    for path in ("/train/advertised", "/train/server", "/telemetry/fit_ins",
                 "/telemetry/evaluate_ins", "/api/v1/sessions/{session_id}/metrics"):
        assert path in spec["paths"]


def test_admin_api_needs_the_token(wb, exports):
    for path in ("/api/v1/models", "/api/v1/sessions", "/api/v1/devices", "/api/v1/telemetry"):
        assert httpx.get(wb.url + path).status_code == 401
        assert httpx.get(wb.url + path, headers={"Authorization": "Bearer nope"}
                         ).status_code == 401
        assert httpx.get(wb.url + path, headers={"Authorization": "Bearer secret"}
                         ).status_code == 200
    h = {"Authorization": "Bearer secret"}
    r = httpx.post(f"{wb.url}/api/v1/models", json={"path": str(exports["gamma"].directory)},
                   headers=h)
    assert r.status_code == 201 and r.json()["name"] == "gamma"
    assert httpx.post(f"{wb.url}/api/v1/models", json={"path": "/nonexistent"},
                      headers=h).status_code == 404
    r = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": "nope"}, headers=h)
    assert r.status_code == 404 and "no published model named 'nope'" in r.text
    r = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": "gamma", "rounds": 0}, headers=h)
    assert r.status_code == 422
    r = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": "gamma", "strategy": "magic"},
                   headers=h)
    assert r.status_code == 422 and "strategy" in r.text and "fedavg" in r.text
    r = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": "gamma", "rounds": 1,
                                                      "min_clients": 1}, headers=h)
    assert r.status_code == 201
    sid = r.json()["id"]
    again = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": "gamma"}, headers=h)
    assert again.status_code == 409 and "already has session" in again.text
    stop = httpx.post(f"{wb.url}/api/v1/sessions/{sid}/stop", headers=h)
    assert stop.json()["status"] == "stopped"


def test_publish_is_immutable(wb, exports, tmp_path):
    first = wb.publish(exports["alpha"])
    assert wb.publish(exports["alpha"])["id"] == first["id"]  # same files: same record
    other = xflwb.export(_cnn(9), name="alpha", out_dir=tmp_path / "elsewhere")
    assert other.version == 1
    with pytest.raises(xflwb.sessions.registry.RegistryError, match="immutable"):
        wb.publish(other)


def test_stop_leaves_no_process_or_thread(tmp_path, exports):
    bench = xflwb.Workbench(data_dir=tmp_path / "x", port=0).start()
    bench.publish(exports["gamma"])
    s = bench.train("gamma", rounds=3, min_clients=5)
    pid = s.info["pid"]
    bench.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: not even a zombie left
    assert not [t for t in threading.enumerate() if t.name == "xflwb-http"]
    with pytest.raises(RuntimeError, match="not running"):
        _ = bench.url
