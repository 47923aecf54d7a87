"""The phones' gRPC server: Flower's legacy ``start_grpc_server`` with the strict protocol.

Flower's legacy pieces themselves live in ``xflwb.flower_legacy`` (the bottom of the
package), so the virtual phones and the federation core use them without importing the
server; this is the one piece that needs the server's strict protocol
(``xflwb.server.protocol``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xflwb.flower_legacy import (
    GRPC_MAX_MESSAGE_LENGTH,
    ClientManager,
    add_FlowerServiceServicer_to_server,
    generic_create_grpc_server,
)


def start_grpc_server(client_manager: ClientManager, server_address: str,
                      max_concurrent_workers: int = 1000,
                      max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
                      keepalive_time_ms: int = 210000,
                      certificates: tuple[bytes, bytes, bytes] | None = None,
                      interceptors: Sequence[Any] | None = None,
                      streams: Any = None) -> Any:
    """Flower's legacy ``start_grpc_server`` (same arguments), serving ``Join`` with
    ``StrictFlowerServicer``: Flower's servicer pairs whatever message comes next with the
    pending instruction, so one duplicated FitRes desyncs a phone's stream for good; ours
    checks each client message against the instruction it answers
    (``xflwb.server.protocol``). ``streams``: the session's ``DeviceStreams`` under
    ``device_auth="token"``."""
    from xflwb.server.protocol import StrictFlowerServicer

    server = generic_create_grpc_server(
        servicer_and_add_fn=(StrictFlowerServicer(client_manager, streams),
                             add_FlowerServiceServicer_to_server),
        server_address=server_address, max_concurrent_workers=max_concurrent_workers,
        max_message_length=max_message_length, keepalive_time_ms=keepalive_time_ms,
        certificates=certificates, interceptors=interceptors)
    server.start()
    return server


__all__ = ["start_grpc_server"]
