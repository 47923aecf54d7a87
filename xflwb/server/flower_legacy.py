"""The one place xflwb touches Flower's deprecated legacy pieces.

Phones (FedKit, Flower's mobile SDKs) speak the legacy bidirectional gRPC transport
(``FlowerService.Join``); flwr 1.41 still ships it under ``flwr.server.superlink.fleet.
grpc_bidi`` together with the legacy ``Server`` loop and strategy types. Everything else in
xflwb imports these names from here, so a Flower upgrade is a one-file change (the contract
test ``tests/test_flower_legacy.py`` pins what we rely on).
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from flwr.common import (
        Code,
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        Parameters,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.proto import transport_pb2, transport_pb2_grpc
    from flwr.server import Server
    from flwr.server.client_manager import ClientManager, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
    from flwr.server.strategy.aggregate import aggregate as flower_aggregate
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

#: Flower's server-side optimisers, by the name ``wb.train(strategy=...)`` takes.
SERVER_STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam,
                     "fedyogi": FedYogi, "fedadagrad": FedAdagrad}

__all__ = [
    "SERVER_STRATEGIES", "ClientManager", "ClientProxy", "Code", "EvaluateIns", "EvaluateRes",
    "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "FitIns", "FitRes", "Parameters",
    "Server", "SimpleClientManager", "Status", "Strategy", "flower_aggregate",
    "ndarrays_to_parameters", "parameters_to_ndarrays", "start_grpc_server", "transport_pb2",
    "transport_pb2_grpc",
]
