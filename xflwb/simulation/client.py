"""The simulated phone: a Flower ``Client`` that runs the exported artifact.

It is what a virtual device does in a round, without the HTTP/gRPC shell: decode the
parameters in its platform's layout and encoding, train with ``xflwb.bridge.runtime``
(TFLite interpreter for Android, the numpy Core ML executor for iOS), answer in the same
encoding. Ray reuses a worker process for many clients, so each worker keeps its runtimes
and the dataset partitions in module-level caches: one artifact load per worker and
platform, not one per client per round.

Simulated clients are xflwb's reference clients for compression (``xflwb.federation.codecs``):
they decode any compressed down-link (``Parameters.tensor_type`` ``"xfl:<spec>"``) and encode
their update in whatever codec the server asks for (FitIns config ``KEY_UP``), delta codecs
with error feedback whose residual lives in the node's ``Context.state``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge import params
from xflwb.bridge.arrays import AnyArray, Array
from xflwb.bridge.manifest import Manifest
from xflwb.federation import codecs
from xflwb.federation.gate import TENSOR_TYPES
from xflwb.flower_legacy import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    Status,
    client_api,
)
from xflwb.simulation import secagg
from xflwb.simulation.config import platform_of

#: (bundle sha, platform) → loaded runtime, for the life of the Ray worker
_RUNTIMES: dict[tuple[str, str], Any] = {}
#: bundle sha → directory holding the unpacked manifest and artifacts
_BUNDLES: dict[str, Path] = {}
#: the node state's record holding the error-feedback residual of a lossy up-link: what the
#: codec did not send last time, sent with the next update (platform layout, in order)
RESIDUAL = "xfl_residual"
#: the float32 encoding a simulated client answers in when its model came compressed (the
#: server's own default for a client it has not heard from)
NATIVE = "raw"
#: folded into the up-link rounding seed, so it never repeats the dropout draw's stream
_UP_STREAM = 0x7866


@dataclass(frozen=True)
class ClientSpec:
    """Everything a worker needs to act as any client of one simulation (small: Ray ships
    it with every message)."""

    bundle: Any  # a Ray ObjectRef to the artifact bundle (dict name → bytes)
    bundle_sha: str
    android: int
    ios: int
    dataset: str
    partition: str
    seed: int
    test_fraction: float
    drop_prob: float = 0.0
    #: SecAgg+ parameters (``SimulationConfig.secagg``): fit answers in the canonical layout
    #: for ``secaggplus_mod`` to mask (``xflwb.simulation.secagg``)
    secagg: dict[str, Any] | None = None
    #: every client's rows of the dataset (``dataset_indices``, computed once by the driver),
    #: a Ray ObjectRef: workers then need no partitioner (None: each worker partitions)
    indices: Any = None

    def platform_of(self, partition_id: int) -> str:
        return platform_of(partition_id, self.android)


def make_bundle(manifest: Manifest, platforms: list[str]) -> tuple[dict[str, bytes], str]:
    """Manifest + the artifacts the fleet needs, as bytes: Ray workers may run on other
    machines that cannot see the registry's files."""
    from xflwb.bridge import manifest as manifest_mod

    clean = {k: v for k, v in manifest.items() if k != "_dir"}
    blob = {"manifest.json": json.dumps(clean, sort_keys=True).encode()}
    for plat in platforms:
        path = manifest_mod.artifact_path(manifest, plat)
        blob[path.name] = path.read_bytes()
    digest = hashlib.sha256()
    for name in sorted(blob):
        digest.update(name.encode() + b"\0" + blob[name])
    return blob, digest.hexdigest()[:16]


def _bundle_dir(spec: ClientSpec) -> Path:
    if spec.bundle_sha not in _BUNDLES:
        import ray

        blob = spec.bundle if isinstance(spec.bundle, dict) else ray.get(spec.bundle)
        folder = Path(tempfile.mkdtemp(prefix=f"xflwb-sim-{spec.bundle_sha}-"))
        for name, data in blob.items():
            (folder / name).write_bytes(data)
        _BUNDLES[spec.bundle_sha] = folder
    return _BUNDLES[spec.bundle_sha]


def runtime_for(spec: ClientSpec, platform: str) -> Any:
    """This worker's runtime for ``platform``: loaded on first use, then reused."""
    key = (spec.bundle_sha, platform)
    if key not in _RUNTIMES:
        from xflwb.bridge import runtime

        _RUNTIMES[key] = runtime.load(_bundle_dir(spec), platform)
        # one line per load in the simulation log (Ray forwards worker output): how often
        # a runtime is loaded is visible, and should be once per worker and platform
        print(f"xflwb worker {os.getpid()}: loaded {platform} runtime {spec.bundle_sha}",
              file=sys.stderr, flush=True)
    return _RUNTIMES[key]


@functools.lru_cache(maxsize=4)
def _partitions(dataset: str, partition: str, num_partitions: int, seed: int,
                indices: Any = None) -> Any:
    from xflwb.devices.partition import dataset_partitions as split

    if indices is not None:  # the driver's ``dataset_indices``, in Ray's object store
        import ray

        indices = ray.get(indices)
    return split(dataset, partition, num_partitions, seed, indices)[0]


def client_data(spec: ClientSpec, partition_id: int) -> tuple[AnyArray, ...]:
    """(x_train, y_train, x_test, y_test) exactly as ``device_data`` gives a virtual phone,
    with the whole-dataset partitioning done once per worker instead of once per client."""
    from xflwb.devices.partition import local_data

    n = spec.android + spec.ios
    x, y = _partitions(spec.dataset, spec.partition, n, spec.seed, spec.indices)[partition_id]
    d = local_data(x, y, partition_id, n, spec.seed, spec.test_fraction)
    return d.x_train, d.y_train, d.x_test, d.y_test


_API = client_api()  # Flower's client side only: this module runs in every Ray worker


class SimClient(_API.Client):  # type: ignore[misc, name-defined]
    """One simulated phone; the runtime is only touched for fit and evaluate."""

    def __init__(self, spec: ClientSpec, partition_id: int, state: Any) -> None:
        self.spec = spec
        self.pid = int(partition_id)
        self.platform = spec.platform_of(self.pid)
        self.state = state  # the node's Context.state: persists across rounds

    def get_properties(self, ins: Any) -> Any:
        return _API.GetPropertiesRes(status=Status(code=Code.OK, message=""),
                                     properties={"platform": self.platform,
                                                 "partition_id": self.pid})

    def _counters(self) -> tuple[int, int]:
        """(fits completed, fits attempted) by this client so far."""
        rec = self.state.config_records.get("xflwb")
        return (int(rec["rounds_done"]), int(rec["attempts"])) if rec is not None else (0, 0)

    def _set_counters(self, done: int, attempts: int) -> None:
        self.state.config_records["xflwb"] = _API.ConfigRecord(
            {"rounds_done": done, "attempts": attempts})

    def _load(self, parameters: Any) -> tuple[Any, str, list[Array]]:
        """Set the received model on this worker's runtime: (runtime, the float32 encoding to
        answer in, the received model in platform layout and shapes). A compressed
        down-link (``tensor_type`` ``"xfl:<spec>"``) carries the absolute model."""
        rt = runtime_for(self.spec, self.platform)
        shapes = params.platform_shapes(rt.manifest, self.platform)
        down = codecs.codec_from_tensor_type(parameters.tensor_type)
        blobs = list(parameters.tensors)
        if down is None:
            flat, native = params.decode_tensors(blobs)
            if len(flat) != len(shapes):
                raise ValueError(f"the server sent {len(flat)} tensors, the {self.platform} "
                                 f"model holds {len(shapes)}")
            received = [np.asarray(a, np.float32).reshape(s) for a, s in
                        zip(flat, shapes, strict=True)]
        else:
            native = NATIVE
            received = _decode_model(blobs, down, shapes)
        rt.set_parameters(received)
        return rt, native, received

    def fit(self, ins: Any) -> Any:
        done, attempts = self._counters()
        self._set_counters(done, attempts + 1)
        if self.spec.drop_prob > 0:
            draw = np.random.default_rng([self.spec.seed, self.pid, attempts]).random()
            if draw < self.spec.drop_prob and self.spec.secagg is not None:
                # SecAgg+ masks whatever FitRes comes back: a dropout must fail the message
                raise secagg.SimulatedDropout("dropped out (simulated, drop_prob)")
            if draw < self.spec.drop_prob:
                # a non-OK status is a failure to Flower's server, like a lost phone, without
                # a traceback in the log for every dropout of a large fleet
                return FitRes(status=Status(code=Code.FIT_NOT_IMPLEMENTED,
                                            message="dropped out (simulated, drop_prob)"),
                              parameters=Parameters(tensors=[], tensor_type=""),
                              num_examples=0, metrics={})
        x, y, _, _ = client_data(self.spec, self.pid)
        up = codecs.parse(ins.config[codecs.KEY_UP], "up") if codecs.KEY_UP in ins.config \
            else None  # asked for a codec it does not know: the fit fails, naming it
        rt, native, received = self._load(ins.parameters)
        epochs = int(ins.config.get("local_epochs", 1))
        # the same per-round seed a virtual phone uses: seed + rounds it has trained
        losses = rt.fit(x, y, epochs=epochs, seed=self.spec.seed + done)
        self._set_counters(done + 1, attempts + 1)
        metrics: dict[str, Any] = {"loss": float(losses[-1])}
        if self.spec.secagg is not None:
            out = self._secure_payload(rt, ins, received, metrics, len(x))
        elif up is None:
            out = Parameters(tensors=params.encode_tensors(
                self._clipped(rt, ins, received, metrics), native),
                tensor_type=TENSOR_TYPES[native])
        else:
            trained = self._clipped(rt, ins, received, metrics)
            rng = np.random.default_rng([self.spec.seed, self.pid, attempts, _UP_STREAM])
            out = Parameters(tensors=self._compressed(up, trained, received, rng),
                             tensor_type=codecs.tensor_type(up))
            metrics[codecs.KEY_CODEC] = up.spec
        frozen = rt.manifest.get("frozen", {}).get("sha256")
        if frozen:  # which frozen backbone this update was computed on
            metrics["frozen_sha256"] = frozen
        return FitRes(status=Status(code=Code.OK, message=""), parameters=out,
                      num_examples=len(x), metrics=metrics)

    def _clipped(self, rt: Any, ins: Any, received: list[Array],
                 metrics: dict[str, Any]) -> list[Array]:
        """The trained tensors; under central DP (``clipping_norm`` in the config) with the
        delta to ``received`` clipped in canonical space as the server would, and the norm
        bit reported (1.0: not clipped)."""
        trained: list[Array] = rt.get_parameters()
        if "clipping_norm" not in ins.config:
            return trained
        norm_cap = float(ins.config["clipping_norm"])
        trained, norm = params.clip_platform_update(trained, received, rt.manifest,
                                                    self.platform, norm_cap)
        metrics["norm_bit"] = 1.0 if norm <= norm_cap else 0.0
        return trained

    def _compressed(self, codec: codecs.Codec, trained: list[Array], received: list[Array],
                    rng: np.random.Generator) -> list[bytes]:
        """The update in ``codec``: a delta codec sends ``trained - received`` plus what it
        did not send last time (error feedback, the residual kept in the node's state);
        fp16 sends the trained tensors themselves."""
        trained = [np.asarray(t, np.float32).reshape(r.shape)
                   for t, r in zip(trained, received, strict=True)]
        if not codec.delta:
            return [codec.encode(t, rng) for t in trained]
        feedback = codecs.ErrorFeedback(self.residual())
        blobs = feedback.encode([t - r for t, r in zip(trained, received, strict=True)],
                                codec, rng)
        assert feedback.residual is not None
        self.state.array_records[RESIDUAL] = _API.ArrayRecord(feedback.residual)
        return blobs

    def residual(self) -> list[Array] | None:
        """What this client's lossy up-link has not sent yet (platform layout), or None."""
        rec = self.state.array_records.get(RESIDUAL)
        if rec is None:
            return None
        return [np.asarray(a, np.float32) for a in rec.to_numpy_ndarrays()]

    def _secure_payload(self, rt: Any, ins: Any, received: list[Array],
                        metrics: dict[str, Any], num_examples: int) -> Any:
        """The update in the canonical layout plus its per-tensor weights, as ``.npy``
        tensors (what ``secaggplus_mod`` reads), for SecAgg+ to mask. Under central DP it
        is clipped here (the server cannot clip a masked update: Flower's fl-dp-sa) and
        counts once, whatever its examples."""
        assert self.spec.secagg is not None
        m = rt.manifest
        # what the platform does not hold is sent as zeros: zeros fill it (the bundle has
        # no initial parameters to fill it with)
        zeros = [np.zeros(p["shape"], np.float32) for p in m["parameters"]]
        canonical = params.from_platform(self._clipped(rt, ins, received, metrics), m,
                                         self.platform, base=zeros)
        payload = secagg.canonical_payload(canonical, params.trained_mask(m, self.platform))
        if "clipping_norm" in ins.config:
            payload = secagg.uniform(payload, num_examples, self.spec.secagg)
        secagg.check_range(payload, num_examples, self.spec.secagg)
        return Parameters(tensors=params.encode_tensors(payload, "npy"),
                          tensor_type="numpy.ndarray")

    def evaluate(self, ins: Any) -> Any:
        _, _, xt, yt = client_data(self.spec, self.pid)
        if len(xt) == 0:
            return EvaluateRes(status=Status(code=Code.OK, message=""), loss=0.0,
                               num_examples=0, metrics={})
        rt, _, _ = self._load(ins.parameters)
        loss, acc = rt.evaluate(xt, yt)
        metrics: dict[str, Scalar] = {"accuracy": float(acc)} if np.isfinite(acc) else {}
        return EvaluateRes(status=Status(code=Code.OK, message=""), loss=float(loss),
                           num_examples=len(xt), metrics=metrics)


def _decode_model(blobs: list[bytes], codec: codecs.Codec,
                  shapes: list[tuple[int, ...]]) -> list[Array]:
    """A compressed down-link: each tensor is the absolute model (never a delta, whatever
    ``codec.delta`` says of up-links), in the platform's shapes."""
    if len(blobs) != len(shapes):
        raise ValueError(f"the server sent {len(blobs)} tensors, the platform's model holds "
                         f"{len(shapes)}")
    out = []
    for k, (blob, shape) in enumerate(zip(blobs, shapes, strict=True)):
        try:
            out.append(codec.decode(blob, math.prod(shape)).reshape(shape))
        except ValueError as exc:
            raise ValueError(f"down-link tensor {k} ({codec.spec}): {exc}") from None
    return out


def client_fn(spec: ClientSpec, context: Any) -> Any:
    """Flower's ``client_fn``: the client for this node's partition (cheap: no loading)."""
    pid = int(context.node_config["partition-id"])
    return SimClient(spec, pid, context.state).to_client()

