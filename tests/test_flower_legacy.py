"""Contract test for the one module that touches Flower's deprecated legacy pieces.

If a Flower upgrade moves or changes any of these, this file fails first and names it.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

import grpc
import numpy as np

from xflwb.server import flower_legacy as fl
from xflwb.server.strategy import PlatformClientManager


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(stream) -> None:
    """Read server messages until the test closes the channel (CANCELLED is expected)."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED


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
    shared = fl.SimpleClientManager()
    ports = {"android": _port(), "ios": _port()}
    servers = [fl.start_grpc_server(client_manager=PlatformClientManager(shared, p),
                                    server_address=f"127.0.0.1:{port}")
               for p, port in ports.items()]
    outbox: queue.Queue = queue.Queue()
    channels = []
    try:
        for port in ports.values():
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(ch)
            stub = fl.transport_pb2_grpc.FlowerServiceStub(ch)

            def requests(q=outbox):
                while (msg := q.get()) is not None:
                    yield msg

            stream = stub.Join(requests())
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()
        deadline = time.monotonic() + 10
        while shared.num_available() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        clients = shared.all().values()
        assert sorted(c.platform for c in clients) == ["android", "ios"]
        assert all(isinstance(c, fl.ClientProxy) for c in clients)
        # a legacy Server runs its loop off the main thread (session processes rely on it)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "server", fl.Server(client_manager=shared, strategy=fl.FedAvg())))
        t.start()
        t.join(5)
        assert isinstance(box["server"], fl.Server)
    finally:
        for _ in channels:
            outbox.put(None)
        for ch in channels:
            ch.close()
        for s in servers:
            s.stop(grace=0)
