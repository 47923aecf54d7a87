"""A phone session's process: a Flower server listening on one gRPC port per platform.

Run as ``python -m xflwb.server.session_process DATA_DIR DB_URL SESSION_ID`` by
``PhoneSessionManager.start_phone`` (``xflwb.server.phone_sessions``). A process per
session because ``start_server`` installs signal handlers (main thread only) and, more
importantly, so a crashing session can never take down the notebook kernel or its sibling
sessions. It writes its state, metrics and per-round checkpoints to the registry (through
the ``SessionProcess`` skeleton it shares with simulations) and needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from typing import Any

from xflwb.bridge import manifest as manifest_mod
from xflwb.server.config import FLOOR_MESSAGE_BYTES, SessionConfig, message_limit
from xflwb.sessions import lineage
from xflwb.sessions.checkpoints import newest_valid_checkpoint
from xflwb.sessions.options import is_asynchronous
from xflwb.sessions.process import SessionProcess
from xflwb.sessions.registry import Registry


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_grpc(cm: Any, platform: str, host: str, port: int | None,
                max_workers: int = 1000, max_message_bytes: int = FLOOR_MESSAGE_BYTES,
                probe_timeout: float | None = None,
                certificates: tuple[bytes, bytes, bytes] | None = None,
                interceptors: list[Any] | None = None,
                streams: Any = None) -> tuple[Any, int]:
    from xflwb.server.clients import PlatformClientManager
    from xflwb.server.grpc_server import start_grpc_server

    last: Exception | None = None
    for _ in range(1 if port else 8):
        p = port or _free_port(host)
        try:
            return start_grpc_server(client_manager=PlatformClientManager(
                                         cm, platform, probe_timeout=probe_timeout),
                                     server_address=f"{host}:{p}",
                                     max_concurrent_workers=max_workers,
                                     max_message_length=max_message_bytes,
                                     certificates=certificates,
                                     interceptors=interceptors, streams=streams), p
        except RuntimeError as exc:  # grpc: port taken between probe and bind
            last = exc
    raise RuntimeError(f"could not bind a gRPC port for {platform}: {last}")


def _grpc_security(cfg: SessionConfig, registry: Registry, session_id: int
                   ) -> tuple[tuple[bytes, bytes, bytes] | None, list[Any] | None, Any]:
    """Flower's ``certificates=`` from the workbench's TLS files, and when
    ``device_auth == "token"`` the device-token interceptor (tokens scoped to another
    session are refused) and the ``DeviceStreams`` that cuts streams of revoked or expired
    tokens and keeps one stream per token (its watcher is started here)."""
    from xflwb.server import security
    from xflwb.server.device_streams import DeviceStreams

    tls = security.tls_config(cfg.tls) if cfg.tls else None
    interceptors, streams = None, None
    if cfg.device_auth == "token":
        store = security.TokenStore(registry)
        interceptors = [security.grpc_interceptor(store, session=session_id)]
        streams = DeviceStreams(store, session_id).start()
    return (tls.certificates() if tls else None), interceptors, streams



def _stop_servers(servers: list[Any], grace: float) -> None:
    for srv in servers:
        srv.stop(grace=grace)


def run_session(data_dir: str, db_url: str, session_id: int) -> None:
    """Entry point of a phone session process."""
    proc = SessionProcess("session", data_dir, db_url, session_id)
    servers: list[Any] = []
    proc.on_stop(lambda: _stop_servers(servers, grace=0))
    proc.on_exit(lambda: _stop_servers(servers, grace=1))
    with proc:
        from xflwb.federation.dp import PrivacyBudgetSpent
        from xflwb.federation.report import AllClientsFailed
        from xflwb.flower_legacy import PooledServer, SimpleClientManager

        registry, xlog = proc.registry, proc.log
        cfg, model = proc.load(SessionConfig)
        m = model["manifest"]
        initial = manifest_mod.initial_parameters(m)
        resumed, offset, parent = None, 0, None
        if cfg.resume:
            candidates = registry.checkpoints_newest_first(model["name"], model["version"])
            if candidates:  # the newest valid one (CheckpointError when none is)
                ckpt, initial = newest_valid_checkpoint(
                    candidates, m, f"{model['name']} v{model['version']} to resume from "
                    "(start fresh with resume=False, or restore a checkpoint file)")
                resumed, offset = ckpt["id"], int(ckpt["round"])
                parent = int(ckpt["session_id"])
                xlog.info("resuming %s from checkpoint %s (round %s of session %s); this "
                          "session's rounds are numbered from %s", model["name"],
                          ckpt["path"], ckpt["round"], ckpt["session_id"], offset + 1)
            else:
                xlog.info("resume=True but %s v%s has no checkpoint: starting fresh",
                          model["name"], model["version"])
        else:
            xlog.info("starting %s fresh from the exported weights", model["name"])
        try:  # before any port opens: a refused lineage never reaches a phone
            privacy_plan = lineage.plan(
                lineage.walk(registry, parent), cfg.privacy, cfg.allow_privacy_gap,
                f"{model['name']} v{model['version']} resumed at round {offset}")
        except lineage.PrivacyLineageError as exc:
            proc.fail(str(exc))
            return
        registry.set_lineage(session_id, parent, offset)
        cm = SimpleClientManager()
        ports = {}
        limit = message_limit(m, cfg.max_message_bytes)
        xlog.info("gRPC messages are limited to %d bytes (max_message_bytes)", limit)
        certificates, interceptors, streams = _grpc_security(cfg, registry, session_id)
        if streams is not None:
            proc.on_exit(streams.stop)
        for platform in m["platforms"]:
            # each joining client is asked GetParameters first: its reply says which
            # tensor encoding it reads, before its first FitIns (PlatformClientManager)
            srv, port = _start_grpc(cm, platform, cfg.host, cfg.ports.get(platform),
                                    cfg.max_workers, limit,
                                    probe_timeout=min(cfg.round_timeout, 120.0),
                                    certificates=certificates, interceptors=interceptors,
                                    streams=streams)
            servers.append(srv)
            ports[platform] = port

        asynchronous = is_asynchronous(cfg)
        strategy = proc.strategy(model, initial, cfg, offset)
        try:
            lineage.start(registry, session_id, offset, privacy_plan, strategy.dp, xlog)
        except lineage.PrivacyLineageError as exc:
            proc.fail(str(exc))
            return
        if streams is not None:  # a cut stream's results are refused, with the reason
            strategy.refuse = streams.refused
        proc.save_start(model, offset, initial)  # the weights it starts from
        proc.running(ports=ports, resumed_from=resumed)
        if asynchronous:
            _run_fedbuff(proc, cm, strategy, cfg, offset)
            return
        # one pool for every round: a thread per phone is started once, not every round
        server = PooledServer(client_manager=cm, strategy=strategy)
        server.set_max_workers(cfg.max_workers)
        proc.on_exit(server.close)
        try:
            server.fit(num_rounds=cfg.rounds, timeout=cfg.round_timeout)
        except AllClientsFailed as exc:  # the reason is the clients', not a traceback
            proc.fail(str(exc))
            return
        except PrivacyBudgetSpent as exc:  # max_epsilon reached: a normal end
            xlog.info("session %s: %s", session_id, exc)
            registry.add_metrics(session_id, exc.round + offset, exc.metrics)
        with contextlib.suppress(Exception):
            server.disconnect_all_clients(timeout=5)
        proc.finish()


def _run_fedbuff(proc: SessionProcess, cm: Any, strategy: Any, cfg: SessionConfig,
                 offset: int) -> None:
    """FedBuff's asynchronous loop instead of Flower's rounds (``xflwb.server.fedbuff``);
    each arrival is recorded in ``session.arrivals``, each version like a round."""
    from xflwb.federation.fedbuff import fedbuff_options
    from xflwb.federation.report import AllClientsFailed
    from xflwb.server.fedbuff import AsyncLoop

    registry = proc.registry

    def on_arrival(arrival: Any) -> None:
        registry.add_arrivals(proc.session_id, [arrival.row()])

    loop = AsyncLoop(cm, strategy, fedbuff_options(cfg.strategy_options),
                     max_versions=cfg.rounds, first_version=offset,
                     round_timeout=cfg.round_timeout, max_workers=cfg.max_workers,
                     on_arrival=on_arrival)
    try:
        loop.run()
    except AllClientsFailed as exc:
        proc.fail(str(exc))
        return
    proc.finish()


if __name__ == "__main__":  # python -m xflwb.server.session_process DATA_DIR DB_URL SESSION_ID
    run_session(sys.argv[1], sys.argv[2], int(sys.argv[3]))
