"""A per-client protocol state machine on Flower's legacy bidirectional stream.

Flower's ``FlowerServiceServicer.Join`` is "pretty much unaware of the protocol": after
each ``ServerMessage`` it hands whatever ``ClientMessage`` comes next to the waiting
instruction. A phone that sends one FitRes twice therefore desyncs its stream for good: the
extra FitRes is read as the answer to the next EvaluateIns, that EvaluateRes as the next
round's FitRes ("expected 4 android tensors, got 0"), and so on. ``StrictFlowerServicer``
reads each client's stream on its own thread and checks every message against the one
instruction it may answer (FitIns → FitRes, EvaluateIns → EvaluateRes, ...): anything else
(a duplicate, an answer to nothing, the wrong kind) is dropped with a reason that says so,
reported to the session's rejections, and never reaches an instruction. A client that keeps
doing it (``MAX_VIOLATIONS``) is disconnected. Everything else is Flower's: the bridge, the
client proxy, registration and the instruction timeout.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from xflwb.flower_legacy import (
    ClientManager,
    FlowerServiceServicer,
    GrpcBridge,
    GrpcClientProxy,
    ResWrapper,
)
from xflwb.sessions.violations import Violation, drain_violations, violation_log

log = logging.getLogger("xflwb.protocol")

#: the one answer each instruction takes (``ServerMessage`` field → ``ClientMessage`` field)
ANSWERS = {"get_properties_ins": "get_properties_res",
           "get_parameters_ins": "get_parameters_res",
           "fit_ins": "fit_res", "evaluate_ins": "evaluate_res",
           "reconnect_ins": "disconnect_res"}
_NAMES = {"get_properties_res": "GetPropertiesRes", "get_parameters_res": "GetParametersRes",
          "fit_res": "FitRes", "evaluate_res": "EvaluateRes",
          "disconnect_res": "DisconnectRes", None: "empty ClientMessage"}
#: protocol violations after which a client is disconnected (a flood costs it its stream)
MAX_VIOLATIONS = 16
_END = object()

# where violations go: one log per shared client manager (one per session), drained by the
# round adapter (``xflwb.sessions.violations``)


class ClientProtocol:
    """What one client may send next: the answer to the outstanding instruction, or nothing.

    ``instruct`` is called before an instruction goes out, ``receive`` for every message
    the client sends (on the reader thread); only the first message of the awaited kind is
    accepted, once."""

    def __init__(self, platform: str, cid: str,
                 report: Callable[[Violation], None]) -> None:
        self.platform, self.cid = platform, cid
        self._report = report
        self._lock = threading.Lock()
        self._awaiting: str | None = None
        self._last: str | None = None  # the last instruction's answer (to name a duplicate)
        self.violations = 0

    def instruct(self, instruction: str | None) -> None:
        with self._lock:
            self._awaiting = ANSWERS.get(instruction or "")

    def receive(self, msg: Any) -> bool:
        """True if ``msg`` answers the outstanding instruction; else report why not."""
        kind = msg.WhichOneof("msg")
        with self._lock:
            awaiting = self._awaiting
            if awaiting is not None and kind == awaiting:
                self._awaiting, self._last = None, kind
                return True
            last = self._last
            self.violations += 1
        name = _NAMES.get(kind, str(kind))
        if awaiting is None and kind == last:
            why = (f"duplicated {name}: it arrived after this client had already answered "
                   "and the server had sent nothing new; ignored")
        elif awaiting is None:
            why = f"unsolicited {name}: the server had sent no instruction to answer; ignored"
        else:
            why = (f"out-of-order {name}: the server was waiting for its "
                   f"{_NAMES.get(awaiting, awaiting)}; ignored")
        log.warning("%s client %s broke the protocol: %s", self.platform, self.cid, why)
        with contextlib.suppress(Exception):
            self._report((self.platform, self.cid, why))
        return False


class StrictFlowerServicer(FlowerServiceServicer):
    """Flower's ``Join`` with a ``ClientProtocol`` between the stream and the bridge.

    ``streams`` (``device_auth="token"``): a ``DeviceStreams`` that learns which device
    token each stream joined with, so it can cut the stream when the token is revoked,
    expires or joins again."""

    def __init__(self, client_manager: ClientManager, streams: Any = None) -> None:
        super().__init__(client_manager)
        self.streams = streams
        self.platform = str(getattr(client_manager, "platform", "unknown"))
        # violations go to the session's shared manager (PlatformClientManager.shared)
        self._sink = violation_log(getattr(client_manager, "shared", client_manager))

    def Join(self, request_iterator: Iterator[Any],  # gRPC's method name
             context: grpc.ServicerContext) -> Iterator[Any]:
        token = None
        if self.streams is not None:
            from xflwb.server.security import TokenRefused

            try:
                token = self.streams.admit(dict(context.invocation_metadata() or ()))
            except TokenRefused as exc:
                context.abort(grpc.StatusCode.PERMISSION_DENIED if exc.scope
                              else grpc.StatusCode.UNAUTHENTICATED, str(exc))
        cid = uuid.uuid4().hex
        bridge = GrpcBridge()
        proxy = GrpcClientProxy(cid=cid, bridge=bridge)
        protocol = ClientProtocol(self.platform, cid, self._sink.append)
        proxy.protocol = protocol  # type: ignore[attr-defined]
        inbox: queue.Queue[Any] = queue.Queue()
        read_done = threading.Event()
        handed = threading.Condition()
        counts = {"accepted": 0, "delivered": 0}  # answers read off the wire / handed over

        def on_termination() -> None:
            """Flower closes the bridge the moment the RPC ends, which loses an answer a
            client sent just before leaving (a device's failed FitRes carrying its error):
            here the answers already read are handed over first (at most 2 s)."""
            self.client_manager.unregister(proxy)
            if token is not None:
                self.streams.release(cid)

            def close() -> None:
                read_done.wait(2.0)
                with handed:
                    handed.wait_for(lambda: counts["delivered"] >= counts["accepted"], 2.0)
                bridge.close()

            threading.Thread(target=close, name=f"close-{cid[:8]}", daemon=True).start()

        if not self.client_manager.register(proxy):
            return
        if not context.add_callback(on_termination):  # the RPC already ended
            on_termination()
            return
        if token is not None:  # after add_callback: a cut stream always unregisters
            self.streams.bind(token, cid, context.cancel)

        def read() -> None:
            """Every client message passes the state machine the moment it arrives."""
            try:
                for msg in request_iterator:
                    if protocol.receive(msg):
                        with handed:
                            counts["accepted"] += 1
                        inbox.put(msg)
                    elif protocol.violations >= MAX_VIOLATIONS:
                        log.warning("%s client %s: %s protocol violations, disconnected",
                                    self.platform, cid, protocol.violations)
                        context.cancel()
                        return
            except Exception as exc:  # the stream ended or broke: same outcome
                log.debug("%s client %s: stream ended: %s", self.platform, cid, exc)
            finally:
                read_done.set()
                inbox.put(_END)

        threading.Thread(target=read, name=f"join-{cid[:8]}", daemon=True).start()
        for ins in bridge.ins_wrapper_iterator():
            protocol.instruct(ins.server_message.WhichOneof("msg"))
            yield ins.server_message
            try:
                msg = inbox.get(timeout=ins.timeout)
            except queue.Empty:
                protocol.instruct(None)  # an answer that comes later answers nothing
                context.abort(code=grpc.StatusCode.DEADLINE_EXCEEDED,
                              details=f"Timeout of {ins.timeout}sec was exceeded.")
                return
            if msg is _END:
                return
            try:
                bridge.set_res_wrapper(ResWrapper(client_message=msg))
            finally:
                with handed:
                    counts["delivered"] += 1
                    handed.notify_all()


__all__ = ["ANSWERS", "MAX_VIOLATIONS", "ClientProtocol", "StrictFlowerServicer",
           "drain_violations", "violation_log"]
