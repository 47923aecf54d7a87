"""The HTTP layer's bounds against hostile clients (issue 20 items 4, 5 and 7): deep and wide
JSON bodies get a short 4xx on every JSON route, slow and idle connections are closed, and
telemetry is bound to the token's device (rate limits keyed on the token or the address,
never on a body field). Real uvicorn on loopback, raw sockets where a client misbehaves."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xflwb
from tests.support import wait_until
from xflwb.server.http.json_depth import MAX_JSON_DEPTH, json_depth_exceeds

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": "Bearer secret"}
JSON = {"content-type": "application/json", **AUTH}
#: a refusal of a hostile body says why in a sentence, not an echo of the body
SHORT = 2048


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One open backend and the JSON routes its /openapi.json declares."""
    wb = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("limits") / "xfl", port=0,
                         admin_token="secret").start()
    try:
        spec = httpx.get(f"{wb.url}/openapi.json", timeout=30).json()
        routes = [(method.upper(), path)
                  for path, ops in spec["paths"].items() for method, op in ops.items()
                  if "application/json" in op.get("requestBody", {}).get("content", {})]
        assert not [p for _m, p in routes if "{" in p]  # no body route has path parameters
        yield wb, routes
    finally:
        wb.stop()


def _nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# -- deep and wide bodies -------------------------------------------------------------------
@pytest.mark.parametrize("depth", [900, 100_000])
def test_deep_json_gets_a_short_4xx_on_every_json_route(live, depth):
    wb, routes = live
    assert len(routes) >= 7  # the phone routes and the admin routes that take bodies
    with httpx.Client(base_url=wb.url, headers=JSON, timeout=30) as http:
        for method, path in routes:
            for kind in ("array", "object"):
                for body in (_nested(depth, kind), '{"x": ' + _nested(depth, kind) + "}"):
                    r = http.request(method, path, content=body)
                    assert r.status_code == 400, (method, path, kind, r.status_code, r.text)
                    assert len(r.content) < SHORT and "nested deeper" in r.json()["detail"]
        # a body just within the bound is parsed and judged by the route as ever (no 5xx)
        for method, path in routes:
            r = http.request(method, path, content=_nested(MAX_JSON_DEPTH, "object"))
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            assert len(r.content) < SHORT, (path, len(r.content))


def _wide_bodies() -> dict[str, str]:
    keys = ",".join(f'"{i:x}":0' for i in range(100_000))
    return {"array": "[" + ",".join(["0"] * 100_000) + "]",
            "object": "{" + keys + "}",
            "field": '{"data_type": [' + ",".join(["1"] * 100_000) + "]}",
            "strings": '{"id": 1, "x": [' + ",".join(['"\\ud800"'] * 50_000) + "]}"}


def test_wide_json_gets_a_short_answer_on_every_json_route(live):
    wb, routes = live
    bodies = _wide_bodies()
    assert all(len(b) < 1024 * 1024 for b in bodies.values())  # within the size limit
    with httpx.Client(base_url=wb.url, headers=JSON, timeout=30) as http:
        for method, path in routes:
            for kind, body in bodies.items():
                r = http.request(method, path, content=body)
                assert r.status_code < 500, (method, path, kind, r.status_code, r.text[:300])
                assert len(r.content) < SHORT, (method, path, kind, len(r.content))


def _depth(value: Any) -> int:
    """Nesting depth of arrays/objects in a parsed JSON value (iteratively)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


_TEXT = st.text(alphabet=st.sampled_from('ab[]{}"\\\n'), max_size=6)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=60)


@settings(max_examples=200, deadline=None)
@given(value=_JSON, limit=st.integers(0, 8), pad=st.sampled_from(["", " ", "\n\t "]))
def test_the_depth_scan_agrees_with_the_parser(value, limit, pad):
    """Brackets and escaped quotes inside strings never count; every real level does."""
    text = json.dumps(value, indent=pad or None).encode()
    assert json_depth_exceeds(text, limit) == (_depth(value) > limit)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(depth=st.integers(0, 3000), kind=st.sampled_from(["array", "object"]),
       route=st.integers(0, 6), prefix=st.sampled_from(["", '{"model": "m", "x": ']))
def test_fuzzed_depths_never_get_a_server_error(live, depth, kind, route, prefix):
    wb, routes = live
    method, path = routes[route % len(routes)]
    body = prefix + _nested(depth, kind) + ("}" if prefix else "")
    r = httpx.request(method, f"{wb.url}{path}", content=body, headers=JSON, timeout=30)
    assert r.status_code < 500, (path, depth, r.text[:300])
    if depth + bool(prefix) > MAX_JSON_DEPTH:
        assert r.status_code == 400 and len(r.content) < SHORT


# -- slow and idle connections ----------------------------------------------------------------
#: the timeouts of the slow-client bench (seconds); the waits below are deadlines, not timings
HEAD_S, BODY_S, IDLE_S = 2.0, 2.0, 1.0
DEADLINE = 30.0


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    wb = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("slow") / "xfl", port=0,
                         admin_token="secret", http_header_timeout=HEAD_S,
                         http_body_timeout=BODY_S, http_idle_timeout=IDLE_S).start()
    try:
        yield wb
    finally:
        wb.stop()


def _connect(wb: xflwb.Workbench) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", wb.port), timeout=DEADLINE)
    sock.settimeout(0.5)
    return sock


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (a read sees EOF or a reset); waits ≤ 0.5 s."""
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _drip_until_closed(sock: socket.socket, data: bytes,
                       what: str = "the server to close a dripping connection") -> int:
    """Send ``data`` a byte at a time, one every half second, until the server closes the
    connection (fails if it has not by the deadline); how many bytes went."""
    sent = 0

    def dripped_into_a_close() -> bool:
        nonlocal sent
        try:
            sock.sendall(data[sent % len(data):][:1])
            sent += 1
        except OSError:
            return True
        return _closed(sock)

    wait_until(dripped_into_a_close, DEADLINE, what, describe=lambda: f"{sent} bytes sent",
               max_pause=0)  # _closed waits 0.5 s
    return sent


def _wait_closed(sock: socket.socket, what: str = "the server to close the connection") -> None:
    wait_until(lambda: _closed(sock), DEADLINE, what, max_pause=0)  # _closed waits 0.5 s


def test_a_slowloris_head_is_cut_off(strict):
    with _connect(strict) as sock:
        sock.sendall(b"POST /train/advertised HTTP/1.1\r\nHost: x\r\n")
        _drip_until_closed(sock, b"X-Slow: " + b"a" * 200)


def test_a_connection_that_sends_nothing_is_closed(strict):
    with _connect(strict) as sock:
        _wait_closed(sock)


def test_an_idle_keep_alive_connection_is_closed_after_its_response(strict):
    with _connect(strict) as sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(DEADLINE)
        assert sock.recv(12) == b"HTTP/1.1 200"
        sock.settimeout(0.5)
        _wait_closed(sock)


def test_a_slow_body_is_cut_off(strict):
    with _connect(strict) as sock:
        sock.sendall(b"POST /train/advertised HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        sent = _drip_until_closed(sock, b" ")
    assert sent < 1000, f"the body was still read after {sent} bytes"


def test_requests_are_served_while_40_slow_clients_hang_and_those_are_closed(strict):
    slow = [_connect(strict) for _ in range(40)]
    try:
        for i, sock in enumerate(slow):  # half a head each, then nothing
            sock.sendall(b"POST /train/server HTTP/1.1\r\nHost: x\r\nX-N: %d" % i)
        # a prompt client is served meanwhile, also one whose head comes in pieces
        r = httpx.post(f"{strict.url}/train/advertised", json={"data_type": "none"},
                       timeout=DEADLINE)
        assert r.status_code == 404 and "no android model" in r.text
        with _connect(strict) as sock:
            for part in (b"GET /openapi.json HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                sock.sendall(part)
                time.sleep(0.2)
            sock.settimeout(DEADLINE)
            assert sock.recv(12) == b"HTTP/1.1 200"
        for i, sock in enumerate(slow):
            _wait_closed(sock, f"the server to close slow client {i}")
    finally:
        for sock in slow:
            sock.close()


@pytest.fixture(scope="module")
def bare_server():
    """uvicorn with its h11 protocol wrapped by ``timed_protocol``, serving a small echo app
    in a thread: the workbench uses what ``http="auto"`` picks (httptools where installed,
    as here, so the tests above cover it), and h11 is the fallback a clean install may use."""
    import threading

    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol as base

    from xflwb.server.http.timeouts import timed_protocol

    async def echo(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"got %d" % len(body)})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo, log_config=None, lifespan="off", timeout_keep_alive=IDLE_S,
                            http=timed_protocol(HEAD_S, BODY_S, base=base))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, DEADLINE, "uvicorn to start", max_pause=0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_h11_protocol_too_cuts_slow_heads_and_bodies_and_serves_the_rest(bare_server):
    port = bare_server
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as ok:
        ok.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert ok.recv(12) == b"HTTP/1.1 200"
    for head, drip in ((b"GET / HTTP/1.1\r\nHost: x\r\n", b"X-Slow: aaaa"),
                       (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n", b"z")):
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.settimeout(0.5)
            sock.sendall(head)
            _drip_until_closed(sock, drip, f"the server to close a dripping {head[:4]!r}")
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as idle:
        idle.settimeout(0.5)
        _wait_closed(idle)


# -- telemetry is the poster's, not the body's ------------------------------------------------
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    return xflwb.export(model, name="lim", data_type="lim-data",
                        out_dir=tmp_path_factory.mktemp("lim-exports"))


def _running(tmp_path, export, **kw) -> tuple[xflwb.Workbench, int]:
    """A backend with one phone session waiting for its clients (telemetry needs one)."""
    wb = xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, admin_token="secret", **kw)
    wb.start()
    wb.publish(export)
    return wb, wb.train("lim", rounds=1, min_clients=1, round_timeout=600).id


def _fit(session_id: int, device_id: int) -> dict[str, int]:
    return {"device_id": device_id, "session_id": session_id, "start": 1, "end": 2}


def _issue(http: httpx.Client, device: str) -> tuple[int, dict[str, str]]:
    r = http.post("/api/v1/devices/tokens", json={"device": device}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["id"], {"X-Device-Token": r.json()["token"]}


def test_a_token_speaks_for_one_device_and_is_rate_limited_as_one(tmp_path, export):
    wb, sid = _running(tmp_path, export, device_auth="token")
    try:
        with httpx.Client(base_url=wb.url, timeout=30) as http:
            first, t1 = _issue(http, "pixel")
            second, t2 = _issue(http, "iphone")
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 100), headers=t1
                             ).status_code == 200
            # the issue's probe: 300 posts with rotating device ids from one token
            rotated = [http.post("/telemetry/fit_ins", json=_fit(sid, 1000 + i), headers=t1)
                       for i in range(300)]
            codes = {r.status_code for r in rotated}
            assert codes == {403, 429}, codes
            refused = next(r for r in rotated if r.status_code == 403)
            assert "speaks for device 100" in refused.json()["detail"]
            limited = next(r for r in rotated if r.status_code == 429)
            assert f"device token {first}" in limited.json()["detail"]
            assert int(limited.headers["Retry-After"]) >= 1
            # another token cannot post as the first one's device, but as its own
            r = http.post("/telemetry/fit_ins", json=_fit(sid, 100), headers=t2)
            assert r.status_code == 403 and "another device token" in r.json()["detail"]
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 200), headers=t2
                             ).status_code == 200
            rows = {d["id"]: d["token_id"] for d in
                    http.get("/api/v1/devices", headers=AUTH).json()}
            assert rows == {100: first, 200: second}
            # a phone given a new token after its old one was revoked keeps its device id
            assert http.delete(f"/api/v1/devices/tokens/{first}", headers=AUTH
                               ).status_code == 200
            third, t3 = _issue(http, "pixel again")
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 100), headers=t3
                             ).status_code == 200
            # and so does a phone re-enrolled under its name (a fleet spawned again)
            fourth, t4 = _issue(http, "iphone")
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 200), headers=t4
                             ).status_code == 200
            rows = {d["id"]: d["token_id"] for d in
                    http.get("/api/v1/devices", headers=AUTH).json()}
            assert rows == {100: third, 200: fourth}
            # an expired token is as gone as a revoked one: the phone's next token claims
            # its device, which no other valid token could while it lived
            r = http.post("/api/v1/devices/tokens", json={"device": "brief", "ttl": 5},
                          headers=AUTH)
            brief = {"X-Device-Token": r.json()["token"]}
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 300), headers=brief
                             ).status_code == 200
            _, t5 = _issue(http, "brief's next")
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 300), headers=t5
                             ).status_code == 403
            wait_until(lambda: http.post("/telemetry/fit_ins", json=_fit(sid, 300),
                                         headers=brief).status_code == 401, 60,
                       "the 5-s token to expire (a 401)")
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 300), headers=t5
                             ).status_code == 200
    finally:
        wb.stop()


def test_one_address_creates_a_bounded_number_of_devices_without_tokens(tmp_path, export):
    from xflwb.server.http.state import (
        ADDRESS_TELEMETRY_BURST,
        ADDRESS_TELEMETRY_RATE,
        NEW_DEVICES_BURST,
    )

    posts = NEW_DEVICES_BURST + 50
    assert posts < ADDRESS_TELEMETRY_BURST  # what is refused here is new devices, not posts
    wb, sid = _running(tmp_path, export)
    try:
        with httpx.Client(base_url=wb.url, timeout=30) as http:
            rotated = [http.post("/telemetry/fit_ins", json=_fit(sid, 5000 + i))
                       for i in range(posts)]
            codes = [r.status_code for r in rotated]
            assert set(codes) == {200, 429}, set(codes)
            refused = next(r for r in rotated if r.status_code == 429)
            assert "new device ids" in refused.json()["detail"]
            assert "device tokens" in refused.json()["detail"]  # the fix is named
            devices = http.get("/api/v1/devices", headers=AUTH).json()
            assert len(devices) == codes.count(200) <= NEW_DEVICES_BURST + 1
            # a device already known still posts (an unmodified FedKit phone keeps working)
            assert http.post("/telemetry/fit_ins", json=_fit(sid, 5000)).status_code == 200
            # and the posts themselves are limited per address, whatever the device_id
            # eight posters at once, so a slow machine still outruns the refill rate; the
            # bound holds whatever the speed: accepted <= burst + rate x elapsed
            t0 = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                flood = list(pool.map(
                    lambda i: http.post("/telemetry/fit_ins", json=_fit(sid, 5000 + i % 3)),
                    range(2 * ADDRESS_TELEMETRY_BURST)))
            elapsed = time.monotonic() - t0
            accepted = sum(r.status_code == 200 for r in flood)
            assert accepted <= ADDRESS_TELEMETRY_BURST + ADDRESS_TELEMETRY_RATE * elapsed + 1
            refused = [r for r in flood if r.status_code == 429]
            assert refused, (accepted, elapsed)
            assert "address 127.0.0.1" in refused[-1].json()["detail"]
    finally:
        wb.stop()


def test_an_older_registry_gains_the_device_token_binding(tmp_path):
    import sqlalchemy as sa

    from xflwb.sessions.registry import Registry

    (tmp_path / "xfl").mkdir()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'xfl' / 'xflwb.db'}")
    with engine.begin() as c:  # the devices table as xflwb made it before tokens bound it
        c.execute(sa.text("CREATE TABLE devices (id INTEGER PRIMARY KEY, platform "
                          "VARCHAR(16), first_seen FLOAT NOT NULL, last_seen FLOAT NOT NULL, "
                          "last_session_id INTEGER)"))
        c.execute(sa.text("INSERT INTO devices VALUES (7, 'ios', 1.0, 2.0, NULL)"))
    engine.dispose()
    reg = Registry(tmp_path / "xfl")
    try:
        assert reg.list_devices() == [{"id": 7, "platform": "ios", "first_seen": 1.0,
                                       "last_seen": 2.0, "last_session_id": None,
                                       "token_id": None}]
        indexes = sa.inspect(reg.engine).get_indexes("devices")
        assert [(i["name"], i["unique"]) for i in indexes] == [("one_device_per_token", 1)]
    finally:
        reg.close()
