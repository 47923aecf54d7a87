"""Clients no one here wrote, TLS and device tokens, end to end on loopback.

Stock Flower Python clients (``flwr.client.start_client`` over grpc-bidi) join sessions next
to FedKit-style raw clients (tests/wirephone.py); HTTPS and gRPC over TLS use the dev CA of
``xflwb.server.security``; device tokens are checked on HTTP and gRPC.
"""

from __future__ import annotations

import queue
import ssl
import threading
import warnings

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import digits_cnn
from tests.wirephone import WirePhone
from xflwb.bridge import manifest as manifest_mod
from xflwb.flower_legacy import transport_pb2_grpc as pbg
from xflwb.magics import status_html
from xflwb.server.security import (
    TLSConfig,
    TokenStore,
    check_device_auth,
    fingerprint,
    make_dev_ca,
    tls_config,
    token_from_headers,
)

pytestmark = pytest.mark.timeout(300)

DATA = "digits"  # virtual devices train on scikit-learn's digits


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One small digits CNN for both platforms: what every test here serves."""
    return xflwb.export(digits_cnn(0), name="sec", data_type=DATA,
                        out_dir=tmp_path_factory.mktemp("sec-export"))


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory):
    return make_dev_ca(tmp_path_factory.mktemp("dev-ca"))


class AddConstant:
    """A phone's update: what it was sent plus a constant (any layout maps it alike)."""

    def __init__(self, c: float) -> None:
        self.c = c

    def __call__(self, tensors, _round):
        return [np.asarray(t, np.float32) + np.float32(self.c) for t in tensors]


def stock_flower_client(address: str, c: float, n: int, errors: list[str],
                        root_certificates: bytes | None = None,
                        get_parameters: bool = False) -> threading.Thread:
    """A stock Flower ``NumPyClient`` over Flower's grpc-bidi transport, in a thread; any
    exception lands in ``errors`` (no assertion inside the thread). ``get_parameters``:
    implement it (Flower answers GetParameters with ``.npy`` tensors) or not (Flower
    answers GET_PARAMETERS_NOT_IMPLEMENTED and no tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.client import NumPyClient, start_client

    class Client(NumPyClient):
        def fit(self, parameters, config):
            return [p + np.float32(c) for p in parameters], n, {}

        def evaluate(self, parameters, config):
            return 0.25, n, {"accuracy": 0.5}

    class WithParameters(Client):
        def get_parameters(self, config):
            return [np.zeros(3, np.float32)]

    client = WithParameters() if get_parameters else Client()

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start_client(server_address=address, client=client.to_client(),
                             transport="grpc-bidi", max_retries=3, max_wait_time=60,
                             **({"root_certificates": root_certificates}
                                if root_certificates else {"insecure": True}))
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=run, daemon=True, name=f"flower-client-{c}")
    t.start()
    return t


def _all_metric(session, metric: str) -> list[float]:
    h = session.history
    return list(h[(h.platform == "all") & (h.metric == metric)].value)


def test_stock_flower_clients_mixed_with_raw_clients_finish(tmp_path, export):
    """Item 10: stock Flower clients on both ports and FedKit-style raw phones, one
    session; every round aggregates all four updates (the global moves by exactly their
    example-weighted mean)."""
    rounds = 2
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        s = wb.train("sec", rounds=rounds, min_clients=4, round_timeout=120)
        errors: list[str] = []
        threads = [stock_flower_client(f"127.0.0.1:{s.ports[p]}", c, n, errors,
                                       get_parameters=gp)
                   for p, c, n, gp in (("android", 0.5, 10, False), ("ios", -0.25, 30, True))]
        phones = [WirePhone(wb.url, "android", DATA, AddConstant(1.0), num_examples=20,
                            device_id=1),
                  WirePhone(wb.url, "ios", DATA, AddConstant(-1.0), num_examples=40,
                            device_id=2, encoding="npy")]
        threads += [p.start() for p in phones]
        status = s.wait(timeout=180)
        for t in threads:
            t.join(60)
        assert status == "finished", s.error
        assert errors == []
        assert [p.report.error for p in phones] == [None, None]
        assert s.rejections.empty, s.rejections.to_dict("records")
        assert _all_metric(s, "clients") == [4.0] * rounds
        mean = (0.5 * 10 - 0.25 * 30 + 1.0 * 20 - 1.0 * 40) / (10 + 30 + 20 + 40)
        initial = manifest_mod.initial_parameters(export.manifest)
        for got, start in zip(s.global_parameters(), initial, strict=True):
            np.testing.assert_allclose(got, start + rounds * mean, atol=1e-5)


def _join(port: int, metadata: list[tuple[str, str]] | None = None,
          credentials: grpc.ChannelCredentials | None = None) -> tuple[str, str]:
    """Open a raw FlowerService.Join stream and read the server's first message:
    ("ok", its kind) or ("error", the gRPC status code name)."""
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, credentials) if credentials
               else grpc.insecure_channel(target))
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    try:
        stream = pbg.FlowerServiceStub(channel).Join(requests(), metadata=metadata,
                                                     timeout=30)
        first = next(iter(stream))
        return "ok", first.WhichOneof("msg")
    except grpc.RpcError as exc:
        return "error", exc.code().name
    finally:
        outbox.put(None)
        channel.close()


def test_https_and_grpc_over_tls_with_the_dev_ca(tmp_path, export, dev_ca):
    """Item 9: with ``tls=make_dev_ca(dir)`` the backend serves HTTPS and its sessions gRPC
    over TLS; stock Flower clients trusting the dev CA train on both ports, a client that
    does not trust it cannot even fetch the model list."""
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, tls=dev_ca) as wb:
        assert wb.url.startswith("https://127.0.0.1:")
        assert wb.tls_fingerprint == fingerprint(dev_ca.ca_file)
        body = {"data_type": DATA, "tflite": True, "coreml": False}
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.post(f"{wb.url}/train/advertised", json=body)
        wb.publish(export)
        r = httpx.post(f"{wb.url}/train/advertised", json=body, verify=str(dev_ca.ca_file))
        assert r.status_code == 200, r.text
        s = wb.train("sec", rounds=1, min_clients=2, round_timeout=120)
        # a plaintext client cannot speak to the TLS port
        assert _join(s.ports["android"])[0] == "error"
        errors: list[str] = []
        roots = dev_ca.ca_file.read_bytes()
        threads = [stock_flower_client(f"127.0.0.1:{s.ports[p]}", 0.5, 10, errors,
                                       root_certificates=roots)
                   for p in ("android", "ios")]
        status = s.wait(timeout=180)
        for t in threads:
            t.join(60)
        assert status == "finished", s.error
        assert errors == []
        assert _all_metric(s, "clients") == [2.0]


def test_device_tokens_on_http_and_grpc(tmp_path, export):
    """Item 9: with ``device_auth="token"`` a phone without an issued token gets 401 on
    every phone route and UNAUTHENTICATED on gRPC; with one (either header) it gets in; a
    revoked token is refused again. The admin API issues and lists tokens."""
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, admin_token="admin",
                         device_auth="token") as wb:
        wb.publish(export)
        body = {"data_type": DATA, "tflite": True, "coreml": False}
        url = f"{wb.url}/train/advertised"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"X-Device-Token": "guess"}).status_code \
            == 401
        assert httpx.post(f"{wb.url}/telemetry/fit_ins", json={}).status_code == 401
        token = wb.issue_device_token("pixel-7")
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, ok.text
        assert httpx.post(url, json=body, headers={"X-Device-Token": token}).status_code == 200
        # the admin API issues tokens too (admin bearer token), and never lists them
        admin = {"Authorization": "Bearer admin"}
        r = httpx.post(f"{wb.url}/api/v1/devices/tokens", json={"device": "iphone"},
                       headers=admin)
        assert r.status_code == 201, r.text
        second = r.json()["token"]
        assert httpx.post(url, json=body, headers={"X-Device-Token": second}).status_code \
            == 200
        listed = httpx.get(f"{wb.url}/api/v1/devices/tokens", headers=admin).json()
        assert [t["device"] for t in listed] == ["pixel-7", "iphone"]
        assert all("token" not in t for t in listed)
        assert httpx.post(f"{wb.url}/api/v1/devices/tokens", json={"device": "x"}) \
            .status_code == 401  # no admin token

        s = wb.train("sec", rounds=1, min_clients=1, round_timeout=60)
        port = s.ports["ios"]
        assert _join(port) == ("error", "UNAUTHENTICATED")
        assert _join(port, [("x-device-token", "guess")]) == ("error", "UNAUTHENTICATED")
        # admitted: the server's first word is the GetParameters that learns its encoding
        assert _join(port, [("authorization", f"Bearer {token}")]) == \
            ("ok", "get_parameters_ins")
        assert wb.revoke_device_token("pixel-7") == 1
        assert httpx.post(url, json=body, headers={"X-Device-Token": token}).status_code == 401
        assert _join(port, [("x-device-token", token)]) == ("error", "UNAUTHENTICATED")
        s.stop()


def test_virtual_devices_train_against_tls_and_tokens(tmp_path, export, dev_ca):
    """Item 9: the fleet works against a secured workbench: HTTPS + gRPC over TLS (it
    trusts the dev CA) and device tokens (the workbench enrolls its own devices)."""
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0, tls=dev_ca,
                         device_auth="token") as wb:
        wb.publish(export)
        s = wb.train("sec", rounds=1, min_clients=2, round_timeout=120)
        fleet = wb.spawn_devices(android=1, ios=1, dataset="digits", seed=0)
        status = s.wait(timeout=240)
        table = fleet.wait(timeout=60)
        assert status == "finished", (s.error, table.to_dict("records"))
        assert list(table.rounds_done) == [1, 1], table.to_dict("records")
        assert _all_metric(s, "clients") == [2.0]
        assert sorted(wb.device_tokens.device) == [f"virtual-{i}" for i in fleet.ids]


def test_status_warns_about_an_open_non_loopback_bind(tmp_path, dev_ca):
    """Item 9: ``%xfl_server status`` (status_html) warns when a non-loopback bind runs
    without TLS or device auth, and says nothing when both are on or the bind is local."""
    open_wb = xflwb.Workbench(data_dir=tmp_path / "a", host="0.0.0.0", port=0)
    assert [w.split(" without ")[1].split(":")[0] for w in open_wb.security_warnings] == \
        ["TLS", "device authentication"]
    with open_wb:
        html = status_html(open_wb, [])
        assert html.count("warning:") == 2 and "TLS off" in html
    assert xflwb.Workbench(data_dir=tmp_path / "b", host="127.0.0.1").security_warnings == []
    secured = xflwb.Workbench(data_dir=tmp_path / "c", host="0.0.0.0", port=0, tls=dev_ca,
                              device_auth="token")
    assert secured.security_warnings == []
    with secured:
        html = status_html(secured, [])
        assert "warning:" not in html and dev_ca.fingerprint in html


def test_make_dev_ca_reuses_its_files_and_checks_them(tmp_path):
    """The dev CA is kept across calls (phones keep trusting it); the server certificate
    is re-issued by it only when it does not cover the hosts; a certificate and a key that
    do not belong together are refused, naming the files."""
    first = make_dev_ca(tmp_path / "ca")
    ca_print, cert_print = first.fingerprint, fingerprint(first.cert)
    again = make_dev_ca(tmp_path / "ca")
    assert (again.fingerprint, fingerprint(again.cert)) == (ca_print, cert_print)
    wider = make_dev_ca(tmp_path / "ca", hosts=("127.0.0.1", "phone-lab.local"))
    assert wider.fingerprint == ca_print
    assert fingerprint(wider.cert) != cert_print
    # the new certificate chains to the same CA and names the new host
    ctx = ssl.create_default_context(cafile=str(wider.ca_file))
    ctx.load_cert_chain(wider.cert, wider.key)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(wider.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["phone-lab.local"]
    other = make_dev_ca(tmp_path / "other")
    with pytest.raises(ValueError, match="do not load together"):
        tls_config((wider.cert, other.key))
    with pytest.raises(ValueError, match="does not exist"):
        tls_config((tmp_path / "missing.pem", wider.key))
    assert isinstance(tls_config((wider.cert, wider.key, wider.ca_file)), TLSConfig)


_TEXT = st.text(max_size=40)
_MEMORY_STORE: list[TokenStore] = []


def _memory_store() -> TokenStore:
    if not _MEMORY_STORE:
        import tempfile

        from xflwb.sessions.registry import Registry

        _MEMORY_STORE.append(TokenStore(Registry(tempfile.mkdtemp(prefix="xfl-tokens-"))))
    return _MEMORY_STORE[0]


@settings(max_examples=40, deadline=None)
@given(mode=st.one_of(st.none(), _TEXT, st.integers(), st.booleans()),
       headers=st.dictionaries(_TEXT, _TEXT, max_size=4), token=st.one_of(st.none(), _TEXT))
def test_untrusted_security_inputs_fail_cleanly(mode, headers, token):
    """Notebook options and phone headers cross a trust boundary: ``device_auth`` is None,
    "token" or a ValueError; any header set yields a token or None; an unknown token never
    verifies."""
    try:
        assert check_device_auth(mode) in (None, "token")
    except ValueError as exc:
        assert "device_auth" in str(exc)
    got = token_from_headers(headers)
    assert got is None or (isinstance(got, str) and got)
    assert _memory_store().verify(token) is None


def test_token_magic_and_cli(ip, tmp_path, capsys):
    """``%xfl_server start --dev-tls DIR --device-auth token`` then ``%xfl_server token NAME``
    issues a token the backend accepts; ``xflwb token issue|list|revoke`` works on the same
    registry (no backend needed)."""
    from xflwb.cli import main
    from xflwb.magics import MagicUsageError, XflMagicError

    wb = ip.run_line_magic("xfl_server", f"start --port 0 --data-dir {tmp_path / 'm'} "
                                         f"--dev-tls {tmp_path / 'ca'} --device-auth token")
    try:
        assert wb.url.startswith("https://") and wb.device_auth == "token"
        capsys.readouterr()
        token = ip.run_line_magic("xfl_server", "token tablet-1")
        assert token in capsys.readouterr().out
        ca = str(tmp_path / "ca" / "ca.pem")
        body = {"data_type": "none", "tflite": True, "coreml": False}
        r = httpx.post(f"{wb.url}/train/advertised", json=body, verify=ca,
                       headers={"X-Device-Token": token})
        assert r.status_code == 404  # let in: nothing published for that data type
        with pytest.raises(MagicUsageError, match="only 'token' takes a device name"):
            ip.run_line_magic("xfl_server", "status tablet-1")
        ip.run_line_magic("xfl_server", "token tablet-2 --ttl 60")
        assert "expires in 60 s" in capsys.readouterr().out
        expiring = wb.device_tokens.set_index("device").loc["tablet-2"]
        assert expiring.expires == pytest.approx(expiring.created + 60, abs=1e-3)
        with pytest.raises(XflMagicError, match="session 99 does not exist"):
            ip.run_line_magic("xfl_server", "token tablet-3 --session 99")
        ip.run_line_magic("xfl_server", "token tablet-1 --revoke")
        assert httpx.post(f"{wb.url}/train/advertised", json=body, verify=ca,
                          headers={"X-Device-Token": token}).status_code == 401
    finally:
        ip.run_line_magic("xfl_server", "stop")

    data = str(tmp_path / "cli")
    assert main(["token", "issue", "phone-a", "--data-dir", data]) == 0
    issued = capsys.readouterr().out
    token = issued.rsplit(" ", 1)[1].strip()
    from xflwb.sessions.registry import Registry

    store = TokenStore(Registry(data))
    assert store.verify(token)["device"] == "phone-a"
    assert main(["token", "list", "--data-dir", data]) == 0
    listed = capsys.readouterr().out
    assert "phone-a" in listed and "active" in listed and token not in listed
    assert main(["token", "revoke", "phone-a", "--data-dir", data]) == 0
    assert store.verify(token) is None
    assert main(["token", "revoke", "phone-a", "--data-dir", data]) == 1  # nothing left
