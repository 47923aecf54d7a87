"""Hardening of the backend's edges (issue 12): sessions start exactly once under races, no
bad input earns a 5xx (schemathesis over every route of the live app, plus deep and wide
bodies: issue 20), and size limits on HTTP bodies and gRPC messages. Real uvicorn, real
session processes, real gRPC on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx
import keras
import numpy as np
import pytest

import xflwb
from tests.support import wait_until
from tests.wirephone import WirePhone
from xflwb.sessions.handle import Session
from xflwb.sessions.registry import SessionConflict

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": "Bearer secret"}


def _tiny(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
                             keras.layers.Flatten(),
                             keras.layers.Dense(4, activation="softmax")])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One tiny model exported for both platforms (data type ``hard-data``)."""
    return xflwb.export(_tiny(), name="hard", data_type="hard-data",
                        out_dir=tmp_path_factory.mktemp("hard-exports"))


def _bench(tmp_path, export, **kw) -> xflwb.Workbench:
    wb = xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, admin_token="secret", **kw).start()
    wb.publish(export)
    return wb


def _artifact_ids(wb: xflwb.Workbench) -> dict[str, int]:
    m = httpx.get(f"{wb.url}/api/v1/models", headers=AUTH).json()[0]
    return {p: a["id"] for p, a in m["artifacts"].items()}


def _active_rows(wb: xflwb.Workbench) -> list[dict]:
    return [s for s in wb.registry.list_sessions() if s["status"] in ("starting", "running")]


def _race(n: int, target) -> list:
    """Run ``target(i)`` in ``n`` threads released together; results (or exceptions)."""
    gate = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = target(i)
        except Exception as exc:  # collected, asserted in the test thread
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


# -- sessions start exactly once ------------------------------------------------------------------
def test_concurrent_admin_and_python_starts_have_one_winner(tmp_path, export):
    wb = _bench(tmp_path, export)
    try:
        body = {"model": "hard", "rounds": 1, "min_clients": 2}

        def start(i: int):
            if i < 6:  # the probe: 6 admin starts at once
                return httpx.post(f"{wb.url}/api/v1/sessions", json=body, headers=AUTH,
                                  timeout=150)
            return wb.train("hard", rounds=1, min_clients=2)  # and two notebook starts

        results = _race(8, start)
        codes = [r.status_code for r in results if isinstance(r, httpx.Response)]
        sessions = [r for r in results if isinstance(r, Session)]
        conflicts = [r for r in results if isinstance(r, SessionConflict)]
        others = [r for r in results
                  if not isinstance(r, httpx.Response | Session
                                    | SessionConflict)]
        assert others == []
        assert not [c for c in codes if c >= 500], codes
        assert codes.count(201) + len(sessions) == 1, (codes, sessions)
        assert codes.count(409) + len(conflicts) == 7, (codes, conflicts)
        active = _active_rows(wb)
        assert len(active) == 1 and active[0]["status"] == "running"
        winner = active[0]["id"]
        for r in results:  # every loser is told which session runs
            if isinstance(r, httpx.Response) and r.status_code == 409:
                assert f"session {winner}" in r.json()["detail"]
            if isinstance(r, SessionConflict):
                assert r.session_id == winner and f"session {winner}" in str(r)
    finally:
        wb.stop()


def test_concurrent_auto_start_phones_all_join_one_session(tmp_path, export):
    wb = _bench(tmp_path, export, auto_start=True,
                session_defaults={"rounds": 1, "min_clients": 2})
    try:
        ids = _artifact_ids(wb)
        plats = ["android", "ios"] * 4

        def ask(i: int) -> httpx.Response:
            return httpx.post(f"{wb.url}/train/server", json={"id": ids[plats[i]]},
                              timeout=150)

        results = _race(8, ask)
        assert all(isinstance(r, httpx.Response) for r in results), results
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
        bodies = [r.json() for r in results]
        assert sorted(b["status"] for b in bodies) == ["new"] + ["started"] * 7
        assert len({b["session_id"] for b in bodies}) == 1
        active = _active_rows(wb)
        assert len(active) == 1 and active[0]["id"] == bodies[0]["session_id"]
        for plat, b in zip(plats, bodies, strict=True):  # each phone gets its platform port
            assert b["port"] == active[0]["ports"][plat]
    finally:
        wb.stop()


def test_train_while_clients_list_sessions_never_reports_a_crash(tmp_path, export):
    wb = _bench(tmp_path, export)
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.get(f"{wb.url}/api/v1/sessions", headers=AUTH)
                seen.append((r.status_code, r.text))

    pollers = [threading.Thread(target=poll) for _ in range(2)]
    try:
        for t in pollers:
            t.start()
        for _ in range(4):
            s = wb.train("hard", rounds=1, min_clients=2)
            assert s.status == "running"
            s.stop()
    finally:
        stop.set()
        for t in pollers:
            t.join(30)
        wb.stop()
    assert seen and {code for code, _ in seen} == {200}
    assert not [text for _, text in seen if "crashed" in text]
    statuses = [s["status"] for s in wb.registry.list_sessions()] if wb.registry else []
    assert statuses == ["stopped"] * 4


def test_a_starting_row_is_crashed_only_when_its_launcher_is_gone(tmp_path, export):
    from xflwb.sessions.manager import SessionManager
    from xflwb.sessions.registry import Registry

    reg = Registry(tmp_path / "xfl")
    try:
        model = reg.publish(export)
        manager = SessionManager(reg)
        sid = reg.create_session(model, {"rounds": 1}, exclusive=True)
        manager.refresh()  # launched by this (live) process, no pid yet: still starting
        assert reg.get_session(sid)["status"] == "starting"
        with pytest.raises(SessionConflict, match=f"session {sid} \\(starting\\)"):
            reg.create_session(model, {"rounds": 1}, exclusive=True)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        reg.update_session(sid, launcher_pid=gone.pid)
        manager.refresh()
        info = reg.get_session(sid)
        assert info["status"] == "crashed"
        assert f"launcher (process {gone.pid}) exited" in info["error"]
        # the model is free again
        assert reg.create_session(model, {"rounds": 1}, exclusive=True) > sid
    finally:
        reg.close()


# -- no 5xx from bad input ----------------------------------------------------------------------
@pytest.mark.fuzz
def test_schemathesis_finds_no_server_error_on_any_route(tmp_path, export):
    """Every operation of /openapi.json, valid and invalid inputs (bounded), over real HTTP;
    schemathesis' ``not_a_server_error`` check must pass for every response."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    wb = _bench(tmp_path, export)
    try:
        schema = schemathesis.openapi.from_url(f"{wb.url}/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 14  # every route is fuzzed, none failed to load
        sent: list[str] = []
        failures: list[str] = []

        def fuzzer(op, mode):
            @settings(max_examples=15, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                response = case.call(base_url=wb.url, headers=AUTH, timeout=30)
                sent.append(op.label)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except (Exception, BaseExceptionGroup) as exc:  # FailureGroup: collected
                    failures.append(f"{op.label} {response.status_code}: "
                                    f"{case.as_curl_command()} -> {exc}"[:600])

            return fuzz

        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzzer(op, mode)()
                except Unsatisfiable:  # nothing invalid to send (e.g. no inputs at all)
                    assert mode == GenerationMode.NEGATIVE, op.label
        # and hostile shapes no generator reaches: 900 levels deep, 100k items wide
        deep: list = []
        for _ in range(899):
            deep = [deep]
        hostile = {"deep": deep, "deep object": {"a": deep},
                   "wide": list(range(100_000)), "wide object": {str(i): i for i in range(50_000)}}
        shaped = 0
        for op in operations:
            if op.definition.raw.get("requestBody") is None:
                continue
            for name, body in hostile.items():
                case = op.Case(body=body, media_type="application/json")
                response = case.call(base_url=wb.url, headers=AUTH, timeout=30)
                shaped += 1
                if response.status_code >= 500 or len(response.content) > 2048 or (
                        name.startswith("deep") and response.status_code != 400):
                    failures.append(f"{op.label} {name}: {response.status_code} "
                                    f"{response.text[:200]}")
        print(f"\nschemathesis: {len(sent)} requests over {len(operations)} operations, "
              f"{shaped} deep/wide bodies, {len(failures)} server errors")
        assert len(sent) >= 10 * len(operations)
        assert shaped >= 7 * len(hostile)  # every route that takes a body
        assert failures == [], "\n".join(failures[:10])
    finally:
        wb.stop()


@pytest.mark.parametrize("body", [
    '{"id": 9223372036854775808}',  # 2^63: SQLite would overflow
    '{"id": -1}',
    '{"id": NaN}',
    '{"id": 1, "start_fresh": Infinity}',
])
def test_train_server_refuses_out_of_range_and_non_finite_input_with_422(tmp_path, export,
                                                                        body):
    wb = _bench(tmp_path, export)
    try:
        r = httpx.post(f"{wb.url}/train/server", content=body,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"]
    finally:
        wb.stop()


def test_lone_surrogates_nan_and_huge_ids_get_4xx_everywhere(tmp_path, export):
    wb = _bench(tmp_path, export)
    try:
        raw = {"content-type": "application/json", **AUTH}
        cases = [
            ("POST", "/train/advertised", '{"data_type": "\\ud800", "tflite": true}'),
            ("POST", "/api/v1/sessions", '{"model": "hard", "strategy_options": {"\\udfff": 1}}'),
            ("POST", "/api/v1/sessions", '{"model": "hard", "round_timeout": Infinity}'),
            ("POST", "/api/v1/sessions", '{"model": "hard", "fraction_fit": NaN}'),
            ("POST", "/api/v1/models", '{"path": "\\ud800"}'),
            ("POST", "/telemetry/fit_ins",
             '{"device_id": 1, "session_id": 99999999999999999999, "start": 0, "end": 1}'),
            ("GET", "/api/v1/sessions/9223372036854775808", None),
            ("GET", "/api/v1/models/-5", None),
            ("GET", "/train/manifest/18446744073709551616", None),
            ("GET", "/api/v1/telemetry?session_id=9223372036854775808", None),
        ]
        for method, path, body in cases:
            r = httpx.request(method, f"{wb.url}{path}", content=body, headers=raw)
            assert r.status_code == 422, (path, body, r.status_code, r.text)
            r.json()  # a readable reason, not an unrenderable one
    finally:
        wb.stop()


def test_a_registered_file_missing_on_disk_gives_404(tmp_path, export):
    wb = _bench(tmp_path, export)
    try:
        m = wb.registry.list_models()[0]
        art = wb.registry.artifacts_of(m["id"])["android"]
        os.remove(os.path.join(m["directory"], art["file"]))
        r = httpx.get(f"{wb.url}/static/{m['name']}--{art['file']}")
        assert r.status_code == 404 and "missing" in r.json()["detail"]
    finally:
        wb.stop()


# -- limits ---------------------------------------------------------------------------------------
def _raw_request(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send ``head`` and as many ``body_parts`` as the server takes; the response bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed: it stopped reading
                break
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_50_mb_body_is_refused_with_413_before_it_is_read(tmp_path, export):
    wb = _bench(tmp_path, export)
    try:
        size = 50 * 1024 * 1024
        head = (f"POST /train/server HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {size}\r\n\r\n").encode()
        # only 64 KiB of the declared 50 MB is ever sent: a 413 proves nothing waited for it
        resp = _raw_request(wb.port, head, [b" " * 65536])
        assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
        # a streamed (chunked) body is counted as it arrives
        chunk = b" " * (512 * 1024)
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        head = (b"POST /train/server HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        resp = _raw_request(wb.port, head, [framed] * 16)
        assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
        # ordinary requests are untouched
        r = httpx.post(f"{wb.url}/train/advertised", json={"data_type": "hard-data"})
        assert r.status_code == 200
    finally:
        wb.stop()


def test_max_body_bytes_is_configurable(tmp_path, export):
    wb = _bench(tmp_path, export, max_body_bytes=2048)
    try:
        r = httpx.post(f"{wb.url}/train/advertised",
                       json={"data_type": "hard-data", "pad": "x" * 4096})
        assert r.status_code == 413 and "2048" in r.json()["detail"]
        r = httpx.post(f"{wb.url}/train/advertised", json={"data_type": "hard-data"})
        assert r.status_code == 200
    finally:
        wb.stop()
    with pytest.raises(ValueError, match="max_body_bytes"):
        xflwb.Workbench(max_body_bytes=-1)


def test_message_limit_is_derived_from_the_model_with_headroom(export):
    from xflwb.server.config import FLOOR_MESSAGE_BYTES, SessionConfig, message_limit

    m = export.manifest
    assert message_limit(m) == FLOOR_MESSAGE_BYTES  # a tiny model: the floor
    big = {"parameters": [{"shape": [1000, 1000]}, {"shape": [1000]}]}
    assert message_limit(big) == 2 * 4 * 1_001_000 + 2**20
    assert message_limit(big, configured=10**6) == 10**6
    with pytest.raises(ValueError, match="max_message_bytes"):
        SessionConfig(max_message_bytes=2**40)


def test_an_oversized_fitres_is_refused_by_grpc_for_that_client_only(tmp_path, export):
    wb = _bench(tmp_path, export)
    try:
        s = wb.train("hard", rounds=1, min_clients=2, round_timeout=60)
        huge = WirePhone(wb.url, "android", "hard-data",
                         lambda ts, _r: [np.zeros(6 * 2**20 // 4, np.float32)] * len(ts),
                         device_id=66, timeout=60)
        honest_a = WirePhone(wb.url, "android", "hard-data", lambda ts, _r: ts, device_id=67)
        honest_b = WirePhone(wb.url, "ios", "hard-data", lambda ts, _r: ts, device_id=68)
        t_huge = huge.start()
        wait_until(lambda: s.progress.get("connected", 0) >= 1, 60,
                   "the oversized phone to connect", describe=lambda: huge.report.error)
        t_a = honest_a.start()  # round 1 starts with the oversized phone and this one
        t_huge.join(90)
        t_b = honest_b.start()  # evaluation needs two clients again
        assert s.wait(timeout=120) == "finished", s.explain()
        for t in (t_a, t_b):
            t.join(30)
    finally:
        wb.stop()
    assert huge.report.error is not None and "RESOURCE_EXHAUSTED" in huge.report.error
    assert honest_a.report.error is None and honest_a.report.rounds_fit == 1
    assert honest_b.report.error is None
