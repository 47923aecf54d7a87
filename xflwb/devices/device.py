"""A virtual phone: FedKit's client flow, run with the real exported artifact.

advertise → fetch the manifest → download the model file and verify its sha256 →
``train/server`` (retrying with bounded backoff while there is no session or it is
occupied) → Flower legacy gRPC ``Join`` → answer GetParameters / Fit / Evaluate /
Reconnect → telemetry. Android devices run the ``.tflite`` in the TFLite interpreter, iOS
devices the ``.mlmodel`` in the Core ML executor; tensors travel in the platform's layout,
as raw float32 (FedKit) or ``.npy`` (Flower's iOS SDK).

Compression (``xflwb.federation.codecs``): a virtual phone is the reference client of every
codec. It declares the codecs of ``DeviceOptions.codecs`` in its GetParameters answer
(``codecs="none"``: it declares nothing, as a FedKit phone or a stock Flower client, and
gets float32 both ways), decodes a compressed model by its ``tensor_type``, and encodes its
update in the codec the FitIns asks for (``KEY_UP``): a delta codec's difference to the
model it received, after DP's clipping, with error feedback kept across the session's
rounds.
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
    codecs: str = option("all", 'compression codecs the device declares: "all", "none" (a '
                         'stock FedKit / Flower phone: float32 both ways) or a comma-separated '
                         'list of fp16, int8, topk, rotate+int8')
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
        declared_codecs(self.codecs)  # InputError naming an unknown codec
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise InputError(f"ca_file {self.ca_file!r} does not exist (the PEM CA the "
                             "backend's certificate was signed with)")


def declared_codecs(value: Any) -> tuple[str, ...]:
    """``DeviceOptions.codecs`` → the codec names a device declares ("all": every codec;
    "none" or empty: none); ``InputError`` naming an unknown one."""
    from xflwb._options import did_you_mean
    from xflwb.federation.codecs import CODECS

    if not isinstance(value, str):
        raise InputError(f"codecs must be a string such as 'all', 'none' or 'int8,fp16', got "
                         f"{value!r}")
    text = value.strip().lower()
    if text == "all":
        return tuple(CODECS)
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in CODECS:
            raise InputError(f"codecs: unknown codec {name!r}{did_you_mean(name, CODECS)}; "
                             f"declare 'all', 'none' or some of {', '.join(CODECS)}")
    return tuple(dict.fromkeys(names))


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
        self.codecs = declared_codecs(self.options.codecs)
        #: error feedback of a lossy up-link: (session id, codec spec) → what it kept back
        self._feedback: tuple[Any, Any] | None = None

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
        """A model from the server: float32 (raw / .npy), or compressed with the down-link
        codec its ``tensor_type`` names (absolute values, this platform's layout)."""
        import math

        from xflwb.bridge import params
        from xflwb.federation.codecs import codec_from_tensor_type

        codec = codec_from_tensor_type(parameters.tensor_type)
        if codec is None:
            arrays, _ = params.decode_tensors(list(parameters.tensors))
            return arrays
        shapes = params.platform_shapes(self.runtime.manifest, self.platform)
        if len(parameters.tensors) != len(shapes):
            raise DeviceError(f"{codec.spec} model has {len(parameters.tensors)} tensors, "
                              f"this {self.platform} model holds {len(shapes)}")
        return [codec.decode(b, math.prod(s)).reshape(s)
                for b, s in zip(parameters.tensors, shapes, strict=True)]

    def _native(self) -> str:
        return "ND" if self.options.encoding == "raw" else "ndarray"

    def _encode(self, pb: Any, arrays: list[Array]) -> Any:
        from xflwb.bridge import params

        tensors = params.encode_tensors(arrays, self.options.encoding)
        return pb.Parameters(tensors=tensors, tensor_type=self._native())

    def _asked_codec(self, cfg: Any) -> Any:
        """The up-link codec the FitIns asks for (``KEY_UP``), if this device declared it;
        else None: float32, as a phone that never heard of compression answers."""
        from xflwb.federation.codecs import KEY_UP, parse

        if KEY_UP not in cfg or not self.codecs:
            return None
        try:
            codec = parse(cfg[KEY_UP].string, "up")
        except InputError as exc:
            log.warning("device %s: asked for %s; sending float32", self.status.device_id, exc)
            return None
        return codec if codec is not None and codec.name in self.codecs else None

    def _compressed(self, pb: Any, codec: Any, update: list[Array], received: list[Array]
                    ) -> Any:
        """``update`` in ``codec``: a delta codec sends its difference to ``received`` (the
        model this device decoded) through error feedback kept across the session's rounds;
        stochastic rounding seeded by the device's seed, id and round."""
        import numpy as np

        from xflwb.federation.codecs import ErrorFeedback, encode_arrays, tensor_type

        rng = np.random.default_rng([self.options.seed, self.status.device_id,
                                     self.status.rounds_done])
        if codec.delta:
            key = (self.status.session_id, codec.spec)
            if self._feedback is None or self._feedback[0] != key:
                self._feedback = (key, ErrorFeedback())
            delta = [np.subtract(u, r, dtype=np.float32)
                     for u, r in zip(update, received, strict=True)]
            tensors = self._feedback[1].encode(delta, codec, rng)
        else:
            tensors = encode_arrays(update, codec, rng=rng)
        return pb.Parameters(tensors=tensors, tensor_type=tensor_type(codec))

    def _answer(self, pb: Any, kind: str, msg: Any) -> Any:
        rt = self.runtime
        if kind == "get_parameters_ins":  # also declares the codecs (none: as stock phones)
            from xflwb.federation.codecs import announce

            answer = self._encode(pb, rt.get_parameters())
            answer.tensor_type = announce(self._native(), self.codecs)
            return pb.ClientMessage(get_parameters_res=pb.ClientMessage.GetParametersRes(
                parameters=answer))
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
            codec = self._asked_codec(cfg)  # clipped first, then encoded
            if codec is None:
                parameters = self._encode(pb, update)
            else:
                from xflwb.federation.codecs import KEY_CODEC

                parameters = self._compressed(pb, codec, update, received)
                metrics[KEY_CODEC] = pb.Scalar(string=codec.spec)
            return pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
                parameters=parameters, num_examples=len(self.x_train), metrics=metrics))
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
