"""Device tokens that take effect on live phones (issue 20, items 2 and 3's sybil streams).

Real sessions on loopback with ``device_auth="token"``: scripted wire phones and bare
``Join`` streams. A revoked token's stream is cut and its updates in flight are refused
(FedBuff: a rejected arrival; rounds: a rejection); a token's ``ttl`` cuts it when it runs
out; a session-scoped token is refused by other sessions; one token is one client however
many streams it opens.
"""

from __future__ import annotations

import json
import queue
import threading

import grpc
import httpx
import keras
import numpy as np
import pytest
import sqlalchemy as sa
from flwr.proto import transport_pb2 as pb
from flwr.proto import transport_pb2_grpc as pbg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xflwb
from tests.support import wait_until
from tests.wirephone import WirePhone
from xflwb.bridge import manifest as manifest_mod
from xflwb.server.security import MAX_TTL, TokenStore
from xflwb.sessions.registry import Registry

pytestmark = pytest.mark.timeout(300)

DATA = "revoke-data"
NAME = "revoke"
ADMIN = {"Authorization": "Bearer admin"}
#: the example count a revoked phone claims, so its updates can be told apart
MARK = 777


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    """One secured backend (device tokens) with one tiny model, shared by the tests here;
    each test runs and ends its own sessions."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    export = xflwb.export(model, name=NAME, data_type=DATA,
                          out_dir=tmp_path_factory.mktemp("revoke-export"))
    with xflwb.Workbench(data_dir=tmp_path_factory.mktemp("revoke") / "xfl", port=0,
                         admin_token="admin", device_auth="token") as w:
        w.publish(export)
        w.export_manifest = export.manifest
        yield w


def _plus(c: float):
    return lambda ts, _rnd: [np.asarray(t, np.float32) + np.float32(c) for t in ts]


class Stream:
    """A bare ``FlowerService.Join`` stream presenting ``token``: it answers GetParameters
    (so the server admits it as a client) and holds the stream open; records the first
    server message and the status the stream ended with."""

    def __init__(self, port: int, token: str, barrier: threading.Barrier | None = None):
        self.port, self.token, self.barrier = port, token, barrier
        self.first: str | None = None
        self.code: str | None = None
        self.details = ""
        self.ended = threading.Event()
        self._outbox: queue.Queue = queue.Queue()
        self._call = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Stream:
        self.thread.start()
        return self

    def _run(self) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

        def requests():
            while (msg := self._outbox.get()) is not None:
                yield msg

        try:
            if self.barrier is not None:
                self.barrier.wait(30)
            self._call = pbg.FlowerServiceStub(channel).Join(
                requests(), metadata=[("x-device-token", self.token)], timeout=120)
            for msg in self._call:
                kind = msg.WhichOneof("msg")
                self.first = self.first or kind
                if kind == "get_parameters_ins":
                    self._outbox.put(pb.ClientMessage(
                        get_parameters_res=pb.ClientMessage.GetParametersRes(
                            parameters=pb.Parameters(tensors=[], tensor_type="ND"))))
            self.code = "OK"
        except grpc.RpcError as exc:
            self.code, self.details = exc.code().name, exc.details() or ""
        except Exception as exc:  # recorded, asserted on by the test
            self.code, self.details = "client-error", f"{type(exc).__name__}: {exc}"
        finally:
            self.ended.set()
            self._outbox.put(None)
            channel.close()

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._outbox.put(None)
        self.thread.join(10)


def _advertised_id(wb, token: str, platform: str = "android") -> int:
    body = {"data_type": DATA, "tflite": platform == "android", "coreml": platform == "ios"}
    r = httpx.post(f"{wb.url}/train/advertised", json=body,
                   headers={"X-Device-Token": token})
    assert r.status_code == 200, r.text
    return int(r.json()["id"])


def test_revoked_token_is_cut_under_fedbuff_and_its_update_in_flight_refused(wb):
    """FedBuff, K=1: the victim's third fit is held until its token is revoked; that
    update (claiming MARK examples) is never applied (a rejected arrival naming the
    revocation, or the stream ended first), its stream is cut, and the two other phones go
    on making versions."""
    revoked, holding = threading.Event(), threading.Event()
    release = threading.Event()

    def victim_fn(ts, rnd):
        if rnd == 2:
            holding.set()
            release.wait(60)
        if revoked.is_set():
            victim.num_examples = MARK
        # a step like the honest ones' (bounded influence judges norms against peers)
        return [np.asarray(t, np.float32) + np.float32(1.0) for t in ts]

    def honest_fn(c):
        def fn(ts, rnd):
            if rnd >= 2:  # versions remain to be made after the revocation
                release.wait(60)
            return [np.asarray(t, np.float32) + np.float32(c) for t in ts]
        return fn

    rounds = 10
    s = wb.train(NAME, rounds=rounds, min_clients=3, round_timeout=60, strategy="fedbuff",
                 strategy_options={"buffer_size": 1, "evaluate_every": 0},
                 # revocation alone: bounded influence's warm-up would hold (and may
                 # supersede) the victim's first update until three phones reported
                 max_weight_ratio=None, max_norm_ratio=None)
    try:
        tokens = {n: wb.issue_device_token(n) for n in ("victim", "honest-1", "honest-2")}
        victim = WirePhone(wb.url, "android", DATA, victim_fn, num_examples=10,
                           device_id=1, token=tokens["victim"],
                           send_telemetry=False)  # its stream's end is what we watch
        honest = [WirePhone(wb.url, "android", DATA, honest_fn(0.5), num_examples=20,
                            device_id=2, token=tokens["honest-1"]),
                  WirePhone(wb.url, "ios", DATA, honest_fn(-0.5), num_examples=30,
                            device_id=3, encoding="npy", token=tokens["honest-2"])]
        threads = [p.start() for p in (victim, *honest)]
        held = holding.wait(60)
        assert wb.revoke_device_token("victim") == 1
        revoked.set()
        release.set()
        status = s.wait(timeout=120)
        for t in threads:
            t.join(60)
        arrivals = s.arrivals
    finally:
        release.set()
        s.stop()
    assert held and status == "finished", s.error
    assert "CANCELLED" in (victim.report.error or ""), victim.report.error
    assert [p.report.error for p in honest] == [None, None]
    applied = arrivals[arrivals.status == "applied"]
    # the held update (and any later one) claimed MARK examples: never applied
    assert MARK not in set(applied.examples), arrivals.to_string()
    victim_cid = applied[applied.examples == 10].client.unique()
    assert len(victim_cid) == 1  # its two fits before the revocation counted
    mine = arrivals[arrivals.client == victim_cid[0]]
    refused = mine[mine.status == "rejected"]
    # refused with the reason, unless its stream was cut before the update came in
    assert len(refused) <= 1 and len(mine) - len(refused) == 2, mine.to_string()
    assert refused.reason.str.contains("device token .* revoked|arrived after the session",
                                       regex=True).all(), refused.reason.tolist()
    # the other phones went on: at most 6 versions existed before the release (a version
    # may overshoot max_versions when two updates come back in one poll: FedBuff's, not
    # revocation's)
    assert len(applied) >= rounds and set(applied.examples) <= {10, 20, 30}


def test_update_in_flight_in_a_round_is_refused_when_its_token_is_revoked(wb):
    """Synchronous round of two phones: A's FitRes is in, B's is held; A's token is revoked
    and A's stream cut before the round aggregates: A's update is a rejection naming the
    revocation and the model moves by B's update alone."""
    release = threading.Event()

    def held(ts, rnd):
        release.wait(60)
        return [np.asarray(t, np.float32) + np.float32(1.0) for t in ts]

    s = wb.train(NAME, rounds=1, min_clients=2, round_timeout=60, fraction_evaluate=0.0)
    try:
        a_token, b_token = wb.issue_device_token("phone-a"), wb.issue_device_token("phone-b")
        a = WirePhone(wb.url, "android", DATA, _plus(3.0), num_examples=10, device_id=11,
                      token=a_token, send_telemetry=False)
        b = WirePhone(wb.url, "ios", DATA, held, num_examples=10, device_id=12,
                      encoding="npy", token=b_token)
        threads = [a.start(), b.start()]
        sent = wait_until(lambda: a.report.rounds_fit == 1, 60, "phone A's first update",
                          describe=lambda: a.report.error)
        assert wb.revoke_device_token("phone-a") == 1
        cut = wait_until(lambda: not threads[0].is_alive(), 30,
                         "the revoked phone's stream to be cut", describe=lambda: a.report.error)
        release.set()
        status = s.wait(timeout=120)
        threads[1].join(60)
        rejections, clients = s.rejections, s.history.query(
            "platform == 'all' and metric == 'clients'").value.tolist()
        final = s.global_parameters()
    finally:
        release.set()
        s.stop()
    assert sent and cut and status == "finished", s.error
    assert "CANCELLED" in (a.report.error or ""), a.report.error
    assert b.report.error is None
    assert len(rejections) == 1 and rejections.platform.tolist() == ["android"]
    assert "device token" in rejections.reason[0] and "revoked" in rejections.reason[0]
    assert clients == [1.0]
    initial = manifest_mod.initial_parameters(wb.export_manifest)
    for got, start in zip(final, initial, strict=True):
        np.testing.assert_allclose(got, start + 1.0, atol=1e-5)


def test_a_token_whose_ttl_runs_out_is_cut_then_refused_everywhere(wb):
    s = wb.train(NAME, rounds=1, min_clients=2, round_timeout=60)
    try:
        token = wb.issue_device_token("short-lived", ttl=4)
        port = s.ports["android"]
        live = Stream(port, token).start()
        ended = live.ended.wait(60)
        late = Stream(port, token).start()
        late.ended.wait(30)
        r = httpx.post(f"{wb.url}/train/advertised", headers={"X-Device-Token": token},
                       json={"data_type": DATA, "tflite": True, "coreml": False})
        listed = wb.device_tokens.set_index("device").loc["short-lived"]
    finally:
        s.stop()
    assert ended and live.first == "get_parameters_ins"  # admitted, then cut
    assert live.code == "CANCELLED", (live.code, live.details)
    assert late.code == "UNAUTHENTICATED" and "expired" in late.details
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert listed.expires == pytest.approx(listed.created + 4, abs=1e-3)


def test_a_session_scoped_token_is_refused_by_other_sessions(wb):
    s1 = wb.train(NAME, rounds=1, min_clients=2, round_timeout=60)
    try:
        scoped = wb.issue_device_token("guest", session=s1)
        mine = Stream(s1.ports["ios"], scoped).start()
        admitted = wait_until(lambda: mine.first is not None or mine.ended.is_set(), 30,
                              "the scoped token's stream to be answered")
        mine.close()
    finally:
        s1.stop()
    s2 = wb.train(NAME, rounds=1, min_clients=2, round_timeout=60)
    try:
        other = Stream(s2.ports["ios"], scoped).start()
        other.ended.wait(30)
        art = _advertised_id(wb, scoped)  # the model download stays open to it
        refused = httpx.post(f"{wb.url}/train/server", json={"id": art},
                             headers={"X-Device-Token": scoped})
        fitting = wb.issue_device_token("guest-2", session=s2.id)
        allowed = httpx.post(f"{wb.url}/train/server", json={"id": art},
                             headers={"X-Device-Token": fitting})
        # telemetry too: a scoped token speaks only of its own session
        telemetry = httpx.post(f"{wb.url}/telemetry/fit_ins", headers={"X-Device-Token": scoped},
                               json={"device_id": 7, "session_id": s2.id, "start": 1,
                                     "end": 2})
        with pytest.raises(ValueError, match="does not exist"):
            wb.issue_device_token("nowhere", session=10**9)
        scopes = dict(zip(wb.device_tokens.device, wb.device_tokens.session, strict=True))
    finally:
        s2.stop()
    assert admitted and mine.first == "get_parameters_ins"
    assert other.code == "PERMISSION_DENIED", (other.code, other.details)
    assert f"valid only for session {s1.id}" in other.details
    assert refused.status_code == 403 and f"session {s1.id}" in refused.json()["detail"]
    assert allowed.status_code == 200 and allowed.json()["session_id"] == s2.id
    assert telemetry.status_code == 403, telemetry.text
    assert f"valid only for session {s1.id}" in telemetry.json()["detail"]
    assert scopes["guest"] == s1.id and scopes["guest-2"] == s2.id


def test_one_token_is_one_client_however_many_streams_it_opens(wb):
    """8 Joins with one token, raced from threads: the newest stream replaces the older
    ones (cut), and the session counts one client."""
    s = wb.train(NAME, rounds=1, min_clients=3, round_timeout=60)
    try:
        token = wb.issue_device_token("sybil")
        barrier = threading.Barrier(8)
        streams = [Stream(s.ports[p], token, barrier).start()
                   for p in ["android", "ios"] * 4]
        settled = wait_until(lambda: sum(x.ended.is_set() for x in streams) >= 7
                             and s.progress.get("connected") == 1, 60,
                             "7 of the 8 streams cut and one client connected",
                             describe=lambda: (s.progress, [x.code for x in streams]))
        connected = s.progress.get("connected")
        ended = [x for x in streams if x.ended.is_set()]
        for x in streams:
            x.close()
    finally:
        s.stop()
    assert settled and connected == 1, (connected, [x.code for x in streams])
    assert len(ended) == 7 and {x.code for x in ended} <= {"CANCELLED", "UNAVAILABLE"}


def test_old_token_tables_gain_expiry_and_scope(tmp_path):
    """A registry made before ttl and scope existed: its tokens keep working (never
    expire, every session) once the columns are added."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE device_tokens (id INTEGER PRIMARY KEY, device "
                          "VARCHAR(128) NOT NULL, sha256 VARCHAR(64) NOT NULL UNIQUE, "
                          "created FLOAT NOT NULL, revoked FLOAT)"))
        import hashlib

        c.execute(sa.text("INSERT INTO device_tokens (device, sha256, created) VALUES "
                          "('old-phone', :h, 1.0)"),
                  {"h": hashlib.sha256(b"old-token").hexdigest()})
    store = TokenStore(Registry(tmp_path, f"sqlite:///{tmp_path / 'old.db'}"))
    assert store.verify("old-token", session=5)["device"] == "old-phone"
    assert store.list()[0]["expires"] is None and store.list()[0]["session"] is None
    with pytest.raises(ValueError, match="ttl must be"):
        store.issue("p", ttl=0)
    with pytest.raises(ValueError, match="session must be"):
        store.issue("p", session=True)


def test_cli_issues_and_lists_expiry_and_scope(tmp_path, capsys):
    from xflwb.cli import main

    data = str(tmp_path / "cli")
    assert main(["token", "issue", "tab", "--ttl", "3600", "--data-dir", data]) == 0
    assert "expires" in capsys.readouterr().out
    assert main(["token", "issue", "tab", "--session", "42", "--data-dir", data]) == 2
    assert "no session with id 42" in capsys.readouterr().err
    assert main(["token", "list", "--data-dir", data]) == 0
    listed = capsys.readouterr().out
    assert "active until" in listed and "all sessions" in listed


def test_admin_client_issues_lists_and_revokes_tokens(wb):
    from xflwb.admin import AdminClient

    admin = AdminClient(wb.url, "admin")
    token = admin.issue_device_token("remote", ttl=600)
    row = admin.device_tokens.set_index("device").loc["remote"]
    assert row.expires == pytest.approx(row.created + 600, abs=1e-3)
    assert row.session is None or np.isnan(row.session)  # NaN beside scoped tokens
    assert _advertised_id(wb, token)
    admin.revoke_device_token(int(row.id))
    r = httpx.post(f"{wb.url}/train/advertised", headers={"X-Device-Token": token},
                   json={"data_type": DATA, "tflite": True, "coreml": False})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


_TTL = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                 st.integers(-10, 2 * int(MAX_TTL)), st.booleans(), st.text(max_size=5),
                 st.sampled_from([1e-9, 0.5, MAX_TTL, MAX_TTL + 1]))
_SESSION = st.one_of(st.none(), st.integers(-3, 2**64), st.booleans(), st.text(max_size=5),
                     st.floats(allow_nan=False), st.just("existing"))
_MISSING = object()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ttl=st.one_of(st.just(_MISSING), _TTL), session=st.one_of(st.just(_MISSING), _SESSION))
def test_any_ttl_and_session_in_the_issue_body_is_taken_or_refused_cleanly(wb, ttl,
                                                                           session):
    """POST /api/v1/devices/tokens: a valid ttl and an existing session give a token with
    that expiry and scope (201); an unknown session 404; anything else 422; never a 5xx."""
    existing = int(wb.registry.list_sessions()[0]["id"]) if wb.registry.list_sessions() \
        else None
    if session == "existing":
        session = existing if existing is not None else _MISSING
    body: dict = {"device": "fuzz"}
    body.update({k: v for k, v in (("ttl", ttl), ("session", session)) if v is not _MISSING})
    # json.dumps writes NaN / Infinity as JavaScript does: a client may send them
    r = httpx.post(f"{wb.url}/api/v1/devices/tokens", content=json.dumps(body),
                   headers={**ADMIN, "Content-Type": "application/json"})
    ttl, session = body.get("ttl"), body.get("session")
    ttl_ok = ttl is None or (isinstance(ttl, int | float) and not isinstance(ttl, bool)
                             and np.isfinite(ttl) and 0 < ttl <= MAX_TTL)
    session_ok = session is None or (isinstance(session, int) and not isinstance(
        session, bool) and 1 <= session < 2**63)
    if not (ttl_ok and session_ok):
        assert r.status_code == 422, (body, r.text)
    elif session is not None and session != existing:
        assert r.status_code == 404 and "no session" in r.json()["detail"], (body, r.text)
    else:
        assert r.status_code == 201, (body, r.text)
        got = r.json()
        assert got["session"] == session
        if ttl is None:
            assert got["expires"] is None
        else:
            assert got["expires"] == pytest.approx(got["created"] + ttl, rel=1e-9, abs=1e-3)
