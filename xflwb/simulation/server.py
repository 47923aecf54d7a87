"""A simulation process: Flower's Simulation Engine (Ray) driving the phones' strategy.

Run as ``python -m xflwb.simulation.server DATA_DIR DB_URL SESSION_ID`` by
``xflwb.simulation.start_on``, for the same reasons a phone session gets its own
process (a crash or ``stop()`` never takes the kernel down). The ServerApp runs Flower's
legacy ``Server`` over the simulation ``Grid`` with the very ``CrossPlatformStrategy`` (and
so ``StreamingFedAvg``) that serves phones; it runs in the same ``SessionProcess`` skeleton
and records rounds through the same callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge.params import PLATFORMS
from xflwb.flower_legacy import SimpleClientManager
from xflwb.sessions.options import is_asynchronous
from xflwb.sessions.process import SessionProcess
from xflwb.simulation.config import SimulationConfig

log = logging.getLogger("xflwb.simulation")


@dataclass(frozen=True)
class Node:
    """A simulated node as its ClientApp described itself: its platform and partition."""

    platform: str
    partition: int


class NodeClientManager(SimpleClientManager):
    """Tags each simulated node with its platform, as ``PlatformClientManager`` does for
    phones by port (a Grid proxy carries neither port nor platform), and names it by its
    partition id: Flower's node ids are random per run, a partition id is the same client
    in every run of a seed (sampling, aggregation order and ``client_metrics`` follow it).
    Messages still go to the node id (``GridClientProxy.node_id``)."""

    def __init__(self, nodes: dict[int, Node], seed: int = 0) -> None:
        super().__init__()
        self.nodes = nodes
        self.seed = int(seed)

    def register(self, client: Any) -> bool:
        node = self.nodes.get(int(client.node_id))
        client.platform = node.platform if node is not None else "unknown"
        if node is not None:
            client.partition = node.partition
            client.cid = str(node.partition)
        return super().register(client)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Any = None, *, server_round: int = 0, phase: int = 0) -> list[Any]:
        """``num_clients`` of the registered clients, drawn with
        ``np.random.default_rng([seed, server_round, phase])`` over their cids sorted
        numerically (partition ids): the same clients for the same seed in every run
        (Flower's ``random.sample`` over a dict of random node ids is not)."""
        import numpy as np

        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        cids = sorted(self.clients, key=lambda c: (0, int(c)) if c.isdigit() else (1, c))
        if criterion is not None:
            cids = [c for c in cids if criterion.select(self.clients[c])]
        if num_clients > len(cids):
            return []
        rng = np.random.default_rng([self.seed, int(server_round), int(phase)])
        picked = np.sort(rng.choice(len(cids), size=num_clients, replace=False))
        return [self.clients[cids[i]] for i in picked]


def ask_platforms(api: Any, grid: Any, expected: int, timeout: float = 600.0
                  ) -> dict[int, Node]:
    """Wait for every node, then ask them all at once for their platform and partition (one
    batch of ``get_properties`` messages; the ClientApp answers from its partition id,
    without loading a model): node id → ``Node``."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {expected} simulated nodes came up")
        time.sleep(0.05)
    content = api.compat.getpropertiesins_to_recorddict(api.GetPropertiesIns(config={}))
    msgs = [api.Message(content=content, dst_node_id=nid, message_type=api.GET_PROPERTIES)
            for nid in nodes]
    found: dict[int, Node] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"a simulated client failed to start: {reply.error.reason}")
        props = api.compat.recorddict_to_getpropertiesres(reply.content).properties
        found[int(reply.metadata.src_node_id)] = Node(str(props["platform"]),
                                                      int(props["partition_id"]))
    if len(found) != len(nodes):
        raise RuntimeError(f"{len(nodes) - len(found)} simulated clients did not answer")
    return found


def compression_arguments(cfg: SimulationConfig) -> dict[str, Any]:
    """The strategy's keywords beyond the session's options (``compression`` is one of
    those: ``RoundOptions.strategy_arguments``): every simulated client is xflwb's own
    ``SimClient``, which decodes and encodes every codec, so each is taken as capable of
    all of them without being probed (phones are probed: they may be FedKit or stock Flower
    clients). Nothing when the session compresses nothing."""
    return {"capable_by_default": True} if getattr(cfg, "compression", None) else {}


def _init_ray(cfg: SimulationConfig) -> dict[str, Any]:
    """Start (or attach to) Ray ourselves, before Flower would, so the artifact bundle can
    be put in the object store; returns the backend config for Flower."""
    import ray

    backend = dict(cfg.backend_config or {})
    init_args = dict(backend.pop("init_args", None) or backend.pop("init-args", None) or {})
    backend.setdefault("client_resources", {"num_cpus": 1, "num_gpus": 0.0})
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    runtime_env = dict(init_args.get("runtime_env") or {"env_vars": env})
    # each worker imports only Flower's actor: no TensorFlow, no Simulation Engine server side
    runtime_env.setdefault("worker_process_setup_hook", "xflwb.flower_legacy.prepare_ray_worker")
    init_args["runtime_env"] = runtime_env
    init_args.setdefault("logging_level", logging.WARNING)
    init_args.setdefault("log_to_driver", True)
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    else:
        init_args.setdefault("num_cpus", os.cpu_count() or 1)
        init_args.setdefault("include_dashboard", False)
    if not ray.is_initialized():
        _connect(ray, init_args)
    return backend


# Ray Client (``ray://``) starts a server process per client on the head node; that start
# fails now and then and succeeds when asked again (seen on a loaded 2-core machine: an
# empty server log, or the proxier reading the command line of a server that had already
# exited, "psutil.ZombieProcess"). A run of hours should not be lost to it at connect time.
_CLIENT_SERVER_RETRIES = 4
_CLIENT_SERVER_FLAKES = ("Starting Ray client server failed", "Initialization failure from server")


def _connect(ray: Any, init_args: dict[str, Any]) -> None:
    """``ray.init``, asking a Ray Client cluster again when its per-client server fails."""
    for attempt in range(1, _CLIENT_SERVER_RETRIES + 1):
        try:
            ray.init(**init_args)
            return
        except ConnectionAbortedError as exc:
            if (not any(flake in str(exc) for flake in _CLIENT_SERVER_FLAKES)
                    or attempt == _CLIENT_SERVER_RETRIES):
                raise
            log.warning("Ray Client server on %s failed to start (attempt %d of %d); "
                        "asking again", init_args.get("address"), attempt,
                        _CLIENT_SERVER_RETRIES)
            with contextlib.suppress(Exception):
                ray.shutdown()
            time.sleep(2.0 * attempt)


def _shutdown_ray() -> None:
    """A Ray we started goes down with us; one we attached to is only disconnected."""
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()


def run(data_dir: str, db_url: str, session_id: int) -> None:
    """Entry point of a simulation process."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here, nor wanted
    proc = SessionProcess("simulation", data_dir, db_url, session_id)
    proc.on_stop(_shutdown_ray)
    proc.on_exit(_shutdown_ray)
    with proc:
        import ray

        from xflwb.devices.partition import dataset_indices
        from xflwb.federation.dp import PrivacyBudgetSpent
        from xflwb.federation.fleet import NoClientAvailable
        from xflwb.federation.report import AllClientsFailed
        from xflwb.flower_legacy import Server, secagg_api, simulation_api
        from xflwb.simulation import client as sim_client
        from xflwb.simulation import fedbuff, secagg, sync

        registry, xlog = proc.registry, proc.log
        api = simulation_api()
        cfg, model = proc.load(SimulationConfig)
        m = model["manifest"]
        cfg.check_platforms(m)
        initial = manifest_mod.initial_parameters(m)
        backend = _init_ray(cfg)
        proc.handle_sigterm()  # ray.init installed its own (sys.exit)
        wanted = [p for p in PLATFORMS if getattr(cfg, p)]
        blob, sha = sim_client.make_bundle(m, wanted)
        # partitioned here, once: the workers take their rows from the object store
        indices = dataset_indices(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed)
        spec = sim_client.ClientSpec(
            bundle=ray.put(blob), bundle_sha=sha, android=cfg.android, ios=cfg.ios,
            dataset=cfg.dataset, partition=cfg.partition, seed=cfg.seed,
            test_fraction=cfg.test_fraction, drop_prob=float(cfg.drop_prob),
            secagg=cfg.secagg, indices=None if indices is None else ray.put(indices))
        # fail here, once, on data that cannot be split this way (not in every worker)
        sim_client.client_data(spec, 0)
        if cfg.secagg is not None:  # every weight and the start within SecAgg+'s range
            largest = max(len(sim_client.client_data(spec, pid)[0])
                          for pid in range(cfg.num_clients))
            secagg.check_range(secagg.canonical_payload(initial, [True] * len(initial)),
                               largest, cfg.secagg)
        sim_client._partitions.cache_clear()  # the workers need the data, this process not

        strategy = proc.strategy(model, initial, cfg, secure_sums=cfg.secagg is not None,
                                 **compression_arguments(cfg))
        # seeded sampling, or the virtual clock's round rules (profiles, deadline,
        # over_select): the fleet is built and a hopeless deadline refused before training
        if not is_asynchronous(cfg):  # FedBuff's host runs its own clock
            strategy.scheduler = sync.scheduler_for(cfg, strategy.core, spec, data_dir)
            sim_client._partitions.cache_clear()
        proc.save_start(model, 0, initial, strict=True)
        # set when every client of a round failed: Flower logs the ServerApp's exception
        # and ends the run; the reason (the clients', not a traceback) is kept here
        all_failed: list[Exception] = []
        budget_spent: list[PrivacyBudgetSpent] = []  # privacy max_epsilon ended the run
        versions_done: list[bool] = []  # FedBuff reached its stop rule

        server_app = api.ServerApp()

        @server_app.main()  # type: ignore[untyped-decorator]  # Flower's is unannotated
        def _main(grid: Any, context: Any) -> None:
            nodes = ask_platforms(api, grid, cfg.num_clients)
            counts = {p: sum(v.platform == p for v in nodes.values()) for p in PLATFORMS}
            xlog.info("simulation %s: %s nodes up (%s)", session_id, len(nodes), counts)
            cm = NodeClientManager(nodes, seed=cfg.seed)
            try:
                if is_asynchronous(cfg):  # FedBuff, on the virtual clock
                    fedbuff.serve(proc, grid, cm, strategy, cfg, m, spec)
                    versions_done.append(True)
                    return
                if cfg.secagg is not None:  # Flower's SecAgg+ fit rounds over our strategy
                    secagg.run_rounds(grid, context, strategy, cm, cfg.rounds,
                                      cfg.round_timeout, cfg.secagg)
                    return
                server = Server(client_manager=cm, strategy=strategy)
                server.set_max_workers(cfg.max_workers)
                api.start_grid(grid=grid, server=server,
                               config=api.ServerConfig(num_rounds=cfg.rounds,
                                                       round_timeout=cfg.round_timeout))
            except (AllClientsFailed, secagg.SecAggHalted, NoClientAvailable) as exc:
                # ends the run without Flower's error traceback (NoClientAvailable: the
                # virtual clock's fleet has nobody left, e.g. past the end of its trace)
                all_failed.append(exc)
            except PrivacyBudgetSpent as exc:  # max_epsilon reached: a normal end
                budget_spent.append(exc)

        mods = [secagg_api().secaggplus_mod] if cfg.secagg is not None else None
        client_app = api.ClientApp(client_fn=functools.partial(sim_client.client_fn, spec),
                                   mods=mods)
        proc.running()
        api.run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.num_clients, backend_config=backend)
        if all_failed:
            proc.fail(str(all_failed[0]))
            return
        if budget_spent:
            xlog.info("simulation %s: %s", session_id, budget_spent[0])
            registry.add_metrics(session_id, budget_spent[0].round, budget_spent[0].metrics)
            proc.finish()
            return
        if is_asynchronous(cfg):  # ends at max_versions or max_seconds (simulated)
            if not versions_done:
                raise RuntimeError("the FedBuff simulation ended before its stop rule; see "
                                   "the log above")
            proc.finish()
            return
        info = registry.get_session(session_id)
        if info["round"] < cfg.rounds:
            raise RuntimeError(f"the simulation ended after {info['round']} of {cfg.rounds} "
                               f"rounds; see the log above")
        proc.finish()


if __name__ == "__main__":  # python -m xflwb.simulation.server DATA_DIR DB_URL SESSION_ID
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
