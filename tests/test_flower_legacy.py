"""Contract test for the one module that touches Flower's deprecated legacy pieces.

If a Flower upgrade moves or changes any of these, this file fails first and names it.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from tests.conftest import SERVED_TOY_MANIFEST, toy_canonical
from tests.support import wait_until
from tests.wirephone import WirePhone
from xflwb import flower_legacy as fl
from xflwb.bridge import params
from xflwb.server.clients import PlatformClientManager
from xflwb.server.grpc_server import start_grpc_server
from xflwb.sessions.flower_strategy import CrossPlatformStrategy


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(stream: Any, errors: list[str]) -> None:
    """Read server messages until the test closes the channel; anything but CANCELLED lands
    in ``errors`` (asserted on the main thread)."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            errors.append(f"{exc.code().name}: {exc.details()}")
    except Exception as exc:  # handed to the main thread
        errors.append(f"{type(exc).__name__}: {exc}")


def test_names_we_rely_on_exist():
    assert set(fl.SERVER_STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi",
                                         "fedadagrad", "fedmedian", "fedtrimmedavg", "krum"}
    assert set(fl.ROBUST_RULES) <= set(fl.SERVER_STRATEGIES)
    out = fl.aggregate_median([([np.array([1.0])], 1), ([np.array([5.0])], 1),
                               ([np.array([2.0])], 1)])
    np.testing.assert_allclose(out[0], [2.0])
    for name in ("Join",):
        assert hasattr(fl.transport_pb2_grpc.FlowerServiceStub(grpc.insecure_channel("x:1")),
                       name)
    params = fl.ndarrays_to_parameters([np.ones((2, 3), np.float32)])
    assert params.tensor_type == "numpy.ndarray"
    np.testing.assert_array_equal(fl.parameters_to_ndarrays(params)[0], np.ones((2, 3)))
    out = fl.flower_aggregate([([np.ones(2)], 1), ([np.zeros(2)], 3)])
    np.testing.assert_allclose(out[0], [0.25, 0.25])


def test_grpc_server_registers_clients_per_platform_port():
    """Each port tags its clients with its platform and registers them in the shared manager
    (no probe: ``probe_timeout=None`` registers on join)."""
    shared = fl.SimpleClientManager()
    ports = {"android": _port(), "ios": _port()}
    servers = [start_grpc_server(client_manager=PlatformClientManager(shared, p),
                                    server_address=f"127.0.0.1:{port}")
               for p, port in ports.items()]
    outbox: queue.Queue = queue.Queue()
    channels, drains, errors = [], [], []
    try:
        for port in ports.values():
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(ch)
            stub = fl.transport_pb2_grpc.FlowerServiceStub(ch)

            def requests(q=outbox):
                while (msg := q.get()) is not None:
                    yield msg

            stream = stub.Join(requests())
            t = threading.Thread(target=_drain, args=(stream, errors), daemon=True)
            t.start()
            drains.append(t)
        wait_until(lambda: shared.num_available() >= 2, 10, "both phones to join",
                   describe=lambda: errors)
        clients = shared.all().values()
        assert sorted(c.platform for c in clients) == ["android", "ios"]
        assert all(isinstance(c, fl.ClientProxy) for c in clients)
    finally:
        for _ in channels:
            outbox.put(None)
        for ch in channels:
            ch.close()
        for s in servers:
            s.stop(grace=0)
    for t in drains:
        t.join(10)
    assert not any(t.is_alive() for t in drains), "a client stream did not end"
    assert errors == [], errors  # only CANCELLED (the test closing its channel) is expected


def _guarded(box: dict[str, Any], key: str, fn: Callable[[], Any]) -> Callable[[], None]:
    """A thread body that records ``fn``'s result or exception in ``box`` (asserted on the
    main thread after join: an assertion inside a thread could never fail the test)."""

    def body() -> None:
        box[f"{key}_on_main_thread"] = threading.current_thread() is threading.main_thread()
        try:
            box[key] = fn()
        except BaseException as exc:  # handed to the main thread
            box[f"{key}_error"] = exc

    return body


def _serve_rounds(server_type: type, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of ``server_type.fit`` (Flower's legacy ``Server`` or ours) with our
    strategy, client managers and strict servicer, run in a non-main thread with two
    protocol-only phones (tests/wirephone.py) that add 1 to every tensor; checks what every
    such run must show and returns the pieces for the caller's own checks."""
    start = toy_canonical(0)
    shared = fl.SimpleClientManager()
    ports = {"android": _port(), "ios": _port()}
    servers = [start_grpc_server(
        client_manager=PlatformClientManager(shared, p, probe_timeout=10),
        server_address=f"127.0.0.1:{port}") for p, port in ports.items()]
    fits = []
    strategy = CrossPlatformStrategy(SERVED_TOY_MANIFEST, start, min_clients=2,
                                     on_fit_round=lambda report, _: fits.append(report))
    box: dict[str, Any] = {}
    server = server_type(client_manager=shared, strategy=strategy)
    server.set_max_workers(64)

    def serve() -> Any:
        history, _elapsed = server.fit(num_rounds=rounds, timeout=30)
        # the round threads still alive before the phones are let go (ours: the pool's)
        box["round_threads"] = sorted(t.name for t in threading.enumerate()
                                      if t.name.startswith("flower-round"))
        server.disconnect_all_clients(timeout=10)  # phones end on ReconnectIns
        return history

    phones = {p: WirePhone(f"http://127.0.0.1:{port}", p, "t",  # type: ignore[arg-type]
                           lambda ts, _rnd: [t + 1 for t in ts],
                           encoding="raw" if p == "android" else "npy", timeout=30,
                           send_telemetry=False, tensor_count_check=False)
              for p, port in ports.items()}
    # what train/advertised would have said (no HTTP backend here: only the gRPC loop)
    phones["android"].report.advertised = SERVED_TOY_MANIFEST["platforms"]["android"]
    loop = threading.Thread(target=_guarded(box, "history", serve), name="legacy-loop")
    threads = [loop] + [
        threading.Thread(target=_guarded(box, p, lambda ph=ph, port=ports[p]: ph._serve(port)),
                         name=f"phone-{p}", daemon=True) for p, ph in phones.items()]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for s in servers:
            s.stop(grace=0)
    assert not any(t.is_alive() for t in threads), [t.name for t in threads if t.is_alive()]
    errors = {k: v for k, v in box.items() if k.endswith("_error")}
    assert errors == {}, errors
    assert box["history_on_main_thread"] is False
    assert [r for r, _ in box["history"].losses_distributed] == list(range(1, rounds + 1))
    for p, phone in phones.items():
        assert (phone.report.rounds_fit, phone.report.rounds_evaluated) == (rounds, rounds), p
        assert phone.report.reconnected, p
        sizes = [a.size for a in phone.report.received[0]]
        assert sizes == [int(np.prod(s)) for s in params.platform_shapes(SERVED_TOY_MANIFEST,
                                                                            p)], p
    assert [r.rejections for r in fits] == [[]] * rounds
    # both add 1 to every tensor they train; the iOS-frozen dense bias comes from Android
    for got, was in zip(strategy.global_, start, strict=True):
        np.testing.assert_allclose(got, was + rounds, atol=1e-5)
    return {"server": server, "round_threads": box["round_threads"]}


def test_legacy_server_loop_runs_a_round_off_the_main_thread_over_the_wire():
    """Flower's legacy ``Server.fit`` runs a round (fit and evaluate) over the wire: each
    phone gets its platform's layout, and the new global model is the average both phones'
    updates imply."""
    _serve_rounds(fl.Server, rounds=1)


def test_pooled_server_runs_every_round_on_the_same_threads():
    """``PooledServer`` (phone sessions) gives the same rounds as Flower's ``Server``, but
    the fit and evaluate threads of three rounds with two phones are the same two threads,
    started once and idle between rounds (Flower starts and joins them every round), until
    ``close`` lets them go."""
    out = _serve_rounds(fl.PooledServer, rounds=3)
    assert len(out["round_threads"]) == 2, out["round_threads"]
    out["server"].close()
    wait_until(lambda: not any(t.name.startswith("flower-round")
                               for t in threading.enumerate()), timeout=10,
               what="the pool's threads end after close()")
