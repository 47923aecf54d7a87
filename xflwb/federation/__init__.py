"""What a federated round *means*, with no transport: updates, the gate every update passes,
the policies that turn updates into a new global model, and the loops that drive them.

Phone sessions (``xflwb.server``) and simulations (``xflwb.simulation``) *host* these pieces:
they bring clients (gRPC streams, Ray actors) and a clock; this package imports neither of
them, nor Flower's transport, so every rule here is unit-tested with fakes (no processes,
no sockets, no sleeps). See ``docs/architecture.md`` for the path of one update.
"""

from __future__ import annotations

from xflwb.federation.bounds import Bounds
from xflwb.federation.gate import UpdateGate
from xflwb.federation.report import AllClientsFailed, RoundReport, summarize
from xflwb.federation.rounds import ClientRefused, ClientSource, Round
from xflwb.federation.update import Update

__all__ = ["AllClientsFailed", "Bounds", "ClientRefused", "ClientSource", "Round",
           "RoundReport", "Update", "UpdateGate", "summarize"]
