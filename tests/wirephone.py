"""A test phone that speaks the FedKit mobile protocol, written only from FEDKIT_PROTOCOL.md.

Why it exists: backend tests need proof that a phone built from the protocol document alone
(not from xflwb's own device code) can take part in a session. So this file uses nothing but
``httpx`` for the HTTP routes and the generated Flower protobuf stubs plus ``grpc`` for the
legacy ``FlowerService.Join`` stream: no ``flwr.client``/``flwr.common``/serde, no ``xflwb``.

Usage::

    phone = WirePhone(url, "android", "digits", lambda ts, rnd: [t + 1 for t in ts])
    report = phone.run()            # or phone.start(); ...; thread.join(); phone.report
    assert report.error is None
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import httpx
import numpy as np
from flwr.proto import transport_pb2 as pb
from flwr.proto import transport_pb2_grpc as pb_grpc

NPY_MAGIC = b"\x93NUMPY"

UpdateFn = Callable[[list[np.ndarray], int], list[np.ndarray]]


class PhoneError(RuntimeError):
    """The server broke the protocol (bad status, wrong tensor count, bad config...)."""


# --------------------------------------------------------------------------- tensor codecs
# Local on purpose: the point is independence from xflwb's own serialisation code.


def encode_raw(arr: np.ndarray) -> bytes:
    """FedKit / Flower Android form: row-major little-endian float32, no header."""
    return np.ascontiguousarray(arr, dtype="<f4").tobytes(order="C")


def encode_npy(arr: np.ndarray) -> bytes:
    """Flower iOS SDK form: a full ``.npy`` file (keeps the shape)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_tensor(b: bytes) -> np.ndarray:
    """``.npy`` if it has the magic, else raw little-endian float32 (flat, shape lost)."""
    if b.startswith(NPY_MAGIC):
        return np.load(io.BytesIO(b), allow_pickle=False)
    if len(b) % 4:
        raise PhoneError(f"raw tensor of {len(b)} bytes is not a whole number of float32s")
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


# --------------------------------------------------------------------------- report


@dataclass
class PhoneReport:
    """What the phone saw and did; ``error`` is None when the session ended cleanly."""

    rounds_fit: int = 0
    rounds_evaluated: int = 0
    received: list[list[np.ndarray]] = field(default_factory=list)  # decoded FitIns tensors
    sent: list[list[np.ndarray]] = field(default_factory=list)  # tensors sent in each FitRes
    local_epochs: list[int] = field(default_factory=list)
    advertised: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    error: str | None = None
    reconnected: bool = False  # True when the server ended the session with ReconnectIns


# --------------------------------------------------------------------------- phone

_CLOSE = object()  # sentinel put on the outgoing queue to end the request stream


class WirePhone:
    """One FedKit-style phone: HTTP handshake, then the legacy Flower bidi gRPC stream.

    ``timeout`` bounds every HTTP request and the silence between two server messages on
    the gRPC stream (so a stuck server fails a test instead of hanging it).
    """

    def __init__(
        self,
        backend_url: str,
        platform: Literal["android", "ios"],
        data_type: str,
        update_fn: UpdateFn,
        num_examples: int = 10,
        encoding: Literal["raw", "npy"] = "raw",
        eval_loss: float = 0.5,
        eval_accuracy: float = 0.8,
        test_size: int = 5,
        device_id: int = 1,
        start_fresh: bool = False,
        timeout: float = 60.0,
        send_telemetry: bool = True,
        tensor_count_check: bool = True,
        token: str | None = None,
    ) -> None:
        if platform not in ("android", "ios"):
            raise ValueError(f"platform must be 'android' or 'ios', not {platform!r}")
        if encoding not in ("raw", "npy"):
            raise ValueError(f"encoding must be 'raw' or 'npy', not {encoding!r}")
        self.backend_url = backend_url.rstrip("/")
        self.platform = platform
        self.data_type = data_type
        self.update_fn = update_fn
        self.num_examples = num_examples
        self.encoding = encoding
        self.eval_loss = eval_loss
        self.eval_accuracy = eval_accuracy
        self.test_size = test_size
        self.device_id = device_id
        self.start_fresh = start_fresh
        self.timeout = timeout
        self.send_telemetry = send_telemetry
        self.tensor_count_check = tensor_count_check
        self.report = PhoneReport()
        self.model_file: bytes | None = None
        # a device token (device_auth="token"): HTTP header and gRPC metadata alike
        self.token = token
        self._http = httpx.Client(timeout=timeout,
                                  headers={"X-Device-Token": token} if token else None)
        self._last: list[np.ndarray] | None = None  # last tensors held (sent or received)

    # ----------------------------------------------------------------- HTTP

    def _url(self, path: str) -> str:
        """Paths in the protocol are relative to the backend URL (tolerate a leading '/')."""
        return f"{self.backend_url}/{path.lstrip('/')}"

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        r = self._http.post(self._url(path), json=body)
        if r.status_code != 200:
            raise PhoneError(f"POST {path} -> {r.status_code}: {r.text[:500]}")
        return r

    def advertise(self) -> dict:
        """POST train/advertised, the way FedKit's Android or iOS library does."""
        body = {
            "data_type": self.data_type,
            "tflite": self.platform == "android",
            "coreml": self.platform == "ios",
        }
        model = self._post("train/advertised", body).json()
        layers_key = "tflite_layers" if self.platform == "android" else "coreml_layers"
        path_key = "tflite_path" if self.platform == "android" else "coreml_path"
        for key in ("id", layers_key, path_key):
            if model.get(key) is None:
                raise PhoneError(f"train/advertised answer lacks {key!r}: {model}")
        self.report.advertised = model
        return model

    def download(self) -> bytes:
        """GET the platform's model file (a path relative to the backend URL)."""
        model = self.report.advertised or self.advertise()
        path = model["tflite_path"] if self.platform == "android" else model["coreml_path"]
        r = self._http.get(self._url(path))
        if r.status_code != 200:
            raise PhoneError(f"GET {path} -> {r.status_code}: {r.text[:500]}")
        if not r.content:
            raise PhoneError(f"GET {path} returned an empty model file")
        self.model_file = r.content
        return r.content

    def request_server(self) -> dict:
        """POST train/server; a usable answer has a port to Join on."""
        model = self.report.advertised or self.advertise()
        server = self._post(
            "train/server", {"id": model["id"], "start_fresh": self.start_fresh}
        ).json()
        self.report.server = server
        if server.get("port") is None:
            raise PhoneError(f"train/server gave no port: {server}")
        return server

    def _telemetry(self, kind: str, start_ms: int, end_ms: int, **extra: Any) -> None:
        body = {
            "device_id": self.device_id,
            "session_id": self.report.server.get("session_id"),
            "start": start_ms,
            "end": end_ms,
            **extra,
        }
        self._post(f"telemetry/{kind}", body)

    # ----------------------------------------------------------------- tensors

    def _expected_count(self) -> int:
        model = self.report.advertised
        key = "tflite_layers" if self.platform == "android" else "coreml_layers"
        return len(model[key])

    def _decode(self, params: pb.Parameters, what: str) -> list[np.ndarray]:
        tensors = [decode_tensor(bytes(t)).reshape(-1) for t in params.tensors]
        if self.tensor_count_check and len(tensors) != self._expected_count():
            raise PhoneError(
                f"{what}: got {len(tensors)} tensors, the advertisement lists "
                f"{self._expected_count()} for {self.platform}"
            )
        return tensors

    def _encode(self, arrays: list[np.ndarray]) -> pb.Parameters:
        if self.encoding == "raw":
            return pb.Parameters(tensors=[encode_raw(a) for a in arrays], tensor_type="ND")
        return pb.Parameters(tensors=[encode_npy(a) for a in arrays], tensor_type="ndarray")

    def _initial_tensors(self) -> list[np.ndarray]:
        """What a fresh phone would report: Android knows sizes, iOS only the count."""
        if self._last is not None:
            return self._last
        if self.platform == "android":
            return [np.zeros(n // 4, np.float32) for n in self.report.advertised["tflite_layers"]]
        return []

    # ----------------------------------------------------------------- gRPC handlers

    def _on_fit(self, ins: pb.ServerMessage.FitIns) -> pb.ClientMessage:
        tensors = self._decode(ins.parameters, "FitIns")
        epochs = 1
        if "local_epochs" in ins.config:
            scalar = ins.config["local_epochs"]
            kind = scalar.WhichOneof("scalar")
            if kind != "sint64":
                raise PhoneError(f"config['local_epochs'] must be a sint64 Scalar, got {kind}")
            epochs = int(scalar.sint64)
        round_idx = self.report.rounds_fit
        self.report.received.append(tensors)
        self.report.local_epochs.append(epochs)
        out = [np.asarray(a, dtype=np.float32) for a in self.update_fn(tensors, round_idx)]
        self.report.sent.append(out)
        self._last = out
        return pb.ClientMessage(
            fit_res=pb.ClientMessage.FitRes(
                parameters=self._encode(out), num_examples=self.num_examples
            )
        )

    def _on_evaluate(self, ins: pb.ServerMessage.EvaluateIns) -> pb.ClientMessage:
        # A real phone loads these parameters, so the count must be right here too.
        tensors = self._decode(ins.parameters, "EvaluateIns")
        if tensors:
            self._last = tensors
        return pb.ClientMessage(
            evaluate_res=pb.ClientMessage.EvaluateRes(
                loss=self.eval_loss, num_examples=self.test_size
            )
        )

    # ----------------------------------------------------------------- session

    def _grpc_target(self, port: int) -> str:
        host = httpx.URL(self.backend_url).host or "127.0.0.1"
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"{host}:{port}"

    def _serve(self, port: int) -> None:
        outbox: queue.Queue[Any] = queue.Queue()

        def requests() -> Iterator[pb.ClientMessage]:
            while True:
                msg = outbox.get()
                if msg is _CLOSE:
                    return
                yield msg

        channel = grpc.insecure_channel(self._grpc_target(port))
        call = None
        last_seen = [time.monotonic()]
        timed_out = threading.Event()
        done = threading.Event()

        def watchdog() -> None:
            """Cancel the stream when the server stays silent longer than ``timeout``."""
            while not done.wait(0.2):
                if time.monotonic() - last_seen[0] > self.timeout:
                    timed_out.set()
                    if call is not None:
                        call.cancel()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            stub = pb_grpc.FlowerServiceStub(channel)
            call = stub.Join(requests(), metadata=(("x-device-token", self.token),)
                             if self.token else None)
            for msg in call:
                last_seen[0] = time.monotonic()
                kind = msg.WhichOneof("msg")
                if kind == "reconnect_ins":
                    self.report.reconnected = True
                    break
                if kind == "get_parameters_ins":
                    res = pb.ClientMessage.GetParametersRes(
                        parameters=self._encode(self._initial_tensors())
                    )
                    outbox.put(pb.ClientMessage(get_parameters_res=res))
                elif kind == "fit_ins":
                    start = _now_ms()
                    reply = self._on_fit(msg.fit_ins)
                    end = _now_ms()
                    outbox.put(reply)
                    self.report.rounds_fit += 1
                    if self.send_telemetry:
                        self._telemetry("fit_ins", start, end)
                elif kind == "evaluate_ins":
                    start = _now_ms()
                    reply = self._on_evaluate(msg.evaluate_ins)
                    end = _now_ms()
                    outbox.put(reply)
                    self.report.rounds_evaluated += 1
                    if self.send_telemetry:
                        self._telemetry(
                            "evaluate_ins",
                            start,
                            end,
                            loss=self.eval_loss,
                            accuracy=self.eval_accuracy,
                            test_size=self.test_size,
                        )
                else:  # FedKit's clients handle nothing else
                    raise PhoneError(f"unexpected server message {kind!r}")
        except grpc.RpcError as e:
            if timed_out.is_set():
                raise PhoneError(f"server silent for more than {self.timeout}s") from e
            raise
        finally:
            done.set()
            outbox.put(_CLOSE)
            if call is not None and not self.report.reconnected:
                call.cancel()
            channel.close()

    def run(self) -> PhoneReport:
        """The whole FedKit flow; never raises, errors land in ``report.error``."""
        try:
            self.advertise()
            self.download()
            server = self.request_server()
            self._serve(int(server["port"]))
        except Exception as e:
            self.report.error = f"{type(e).__name__}: {e}"
        finally:
            self._http.close()
        return self.report

    def start(self) -> threading.Thread:
        """Run in a daemon thread (for fleets of phones); read ``self.report`` after join."""
        t = threading.Thread(target=self.run, name=f"wirephone-{self.device_id}", daemon=True)
        t.start()
        return t


def _now_ms() -> int:
    return int(time.time() * 1000)
