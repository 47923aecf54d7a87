"""The phones' client managers: the platform of the gRPC port a phone joined on, the tensor
encoding it reads and the compression codecs it declares, asked before it is offered to a
round.

Phone-specific (a GetParameters probe over the legacy gRPC stream), so it lives with the
server, not in the round adapter (``xflwb.sessions.flower_strategy``) simulations share.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from xflwb.bridge import params
from xflwb.federation import codecs
from xflwb.flower_legacy import ClientManager, ClientProxy, GetParametersIns

__all__ = ["PlatformClientManager", "wire_codec"]

log = logging.getLogger("xflwb.strategy")


def wire_codec(res: Any) -> str:
    """The tensor encoding a client reads, from its GetParametersRes: the bytes say it when
    there are tensors (``.npy`` magic or raw float32), else the ``tensor_type`` ("ND" is
    FedKit's raw; Flower's SDKs write "numpy.ndarray" / "ndarray"), else the status (only
    Flower's SDKs answer GET_PARAMETERS_NOT_IMPLEMENTED, and they read ``.npy``); raw (FedKit)
    when nothing says."""
    parameters = getattr(res, "parameters", None)
    tensors = list(getattr(parameters, "tensors", None) or [])
    if tensors:
        return params.detect_codec(bytes(tensors[0]))
    kind = str(getattr(parameters, "tensor_type", "") or "").lower()
    if "ndarray" in kind or "numpy" in kind:
        return "npy"
    code = getattr(getattr(getattr(res, "status", None), "code", None), "name", "")
    return "npy" if code == "GET_PARAMETERS_NOT_IMPLEMENTED" else "raw"


class PlatformClientManager(ClientManager):
    """One per gRPC port: tags each client with the platform of the port it joined on, and
    registers it with the session's shared manager (DESIGN §4.3: never guess from sizes).

    With ``probe_timeout`` (sessions set it) a joining client is first asked for its
    parameters (GetParameters, which FedKit and every Flower SDK answer) and offered to the
    strategy only once the reply said which tensor encoding it reads: a stock Flower client
    cannot read raw float32, a FedKit phone cannot read ``.npy``, and the server must not
    guess before the first FitIns. The same answer's ``tensor_type`` may declare compression
    codecs (``codecs.announce``), stored as ``client.codecs``: FedKit phones and stock Flower
    clients declare none and get float32 as before. A client that leaves or stays silent is
    never offered."""

    def __init__(self, shared: ClientManager, platform: str,
                 probe_timeout: float | None = None) -> None:
        self.shared = shared
        self.platform = platform
        self.probe_timeout = probe_timeout
        self._lock = threading.Lock()
        self._probing: set[str] = set()
        self._gone: set[str] = set()  # left while being probed

    def register(self, client: ClientProxy) -> bool:
        client.platform = self.platform  # type: ignore[attr-defined]
        if self.probe_timeout is None:
            return self.shared.register(client)
        with self._lock:
            self._probing.add(client.cid)
        threading.Thread(target=self._admit, args=(client,), daemon=True,
                         name=f"probe-{client.cid[:8]}").start()
        return True

    def _admit(self, client: ClientProxy) -> None:
        codec = None
        try:
            res = client.get_parameters(GetParametersIns(config={}),
                                        timeout=self.probe_timeout, group_id=None)
            codec = client.codec = wire_codec(res)  # type: ignore[attr-defined]
            client.codecs = codecs.capabilities(  # type: ignore[attr-defined]
                getattr(getattr(res, "parameters", None), "tensor_type", ""))
        except Exception as exc:  # it left, timed out or broke: it never trains
            log.info("%s client %s did not answer GetParameters at join (%s: %s)",
                     self.platform, client.cid, type(exc).__name__, exc)
        with self._lock:
            self._probing.discard(client.cid)
            gone = client.cid in self._gone
            self._gone.discard(client.cid)
            if codec is not None and not gone:
                log.info("%s client %s joined; it reads %s tensors%s", self.platform,
                         client.cid, codec,
                         f", declares codecs {sorted(client.codecs)}"  # type: ignore[attr-defined]
                         if getattr(client, "codecs", None) else "")
                self.shared.register(client)

    def unregister(self, client: ClientProxy) -> None:
        with self._lock:
            if client.cid in self._probing:
                self._gone.add(client.cid)  # still being probed: never register it
                return
        self.shared.unregister(client)

    def num_available(self) -> int:
        return self.shared.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return self.shared.all()

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.shared.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Any = None) -> list[ClientProxy]:
        return self.shared.sample(num_clients, min_num_clients, criterion)
