"""A virtual phone: FedKit's client flow, run with the real exported artifact.

advertise → fetch the manifest → download the model file and verify its sha256 →
``train/server`` (retrying with bounded backoff while there is no session or it is
occupied) → Flower legacy gRPC ``Join`` → answer GetParameters / Fit / Evaluate /
Reconnect → telemetry. Android devices run the ``.tflite`` in the TFLite interpreter, iOS
devices the ``.mlmodel`` in the Core ML executor; tensors travel in the platform's layout,
as raw float32 (FedKit) or ``.npy`` (Flower's iOS SDK).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xflwb import _options
from xflwb._options import option
from xflwb.bridge.arrays import AnyArray, Array
from xflwb.errors import DeviceFailure, InputError

log = logging.getLogger("xflwb.device")
#: the environment variable a device process reads its device token from (never argv,
#: where other users of the machine could read it); the fleet sets it per device
TOKEN_ENV = "XFLWB_DEVICE_TOKEN"
FLAGS = {"android": {"tflite": True, "coreml": False},
         "ios": {"tflite": False, "coreml": True}}


class DeviceError(DeviceFailure):
    """The device cannot take part; the message says why."""


class CorruptModelError(DeviceError):
    """The downloaded model file does not match the manifest's sha256."""


class _Dropped(Exception):
    """The simulated phone lost its connection mid-fit."""


@_options.declared  # unknown keywords: did you mean
@dataclass
class DeviceOptions:
    """How a virtual phone behaves (heterogeneity knobs): ``xflwb device``,
    ``wb.spawn_devices`` and ``%xfl_devices spawn`` take these (a fleet: one value, or one
    per device)."""

    slowdown: float = option(1.0, "compute slowdown factor (1: as fast as this machine)",
                             ge=1)
    join_delay: float = option(0.0, "seconds before the first request", ge=0)
    drop_prob: float = option(0.0, "chance of dropping out mid-fit, per FitIns (the device "
                              "comes back after rejoin_delay)", ge=0, lt=1)
    rejoin_delay: float = option(1.0, "seconds before a dropped device comes back", ge=0)
    network_delay: float = option(0.0, "seconds added before each answer", ge=0)
    encoding: str = option("raw", "tensor encoding: raw float32 (FedKit) or npy (Flower's "
                           "iOS SDK)", choices=("raw", "npy"))
    max_wait: float = option(300.0, "seconds to wait for a session before giving up", gt=0)
    #: PEM file of the CA to trust for an https backend and its gRPC ports (a dev CA from
    #: ``make_dev_ca``); None: the system's roots
    ca_file: str | None = option(None, "CA to trust for an https backend (its gRPC ports use "
                                 "TLS too)", path=True, metavar="PEM")
    seed: int = option(0, "seed of the device's dropouts", front=False)
    #: the device token the operator issued (sent on HTTP and gRPC) for a backend with
    #: ``device_auth="token"``; None: none sent
    token: str | None = option(None, "device token", front=False, repr=False)

    def __post_init__(self) -> None:
        _options.check(self)
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise InputError(f"ca_file {self.ca_file!r} does not exist (the PEM CA the "
                             "backend's certificate was signed with)")


@dataclass
class DeviceStatus:
    device_id: int
    platform: str
    status: str = "created"
    train_size: int = 0
    test_size: int = 0
    rounds_done: int = 0
    evaluations: int = 0
    last_loss: float | None = None
    last_accuracy: float | None = None
    drops: int = 0
    model: str | None = None
    session_id: int | None = None
    error: str | None = None
    updated: float = field(default_factory=time.time)


class Device:
    """One virtual phone of ``platform`` holding its own train/test data."""

    def __init__(self, backend_url: str, platform: str, data_type: str,
                 x_train: AnyArray, y_train: AnyArray, x_test: AnyArray,
                 y_test: AnyArray, device_id: int = 1, cache_dir: str | Path = ".xfl-cache",
                 options: DeviceOptions | None = None,
                 on_status: Callable[[DeviceStatus], None] | None = None) -> None:
        if platform not in FLAGS:
            raise InputError(f"platform must be 'android' or 'ios', got {platform!r}")
        self.url = backend_url.rstrip("/")
        self.platform = platform
        self.data_type = data_type
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.options = options or DeviceOptions()
        self.cache_dir = Path(cache_dir)
        self.status = DeviceStatus(device_id, platform, train_size=len(x_train),
                                   test_size=len(x_test))
        self._on_status = on_status
        self._rng = random.Random(self.options.seed * 7919 + device_id)
        self._stop = threading.Event()
        self.runtime: Any = None
        self.manifest: dict[str, Any] | None = None
        self._http: Any = None

    # -- bookkeeping ---------------------------------------------------------------------
    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            setattr(self.status, k, v)
        self.status.updated = time.time()
        if self._on_status is not None:
            self._on_status(self.status)

    def stop(self) -> None:
        self._stop.set()

    # -- HTTP ----------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._http.post(f"{self.url}/{path}", json=body)
        if r.status_code != 200:
            raise DeviceError(f"POST {path} → {r.status_code}: {r.text[:300]}")
        answer: dict[str, Any] = r.json()  # every device route answers a JSON object
        return answer

    def prepare(self) -> dict[str, Any]:
        """Advertise, fetch manifest and model (verified), load the runtime."""
        from xflwb.bridge import runtime

        ad = self._post("train/advertised", {"data_type": self.data_type,
                                             **FLAGS[self.platform]})
        r = self._http.get(f"{self.url}/train/manifest/{ad['id']}")
        if r.status_code != 200:
            raise DeviceError(f"manifest of model {ad['id']}: {r.status_code} {r.text[:200]}")
        manifest = r.json()
        entry = manifest["platforms"][self.platform]
        path = (ad["tflite_path"] if self.platform == "android" else ad["coreml_path"]) or ""
        folder = self.cache_dir / ad["name"]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / entry["file"]
        if not target.exists() or _sha256(target.read_bytes()) != entry["sha256"]:
            blob = self._http.get(f"{self.url}/{path.lstrip('/')}").content
            digest = _sha256(blob)
            if digest != entry["sha256"]:
                raise CorruptModelError(
                    f"downloaded {path} has sha256 {digest[:12]}…, the manifest says "
                    f"{entry['sha256'][:12]}…; refusing to train on it")
            # a unique temp name: devices of a fleet share the cache and download at once
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{entry['file']}.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, target)
        manifest["_dir"] = str(folder.resolve())
        self.manifest = manifest
        self.runtime = runtime.load(manifest, self.platform)
        self._set(model=f"{manifest['name']} v{manifest['version']}")
        return ad

    def request_server(self, model_id: int, rejoining: bool = False) -> dict[str, Any] | None:
        """``train/server`` until a port comes back; None when no session appears in time,
        or at once when a device coming back finds its session over."""
        deadline = time.monotonic() + self.options.max_wait
        delay = 0.2
        while not self._stop.is_set():
            res = self._post("train/server", {"id": model_id, "start_fresh": False})
            if res.get("port"):
                return res
            if rejoining and res.get("status") == "no_session":
                return None
            self._set(status=f"waiting ({res.get('status')})")
            if time.monotonic() + delay > deadline:
                return None
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)
        return None

    # -- the device's life -------------------------------------------------------------
    def run(self) -> DeviceStatus:
        """Take part until the session ends; never raises (errors land in status)."""
        import httpx

        headers = ({"Authorization": f"Bearer {self.options.token}"}
                   if self.options.token else {})
        self._http = httpx.Client(timeout=60, headers=headers,
                                  verify=self.options.ca_file or True)
        try:
            if self.options.join_delay:
                self._set(status="delayed")
                if self._stop.wait(self.options.join_delay):
                    return self.status
            ad = self.prepare()
            joined = False
            while not self._stop.is_set():
                server = self.request_server(ad["id"], rejoining=joined)
                if server is None:
                    self._set(status="finished" if joined else "no session")
                    break
                self._set(status="joined", session_id=server["session_id"])
                log.info("device %s: joined session %s on port %s", self.status.device_id,
                         server["session_id"], server["port"])
                joined = True
                try:
                    if self._serve(server):
                        self._set(status="finished")
                        break
                except _Dropped:
                    self._set(status="dropped", drops=self.status.drops + 1)
                    self._stop.wait(self.options.rejoin_delay)
        except Exception as exc:  # with its traceback: a bug here must be findable in the log
            log.exception("device %s failed: %s", self.status.device_id, exc)
            self._set(status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._http.close()
        return self.status

    def _serve(self, server: dict[str, Any]) -> bool:
        """One gRPC stream; True when the server said goodbye (ReconnectIns / stream end)."""
        import grpc

        from xflwb.flower_legacy import transport_pb2 as pb
        from xflwb.flower_legacy import transport_pb2_grpc as pbg

        host = urlparse(self.url).hostname
        out: queue.Queue[Any] = queue.Queue()  # ClientMessages, then None to end
        options = [("grpc.max_send_message_length", -1),
                   ("grpc.max_receive_message_length", -1)]
        target = f"{host}:{server['port']}"
        if urlparse(self.url).scheme == "https":  # the session's gRPC ports use TLS too
            roots = Path(self.options.ca_file).read_bytes() if self.options.ca_file else None
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots),
                                          options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        metadata = ([("authorization", f"Bearer {self.options.token}")]
                    if self.options.token else None)

        def requests() -> Iterator[Any]:
            while (msg := out.get()) is not None:
                yield msg

        try:
            stream = pbg.FlowerServiceStub(channel).Join(requests(), metadata=metadata)
            for msg in stream:
                if self._stop.is_set():
                    return True
                kind = msg.WhichOneof("msg")
                log.debug("device %s: %s", self.status.device_id, kind)
                if kind == "reconnect_ins":
                    out.put(pb.ClientMessage(disconnect_res=pb.ClientMessage.DisconnectRes()))
                    return True
                try:
                    reply = self._answer(pb, kind, msg)
                except _Dropped:  # a lost connection says nothing
                    raise
                except Exception as exc:
                    if kind == "fit_ins":
                        self._report_fit_error(pb, out, stream, channel, exc)
                    raise
                if self.options.network_delay:
                    time.sleep(self.options.network_delay)
                out.put(reply)
                self._after(kind, server["session_id"])
            return True
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return True
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                log.info("device %s: stream closed (%s: %s)", self.status.device_id,
                         exc.code().name, exc.details())
                return True  # the session ended
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise DeviceError(f"the session refused this device: {exc.details()}") from None
            raise
        finally:
            out.put(None)
            channel.close()

    def _report_fit_error(self, pb: Any, out: queue.Queue[Any], stream: Any, channel: Any,
                          exc: Exception, grace: float = 30.0) -> None:
        """Answer the FitIns with a failed FitRes carrying the error before leaving, so the
        session can say why its clients fail (a bare disconnect tells it nothing).

        Closing the channel right after queueing it could cancel the stream before the
        server has read it; so wait until the server shows it has (its next message, or it
        ends the stream, e.g. because the session failed), at most ``grace`` seconds."""
        import grpc

        status = pb.Status(code=pb.Code.Value("FIT_NOT_IMPLEMENTED"),
                           message=f"{type(exc).__name__}: {exc}"[:1000])
        out.put(pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
            status=status, parameters=pb.Parameters(tensors=[], tensor_type=""),
            num_examples=0)))
        timer = threading.Timer(grace, channel.close)
        timer.daemon = True
        timer.start()
        try:
            next(stream, None)
        except (grpc.RpcError, ValueError):  # the server (or the timer) ended the stream
            pass
        finally:
            timer.cancel()

    def _decode(self, parameters: Any) -> list[Array]:
        from xflwb.bridge import params

        arrays, _ = params.decode_tensors(list(parameters.tensors))
        return arrays

    def _encode(self, pb: Any, arrays: list[Array]) -> Any:
        from xflwb.bridge import params

        tensors = params.encode_tensors(arrays, self.options.encoding)
        return pb.Parameters(tensors=tensors,
                             tensor_type="ND" if self.options.encoding == "raw" else "ndarray")

    def _answer(self, pb: Any, kind: str, msg: Any) -> Any:
        rt = self.runtime
        if kind == "get_parameters_ins":
            return pb.ClientMessage(get_parameters_res=pb.ClientMessage.GetParametersRes(
                parameters=self._encode(pb, rt.get_parameters())))
        if kind == "fit_ins":
            self._fit_start = int(time.time() * 1000)
            received = self._decode(msg.fit_ins.parameters)
            rt.set_parameters(received)
            cfg = msg.fit_ins.config
            epochs = int(cfg["local_epochs"].sint64) if "local_epochs" in cfg else 1
            self._set(status="training")
            t0 = time.perf_counter()
            drop = self._rng.random() < self.options.drop_prob
            losses = rt.fit(self.x_train, self.y_train, epochs=epochs,
                            seed=self.options.seed + self.status.rounds_done)
            took = time.perf_counter() - t0
            if self.options.slowdown > 1:
                time.sleep((self.options.slowdown - 1.0) * took)
            if drop:
                raise _Dropped()
            self._set(status="joined", rounds_done=self.status.rounds_done + 1,
                      last_loss=float(losses[-1]))
            # which frozen backbone this update was computed on (the server refuses others)
            frozen = (self.manifest or {}).get("frozen", {}).get("sha256")
            metrics = {"frozen_sha256": pb.Scalar(string=frozen)} if frozen else {}
            update = rt.get_parameters()
            if "clipping_norm" in cfg:  # central DP: clip in canonical space, as the server
                from xflwb.bridge import params

                scalar = cfg["clipping_norm"]
                cap = float(getattr(scalar, scalar.WhichOneof("scalar")))
                update, norm = params.clip_platform_update(update, received, rt.manifest,
                                                           self.platform, cap)
                metrics["norm_bit"] = pb.Scalar(double=1.0 if norm <= cap else 0.0)
            return pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
                parameters=self._encode(pb, update),
                num_examples=len(self.x_train), metrics=metrics))
        if kind == "evaluate_ins":
            self._eval_start = int(time.time() * 1000)
            rt.set_parameters(self._decode(msg.evaluate_ins.parameters))
            loss, acc = rt.evaluate(self.x_test, self.y_test)
            self._last_eval = (loss, acc)
            self._set(evaluations=self.status.evaluations + 1, last_loss=float(loss),
                      last_accuracy=float(acc))
            return pb.ClientMessage(evaluate_res=pb.ClientMessage.EvaluateRes(
                loss=float(loss), num_examples=len(self.x_test)))
        raise DeviceError(f"unexpected server message {kind!r}")

    def _after(self, kind: str, session_id: int) -> None:
        """Telemetry, as FedKit's clients post it after answering."""
        now = int(time.time() * 1000)
        base = {"device_id": self.status.device_id, "session_id": session_id}
        try:
            if kind == "fit_ins":
                self._post("telemetry/fit_ins", {**base, "start": self._fit_start, "end": now})
            elif kind == "evaluate_ins":
                loss, acc = self._last_eval
                acc = 0.0 if acc != acc else acc  # regression: FedKit always sends a number
                self._post("telemetry/evaluate_ins", {
                    **base, "start": self._eval_start, "end": now, "loss": float(loss),
                    "accuracy": float(acc), "test_size": len(self.x_test)})
        except DeviceError as exc:  # telemetry is best effort, training goes on
            log.warning("device %s telemetry: %s", self.status.device_id, exc)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
