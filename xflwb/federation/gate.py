"""``UpdateGate``: the one place a wire format is read or written.

Every client payload passes here on its way in (bytes → decoded tensors → the platform's
layout mapped to canonical space → validated → an ``Update``), and every model passes here
on its way out (canonical → the platform's layout → the client's encoding). Nothing after
the gate sees bytes, a platform's layout or an encoding; nothing before it sees canonical
arrays. So a new wire format (a compression codec) plugs in here and nowhere else.

Compression (``xflwb.federation.codecs``): a client whose update's metrics name a codec
(``KEY_CODEC``) is decoded with it, only if it is the codec the server asked that client for.
What the client sends is its *change* to the model it received (a delta codec says so; an
absolute update under a lossy down-link is re-based: minus ``received``, the base as its
down-link codec delivered it), applied to the exact base, and only then mapped and
validated, so validation, clipping and aggregation never see a codec and the down-link's
rounding never accumulates in the global model. A model goes down compressed with
``encode(model, platform, codec)`` (deterministic rounding: ``received`` reproduces it).

What the gate refuses costs only that client: each refusal is an ``UpdateRejected``
subclass whose message names the problem. A ``KeyError`` is never the client's: client
data is never a key, only a manifest lookup raises one, so it propagates as the fault of
the export (or of xflwb) it is, and the caller fails the round instead of rejecting an
honest phone.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge import params
from xflwb.bridge.arrays import Array
from xflwb.bridge.manifest import Manifest
from xflwb.errors import InputError, UpdateRejected
from xflwb.federation import codecs as wire
from xflwb.federation.aggregate import DEFAULT_MAX_EXAMPLES, update_norm
from xflwb.federation.codecs import FLOAT32, KEY_CODEC, Codec
from xflwb.federation.update import Update

__all__ = ["CODECS", "TENSOR_TYPES", "BadExampleCount", "FrozenMismatch", "MalformedManifest",
           "MalformedUpdate", "NonFiniteUpdate", "UnknownPlatform", "UpdateGate",
           "UpdateNormExceeded", "tensor_type_of"]

#: the tensor encodings clients read and write, with the ``Parameters.tensor_type`` each is
#: announced as ("ND" is FedKit's raw float32; Flower's SDKs read ``.npy``)
TENSOR_TYPES = {"raw": "ND", "npy": "ndarray"}
CODECS = tuple(TENSOR_TYPES)
#: encoded models kept per gate (one per platform × codec of the current global model)
_CACHE_SIZE = 8
#: received models (base × platform × down codec, float32 for the exact layout) kept for
#: decoding, each a model copy held in memory: a round's two platforms, exact and as sent,
#: and FedBuff's newest versions (a miss on an older one costs one more encode and decode,
#: not a rejection)
_RECEIVED_SIZE = 6


def tensor_type_of(codec: str | Codec) -> str:
    """The ``Parameters.tensor_type`` of a model sent in ``codec``: "ND" (raw), "ndarray"
    (npy) or "xfl:<spec>" for a compression codec."""
    return wire.tensor_type(codec) if isinstance(codec, Codec) else TENSOR_TYPES[codec]


class MalformedManifest(InputError):
    """The manifest cannot map the model to one of its platforms (an export bug): found at
    session start, never taken for a client's bad update."""


class MalformedUpdate(UpdateRejected):
    """The payload cannot be decoded, or does not fit the platform's layout (tensor count,
    sizes, dtype)."""


class UnknownPlatform(UpdateRejected):
    """The client joined as a platform the model was not exported for."""


class FrozenMismatch(UpdateRejected):
    """The update was computed on an artifact with other frozen weights."""


class BadExampleCount(UpdateRejected):
    """``num_examples`` is not a positive integer."""


class NonFiniteUpdate(UpdateRejected):
    """The update holds NaN or inf (in float32)."""


class UpdateNormExceeded(UpdateRejected):
    """The update is farther from its base than ``max_update_norm`` (rejected, not
    clipped)."""


class UpdateGate:
    """Decode, map and validate client payloads; encode models per platform and codec.

    ``manifest`` may be replaced while sessions run (tests corrupt it on purpose); the
    trained masks are computed once, at construction, after ``check_manifest``.
    ``check_finite``: check each trained tensor for NaN/inf here; off by default because the
    streamed average (``StreamingFedAvg``) checks in its own pass, and only policies that
    keep raw updates (robust rules) need it from the gate.
    """

    def __init__(self, manifest: Manifest, *,
                 max_examples: int | None = DEFAULT_MAX_EXAMPLES,
                 max_update_norm: float | None = None, check_finite: bool = False) -> None:
        self.manifest = manifest
        #: one update counts for at most this many examples (capped, counted as "capped")
        self.max_examples = None if max_examples is None else int(max_examples)
        #: updates whose canonical L2 distance to their base exceeds this are rejected
        #: (not clipped: a clipped attack still moves the model by the bound)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.check_finite = bool(check_finite)
        self.masks: dict[str, list[bool]] = {}
        frozen = manifest.get("frozen")
        self.frozen: str | None = frozen.get("sha256") if frozen else None
        self._cache: dict[tuple[int, str, str], list[bytes]] = {}
        self._cache_model: Any = None
        #: (id(base), platform, down spec) → (base, the model in platform layout as the
        #: client decoded it); the base is held so its id cannot be reused while cached
        self._received: OrderedDict[tuple[int, str, str], tuple[Any, list[Array]]] = (
            OrderedDict())
        self._lock = threading.Lock()
        #: platform → (the manifest it was computed from, ``float32_bytes``)
        self._f32: dict[str, tuple[Any, int]] = {}

    @property
    def platforms(self) -> list[str]:
        return list(self.manifest["platforms"])

    def check_manifest(self, model: Sequence[Array]) -> None:
        """Map ``model`` to every platform and back, so a broken manifest (our export's
        fault) fails here, at session start, and is never taken for a client's bad update
        in a round; fills ``masks``."""
        for platform in self.manifest["platforms"]:
            try:
                params.from_platform(params.to_platform(list(model), self.manifest, platform),
                                     self.manifest, platform, base=list(model))
                self.masks[platform] = params.trained_mask(self.manifest, platform)
            except (KeyError, IndexError, TypeError) as exc:
                raise MalformedManifest(
                    f"manifest of model {self.manifest.get('name')!r} is malformed for "
                    f"platform {platform!r} ({type(exc).__name__}: {exc}); re-export the "
                    "model with xflwb.export") from exc

    def examples(self, value: Any) -> tuple[int, bool]:
        """(examples an update counts for, whether ``max_examples`` capped them), or
        ``BadExampleCount``."""
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise BadExampleCount(f"num_examples must be a positive integer, got {value!r}")
        n = int(value)
        if n <= 0:
            raise BadExampleCount(f"num_examples must be positive, got {n}")
        if self.max_examples is not None and n > self.max_examples:
            return self.max_examples, True
        return n, False

    def accept(self, platform: str, client: str, tensors: Sequence[bytes], num_examples: Any,
               metrics: dict[str, Any] | None, base: Sequence[Array],
               base_version: int = 0, *, up: Codec | None = None,
               down: Codec | None = None) -> Update:
        """One client's payload as an ``Update`` over ``base`` (the model it trained from:
        tensors its platform does not hold are filled from it), or an ``UpdateRejected``
        naming the problem. A ``KeyError`` is a manifest fault and propagates.

        ``up`` / ``down``: the codecs the server asked this client for (None: float32). An
        update whose metrics name a codec (``KEY_CODEC``) must name ``up``; its change to
        what ``down`` delivered of ``base`` (``received``) is applied to ``base`` itself. A
        client may always answer in float32 (no ``KEY_CODEC``)."""
        model = base  # the object the down-link was encoded from (``received``'s cache key)
        base = list(base)
        frozen = (metrics or {}).get("frozen_sha256")
        if frozen is not None and self.frozen and frozen != self.frozen:
            raise FrozenMismatch(
                f"update computed on an artifact with different frozen weights "
                f"(frozen_sha256 {str(frozen)[:12]}…, this session's model has "
                f"{str(self.frozen)[:12]}…): the phone must download this session's model")
        if platform not in self.masks:
            raise UnknownPlatform(f"client joined as platform {platform!r}, which model "
                                  f"'{self.manifest['name']}' was not exported for")
        n, capped = self.examples(num_examples)
        sent = self._sent_codec(metrics, up)
        codec = "raw"  # a compressed update's native encoding is not seen: raw stands in
        try:  # client bytes only: whatever decoding raises is the payload's fault
            blobs = [t if isinstance(t, bytes) else bytes(memoryview(t)) for t in tensors]
            if sent is None:
                arrays, codec = params.decode_tensors(blobs)
        except Exception as exc:
            raise MalformedUpdate(str(exc) or type(exc).__name__) from exc
        # the update is the client's change applied to the EXACT base: a lossy down-link
        # moved the model the client trained from (``received``), and re-basing keeps that
        # rounding out of the global model (else it would be added again every round, a
        # random walk that swamps small updates)
        exact = (self.received(model, platform, None)
                 if (sent is not None and sent.delta) or down is not None else None)
        if sent is not None:
            shapes = params.platform_shapes(self.manifest, platform)
            try:  # client bytes only, again
                arrays = wire.decode_arrays(blobs, sent, shapes,
                                            reference=exact if sent.delta else None)
            except Exception as exc:
                raise MalformedUpdate(f"{sent.spec} update: {exc}") from exc
        if down is not None and (sent is None or not sent.delta):
            assert exact is not None
            received = self.received(model, platform, down)
            try:  # absolute values: minus what the client received, plus the exact base
                with np.errstate(over="ignore", invalid="ignore"):
                    arrays = [np.add(e, np.subtract(np.reshape(a, r.shape), r,
                                                    dtype=np.float32), dtype=np.float32)
                              for a, r, e in zip(arrays, received, exact, strict=True)]
            except ValueError as exc:  # a tensor count or size the layout does not have
                raise MalformedUpdate(f"update does not fit the {platform} layout: "
                                      f"{exc}") from exc
        try:  # tensors a platform does not hold are masked out: base fills them
            canonical = params.from_platform(arrays, self.manifest, platform, base=base)
        except KeyError:
            raise
        except ValueError as exc:
            raise MalformedUpdate(str(exc)) from exc
        mask = self.masks[platform]
        if self.check_finite:
            for k, (a, t) in enumerate(zip(canonical, mask, strict=True)):
                if t and not np.isfinite(a).all():
                    raise NonFiniteUpdate(f"parameter {k} contains NaN or inf (in float32)")
        if self.max_update_norm is not None:
            norm = update_norm(canonical, base, mask)
            if not np.isfinite(norm):
                raise NonFiniteUpdate("update contains NaN or inf (in float32)")
            if norm > self.max_update_norm:
                raise UpdateNormExceeded(
                    f"update norm {norm:.4g} exceeds max_update_norm "
                    f"{self.max_update_norm:g} (L2 distance to the global model over the "
                    f"tensors {platform} trains, canonical space); rejected, not clipped")
        return Update(platform=platform, client=str(client), tensors=canonical,
                      trained=list(mask), examples=n, capped=capped,
                      base_version=int(base_version), codec=codec,
                      metrics=dict(metrics or {}),
                      compression=sent.spec if sent is not None else FLOAT32,
                      float32_bytes=self.float32_bytes(platform))

    @staticmethod
    def _sent_codec(metrics: dict[str, Any] | None, up: Codec | None) -> Codec | None:
        """The codec an update says it is encoded with (``KEY_CODEC``), None for float32;
        ``MalformedUpdate`` when it is not the one the server asked for."""
        said = (metrics or {}).get(KEY_CODEC)
        if said is None or said == FLOAT32:
            return None
        asked = up.spec if up is not None else FLOAT32
        if not isinstance(said, str) or said != asked:
            raise MalformedUpdate(
                f"update is encoded with codec {said!r} ({KEY_CODEC}), the server asked this "
                f"client for {asked!r}; a client sends the codec it was asked for or float32")
        return up

    def float32_bytes(self, platform: str) -> int:
        """What one model or update of ``platform`` costs as float32: 4 bytes per element of
        its layout (the compression ratio's reference)."""
        hit = self._f32.get(platform)
        if hit is not None and hit[0] is self.manifest:  # asked twice per update
            return hit[1]
        size = 4 * sum(math.prod(s) for s in params.platform_shapes(self.manifest, platform))
        self._f32[platform] = (self.manifest, size)
        return size

    def received(self, model: Sequence[Array], platform: str, down: Codec | None
                 ) -> list[Array]:
        """``model`` in ``platform``'s layout as a client decodes it when it was sent with
        ``down`` (None: float32, exact): the reference a delta codec's update is added to.
        Cached per model object, platform and codec (the down-link is deterministic)."""
        key = (id(model), platform, down.spec if down is not None else FLOAT32)
        with self._lock:
            hit = self._received.get(key)
            if hit is not None and hit[0] is model:
                self._received.move_to_end(key)
                return hit[1]
        if down is None:  # the exact layout (every compressed update of a round needs it)
            out = params.to_platform(list(model), self.manifest, platform)
        else:
            shapes = params.platform_shapes(self.manifest, platform)
            out = [down.decode(b, math.prod(s)).reshape(s) for b, s in
                   zip(self._encode(model, platform, down), shapes, strict=True)]
        with self._lock:
            self._received[key] = (model, out)
            while len(self._received) > _RECEIVED_SIZE:
                self._received.popitem(last=False)
        return out

    def decode_sums(self, tensors: Sequence[bytes]) -> list[Array]:
        """SecAgg+'s unmasked aggregate (``.npy`` of any float precision, as Flower's
        workflow writes it): decoded as Flower decodes it, precision kept for the division
        (``xflwb.federation.policies.secure_sums``)."""
        out = []
        for t in tensors:
            with io.BytesIO(bytes(t)) as buf:
                out.append(np.load(buf, allow_pickle=False))
        return out

    def encode(self, model: Sequence[Array], platform: str, codec: str | Codec, *,
               cache: bool = True) -> list[bytes]:
        """``model`` in ``platform``'s layout and ``codec`` (raw, npy, or a down-link
        compression codec: absolute values, deterministic rounding), cached per model
        object (a round encodes once per platform and codec, not once per client).
        ``cache=False``: a model other than the round's (FedBuff's versions)."""
        if isinstance(codec, Codec):
            if "down" not in codec.directions:
                raise ValueError(f"codec {codec.spec!r} cannot carry a model down")
        elif codec not in TENSOR_TYPES:
            raise ValueError(f"unknown codec {codec!r}; use one of {sorted(TENSOR_TYPES)}")
        if not cache:
            return self._encode(model, platform, codec)
        key = (id(model), platform, tensor_type_of(codec))
        with self._lock:
            if self._cache_model is not model:  # a new model: the old encodings are stale
                self._cache.clear()
                self._cache_model = model
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self._encode(model, platform, codec)
        with self._lock:
            if self._cache_model is model and len(self._cache) < _CACHE_SIZE:
                self._cache[key] = out
        return out

    def _encode(self, model: Sequence[Array], platform: str, codec: str | Codec
                ) -> list[bytes]:
        arrays = params.to_platform(list(model), self.manifest, platform)
        if isinstance(codec, Codec):  # a whole model: absolute values, nearest rounding
            return [codec.encode(a) for a in arrays]
        return params.encode_tensors(arrays, codec)
