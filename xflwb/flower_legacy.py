"""The one place xflwb touches Flower's deprecated legacy pieces.

It sits at the bottom of the package (it imports nothing of xflwb) because both sides of
the wire use it: the server (``xflwb.server``), the virtual phones (``xflwb.devices``) and
the simulation (``xflwb.simulation``), and the federation core (``xflwb.federation``), which
reaches Flower's strategy update rules and aggregate functions through it, never Flower's
transport. The server adds ``start_grpc_server`` (``xflwb.server.grpc_server``: it needs the
server's strict protocol).

Phones (FedKit, Flower's mobile SDKs) speak the legacy bidirectional gRPC transport
(``FlowerService.Join``); flwr 1.41 still ships it under ``flwr.server.superlink.fleet.
grpc_bidi`` together with the legacy ``Server`` loop and strategy types. Everything else in
xflwb imports these names from here, so a Flower upgrade is a one-file change (the contract
test ``tests/test_flower_legacy.py`` pins what we rely on).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from flwr.common import (
        Code,
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        GetParametersIns,
        Parameters,
        ReconnectIns,
        Scalar,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.proto import transport_pb2, transport_pb2_grpc
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
    from flwr.server import Server
    from flwr.server.client_manager import ClientManager, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import (
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedMedian,
        FedTrimmedAvg,
        FedYogi,
        Krum,
        Strategy,
    )
    from flwr.server.strategy.aggregate import aggregate as flower_aggregate
    from flwr.server.strategy.aggregate import (
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )
    from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import (
        FlowerServiceServicer,
        register_client_proxy,
    )
    from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import (
        GrpcBridge,
        GrpcBridgeClosed,
        InsWrapper,
        ResWrapper,
    )
    from flwr.server.superlink.fleet.grpc_bidi.grpc_client_proxy import GrpcClientProxy
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH, generic_create_grpc_server


_log = logging.getLogger("flwr")


class PooledServer(Server):
    """Flower's legacy ``Server`` whose rounds share one thread pool of ``max_workers``.

    Flower's ``fit_clients`` / ``evaluate_clients`` build a ``ThreadPoolExecutor`` per round
    and join it at the round's end, so a session that lets every phone train at once
    (``set_max_workers(1024)``) starts and joins a thread per sampled client every round.
    Each start waits for the new thread to take the GIL from the gRPC threads serving the
    fleet: at 200 phones that was the largest server-side cost of a round. Here the threads
    started in round 1 wait for the next round's fits instead. Same rules otherwise: every
    instruction runs concurrently (up to ``max_workers``), the round waits for all of them
    (timeouts are the transport's), an exception or a non-OK status is a failure. Call
    ``close`` when the session ends (idle threads are also joined at interpreter exit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def set_max_workers(self, max_workers: int | None) -> None:
        super().set_max_workers(max_workers)
        self.close()  # the next round starts a pool of the new size

    def close(self) -> None:
        """Let the pool's idle threads end (a round in flight finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _run(self, call: Callable[..., Any], instructions: list[tuple[Any, Any]],
             timeout: float | None, group_id: int) -> tuple[list[Any], list[Any]]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix="flower-round")
        futures = [self._pool.submit(call, client, ins, timeout=timeout, group_id=group_id)
                   for client, ins in instructions]
        concurrent.futures.wait(futures)  # timeouts are the transport's, as in Flower
        results: list[Any] = []
        failures: list[Any] = []
        for (client, _), future in zip(instructions, futures, strict=True):
            error = future.exception()
            if error is not None:
                failures.append(error)
                continue
            res = future.result()
            (results if res.status.code == Code.OK else failures).append((client, res))
        return results, failures

    def fit_round(self, server_round: int, timeout: float | None) -> Any:
        """Flower's ``Server.fit_round`` on the shared pool."""
        instructions = self.strategy.configure_fit(
            server_round=server_round, parameters=self.parameters,
            client_manager=self._client_manager)
        if not instructions:
            _log.info("configure_fit: no clients selected, cancel")
            return None
        _log.info("configure_fit: strategy sampled %s clients (out of %s)", len(instructions),
                  self._client_manager.num_available())
        results, failures = self._run(lambda c, ins, **kw: c.fit(ins, **kw), instructions,
                                      timeout, server_round)
        _log.info("aggregate_fit: received %s results and %s failures", len(results),
                  len(failures))
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        return parameters, metrics, (results, failures)

    def evaluate_round(self, server_round: int, timeout: float | None) -> Any:
        """Flower's ``Server.evaluate_round`` on the shared pool."""
        instructions = self.strategy.configure_evaluate(
            server_round=server_round, parameters=self.parameters,
            client_manager=self._client_manager)
        if not instructions:
            _log.info("configure_evaluate: no clients selected, skipping evaluation")
            return None
        _log.info("configure_evaluate: strategy sampled %s clients (out of %s)",
                  len(instructions), self._client_manager.num_available())
        results, failures = self._run(lambda c, ins, **kw: c.evaluate(ins, **kw),
                                      instructions, timeout, server_round)
        _log.info("aggregate_evaluate: received %s results and %s failures", len(results),
                  len(failures))
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        return loss, metrics, (results, failures)


@contextlib.contextmanager
def _tensorflow_absent() -> Iterator[None]:
    """Import inside it as if TensorFlow were not installed (unless it is loaded already).

    ``flwr.simulation`` imports TensorFlow at module level (``ray_transport.utils``) only
    for ``enable_tf_gpu_growth``, a GPU helper xflwb never calls. That import is most of a
    simulation driver's start-up (seconds of CPU), and the driver runs no TensorFlow
    (the Ray workers import it when a TFLite client first loads). ``None`` in
    ``sys.modules`` makes ``import tensorflow`` raise ``ModuleNotFoundError``, which Flower
    catches (``TF = None``); the entry is removed afterwards, so a later
    ``import tensorflow`` (a TFLite runtime, measured costs) loads it as usual."""
    if "tensorflow" in sys.modules:
        yield
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


def prepare_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for xflwb's simulations (``"xflwb.flower_legacy.
    prepare_ray_worker"``): import Flower's actor module alone.

    A Ray worker loads Flower's ``ClientAppActor`` by importing its module. Its package's
    ``__init__`` loads the Simulation Engine's server side (SuperLink state, SQLAlchemy,
    Alembic), and its GPU helper TensorFlow (see `_tensorflow_absent`): about 6 s of CPU in
    every actor, which runs only clients (`client_api`) and their TFLite interpreters.
    """
    from xflwb._imports import skipping_package_init

    with warnings.catch_warnings(), _tensorflow_absent():
        warnings.simplefilter("ignore")
        skipping_package_init("flwr.simulation.ray_transport.ray_actor",
                              package="flwr.simulation")


def client_api() -> SimpleNamespace:
    """Flower's client side, what a simulated client (in a Ray worker) needs: no Simulation
    Engine, no server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.app import ArrayRecord, ConfigRecord
        from flwr.client import Client, ClientApp
        from flwr.common import GetPropertiesRes

    return SimpleNamespace(ArrayRecord=ArrayRecord, Client=Client, ClientApp=ClientApp,
                           ConfigRecord=ConfigRecord, GetPropertiesRes=GetPropertiesRes)


def simulation_api() -> SimpleNamespace:
    """Flower's Simulation Engine pieces, imported on demand (they pull in Ray).

    ``run_simulation`` is the in-process entry point (deprecated in favour of ``flwr run``,
    which needs a SuperLink and a Flower app project: not something a notebook call can
    be); ``start_grid`` runs a legacy ``Server`` over a ``Grid``, which is how the
    same ``CrossPlatformStrategy`` that serves phones serves simulated clients.
    """
    with warnings.catch_warnings(), _tensorflow_absent():
        warnings.simplefilter("ignore")
        from flwr.common import (
            GetPropertiesIns,
            Message,
            MessageTypeLegacy,
            ndarrays_to_parameters,
        )
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server import ServerApp, ServerConfig
        from flwr.server.compat.app import start_grid
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.simulation import run_simulation

    return SimpleNamespace(
        **vars(client_api()), ServerApp=ServerApp, ServerConfig=ServerConfig,
        GetPropertiesIns=GetPropertiesIns, Message=Message,
        GET_PROPERTIES=MessageTypeLegacy.GET_PROPERTIES, compat=compat,
        ndarrays_to_parameters=ndarrays_to_parameters, start_grid=start_grid,
        GridClientProxy=GridClientProxy, run_simulation=run_simulation)


def secagg_api() -> SimpleNamespace:
    """Flower's SecAgg+ pieces (no Ray): the server workflow run inside
    ``DefaultWorkflow`` with a ``LegacyContext`` holding a legacy strategy, the client mod
    that masks a ``FitRes``, and the names of the workflow's state records."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.client.mod import secaggplus_mod
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

    return SimpleNamespace(
        SecAggPlusWorkflow=SecAggPlusWorkflow, DefaultWorkflow=DefaultWorkflow,
        LegacyContext=LegacyContext, secaggplus_mod=secaggplus_mod,
        MAIN_CONFIGS_RECORD=MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD=MAIN_PARAMS_RECORD,
        CURRENT_ROUND=WorkflowKey.CURRENT_ROUND)


#: Flower's strategies by the name ``wb.train(strategy=...)`` takes (the one list every
#: config validates against): server-side optimisers, which act on the masked average, and
#: robust rules (``ROBUST_RULES``), which replace it; ``strategy_options`` go to the Flower
#: class, so its own constructor checks them (FedTrimmedAvg's ``beta``, Krum's
#: ``num_malicious_clients`` / ``num_clients_to_keep``: > 0 is MultiKrum).
SERVER_STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam,
                     "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedmedian": FedMedian,
                     "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}
#: the robust rules among them, and Flower's aggregation function each one applies
ROBUST_RULES = {"fedmedian": aggregate_median, "fedtrimmedavg": aggregate_trimmed_avg,
                "krum": aggregate_krum}



def dp_api() -> Any:
    """Flower's DP helpers (``compute_stdv``, ``compute_adaptive_noise_params``): in
    ``flwr.supercore`` since 1.2x, ``flwr.common`` before. The noise arithmetic of
    ``xflwb.federation.dp``, imported on demand."""
    try:
        from flwr.supercore import differential_privacy
    except ImportError:  # pragma: no cover - older Flower
        from flwr.common import differential_privacy  # type: ignore[no-redef]
    return differential_privacy


def server_update(strategy: Strategy, server_round: int, average: list[Any],
                  num_examples: int) -> list[Any]:
    """``strategy``'s server-side update rule (FedAvgM, FedAdam, ...) applied to ``average``,
    handed to it as the round's single result of ``num_examples`` examples: the
    pseudo-gradient is the canonical masked mean's, exactly as Flower defines it. Here, so
    that the federation core builds no ``FitRes`` of its own."""
    fake = FitRes(status=Status(code=Code.OK, message=""),
                  parameters=ndarrays_to_parameters(average), num_examples=int(num_examples),
                  metrics={})
    out, _ = strategy.aggregate_fit(server_round, [(None, fake)], [])  # type: ignore[list-item]
    if out is None:  # Flower's strategies return None only for a round without results
        raise RuntimeError(f"{type(strategy).__name__}.aggregate_fit returned no parameters")
    return parameters_to_ndarrays(out)


__all__ = [
    "GRPC_MAX_MESSAGE_LENGTH",
    "ROBUST_RULES",
    "SERVER_STRATEGIES",
    "ClientManager",
    "ClientProxy",
    "Code",
    "EvaluateIns",
    "EvaluateRes",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedTrimmedAvg",
    "FedYogi",
    "FitIns",
    "FitRes",
    "FlowerServiceServicer",
    "GetParametersIns",
    "GrpcBridge",
    "GrpcBridgeClosed",
    "GrpcClientProxy",
    "InsWrapper",
    "Krum",
    "Parameters",
    "PooledServer",
    "ReconnectIns",
    "ResWrapper",
    "Scalar",
    "Server",
    "SimpleClientManager",
    "Status",
    "Strategy",
    "add_FlowerServiceServicer_to_server",
    "aggregate_krum",
    "aggregate_median",
    "aggregate_trimmed_avg",
    "dp_api",
    "flower_aggregate",
    "generic_create_grpc_server",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
    "register_client_proxy",
    "secagg_api",
    "server_update",
    "simulation_api",
    "transport_pb2",
    "transport_pb2_grpc",
]
