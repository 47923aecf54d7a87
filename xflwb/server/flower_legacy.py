"""The one place xflwb touches Flower's deprecated legacy pieces.

Phones (FedKit, Flower's mobile SDKs) speak the legacy bidirectional gRPC transport
(``FlowerService.Join``); flwr 1.41 still ships it under ``flwr.server.superlink.fleet.
grpc_bidi`` together with the legacy ``Server`` loop and strategy types. Everything else in
xflwb imports these names from here, so a Flower upgrade is a one-file change (the contract
test ``tests/test_flower_legacy.py`` pins what we rely on).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

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



def simulation_api() -> SimpleNamespace:
    """Flower's Simulation Engine pieces, imported on demand (they pull in Ray).

    ``run_simulation`` is the in-process entry point (deprecated in favour of ``flwr run``,
    which needs a SuperLink and a Flower app project: not something a notebook call can
    be); ``start_grid`` runs a legacy ``Server`` over a ``Grid``, which is how the
    same ``CrossPlatformStrategy`` that serves phones serves simulated clients.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.app import ConfigRecord
        from flwr.client import Client, ClientApp
        from flwr.common import (
            GetPropertiesIns,
            GetPropertiesRes,
            Message,
            MessageTypeLegacy,
            ndarrays_to_parameters,
        )
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server import ServerApp, ServerConfig
        from flwr.server.compat.app import start_grid
        from flwr.simulation import run_simulation

    return SimpleNamespace(
        Client=Client, ClientApp=ClientApp, ConfigRecord=ConfigRecord, ServerApp=ServerApp,
        ServerConfig=ServerConfig,
        GetPropertiesIns=GetPropertiesIns, GetPropertiesRes=GetPropertiesRes, Message=Message,
        GET_PROPERTIES=MessageTypeLegacy.GET_PROPERTIES, compat=compat,
        ndarrays_to_parameters=ndarrays_to_parameters, start_grid=start_grid,
        run_simulation=run_simulation)


#: Flower's server-side optimisers, by the name ``wb.train(strategy=...)`` takes.
SERVER_STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam,
                     "fedyogi": FedYogi, "fedadagrad": FedAdagrad}

__all__ = [
    "SERVER_STRATEGIES", "ClientManager", "ClientProxy", "Code", "EvaluateIns", "EvaluateRes",
    "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "FitIns", "FitRes", "Parameters",
    "Server", "SimpleClientManager", "Status", "Strategy", "flower_aggregate",
    "ndarrays_to_parameters", "parameters_to_ndarrays", "simulation_api", "start_grpc_server",
    "transport_pb2", "transport_pb2_grpc",
]
