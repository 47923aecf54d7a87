"""``CoreMLExecutor``: runs and trains one Core ML neural-network spec like an iPhone.

The layer list is executed as the DAG Core ML defines (blobs by name, layers in their
topological spec order): layers may read several blobs (add, concat), write several (LSTM:
y, h, c), and a blob read by several layers gets the sum of their gradients. Training
follows Core ML's documented update semantics (NeuralNetwork.proto): the validator's rules
(``coreml_rules``) decide what may train, fused softmax + cross-entropy, mean-of-batch
gradients, SGD with momentum and bias-corrected Adam whose state starts at zero in every
update task. Points Apple leaves undocumented (Adam's epsilon placement, MSE reduction) are
switches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge import coreml_rules
from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.coreml_exec import training
from xflwb.bridge.coreml_exec.activation import Softmax
from xflwb.bridge.coreml_exec.base import KERNELS, Arr, Kernel, Shape, Weighted
from xflwb.bridge.runtime.base import CCE_EPSILON, epoch_batches

ADAM_EPSILON_MODES = ("hat", "corrected")
MSE_REDUCTIONS = ("mean", "sum")
OVERRIDE_KEYS = training.OVERRIDE_KEYS
_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
_CCE = "categoricalCrossEntropyLossLayer"
_MSE = "meanSquaredErrorLossLayer"


def make_kernel(layer: Any, index: int, dtype: np.dtype[Any]) -> Kernel:
    """The kernel for one layer proto; unsupported types name the layer and the options."""
    kind = layer.WhichOneof("layer") or ""
    cls = KERNELS.get(kind)
    if cls is None:
        raise ValueError(f"layer '{layer.name}' (#{index}) has type '{kind}', which the Core "
                         f"ML executor does not support (supported: {', '.join(KERNELS)})")
    return cls(layer, dtype)


def _per_sample(a: Arr) -> Arr:
    """(S, N, C, H, W) → (N, S·C·H·W): each sample's values in Core ML order."""
    return a[0].reshape(a.shape[1], -1) if a.shape[0] == 1 else (
        a.transpose(1, 0, 2, 3, 4).reshape(a.shape[1], -1))


def _from_sample(g: Arr, shape: Shape) -> Arr:
    """The inverse of ``_per_sample`` for one blob of per-sample ``shape``."""
    n = len(g)
    if shape[0] == 1:
        return g.reshape(1, n, *shape[1:])
    return g.reshape(n, *shape).transpose(1, 0, 2, 3, 4)


class CoreMLExecutor:
    """Runs and trains one Core ML neural-network spec the way an iPhone update task does.

    ``x`` is in Core ML layout: (N, C, H, W) for a (C, H, W) input, (N, D) for a (D,) one.
    CCE targets are 0-based class indices; MSE targets hold the output's values in Core ML
    order. ``dtype=np.float64`` is for gradient checks; ``adam_epsilon`` and
    ``mse_reduction`` select the undocumented variants. ``enforce_rules=False`` trains
    through every layer the executor can differentiate, which Core ML would refuse: a
    what-if mode, never what a phone does.
    """

    def __init__(self, spec: Any, dtype: Any = np.float32, adam_epsilon: str = "hat",
                 mse_reduction: str = "mean", enforce_rules: bool = True) -> None:
        if adam_epsilon not in ADAM_EPSILON_MODES:
            raise ValueError(f"adam_epsilon must be one of {ADAM_EPSILON_MODES}, "
                             f"got {adam_epsilon!r}")
        if mse_reduction not in MSE_REDUCTIONS:
            raise ValueError(f"mse_reduction must be one of {MSE_REDUCTIONS}, "
                             f"got {mse_reduction!r}")
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.adam_epsilon = adam_epsilon
        self.mse_reduction = mse_reduction
        self.enforce_rules = enforce_rules
        self.nn_kind = spec.WhichOneof("Type")
        if self.nn_kind not in _NN_KINDS:
            raise ValueError(f"spec holds a '{self.nn_kind}' model; the executor runs neural "
                             f"networks only ({', '.join(_NN_KINDS)})")
        self.nn = getattr(spec, self.nn_kind)
        self.layers: list[Kernel] = [make_kernel(lay, i, self.dtype)
                                     for i, lay in enumerate(self.nn.layers)]
        if not self.layers:
            raise ValueError("the spec has no layers")
        self._proto_index = {lay.name: i for i, lay in enumerate(self.nn.layers)}
        self._infer_shapes()
        self.weighted = [lay for lay in self.layers if isinstance(lay, Weighted)]
        self.trainable = [(lay, what) for lay in self.weighted if lay.updatable
                          for what in (("weights", "bias") if lay.has_bias else ("weights",))]
        self._keep: set[int] = set()
        self._bwd: list[tuple[Kernel, list[bool]]] = []
        self._chunk_plans: dict[bool, tuple[int, list[Kernel], list[str]]] = {}
        self._idle: list[Weighted] = []
        self._defaults: dict[str, Any] | None = None
        self.has_update = self.nn.HasField("updateParams") and len(
            self.nn.updateParams.lossLayers) > 0
        if self.has_update:
            self._plan_training()
        self.reset_optimizer()

    # -- structure --------------------------------------------------------------------------
    def _infer_shapes(self) -> None:
        desc = self.spec.description
        if not desc.input:
            raise ValueError("the spec declares no input")
        inp = desc.input[0]
        if inp.type.WhichOneof("Type") != "multiArrayType":
            raise ValueError(f"input '{inp.name}' is not a MultiArray (image inputs are not "
                             "supported)")
        dims = tuple(int(d) for d in inp.type.multiArrayType.shape)
        if len(dims) == 1:
            chw = (dims[0], 1, 1)
        elif len(dims) == 3:
            chw = dims
        else:
            raise ValueError(f"input '{inp.name}' has shape {list(dims)}; the executor needs a "
                             "fixed (C, H, W) or (D,) shape (Core ML's rank-5 mapping)")
        self.input_name, self.input_dims = inp.name, dims
        self.input_shape: tuple[int, int, int] = chw
        # other declared inputs: optional states (LSTM h_0, c_0) left absent, i.e. zeros
        optional = {i.name for i in desc.input[1:]}
        shapes: dict[str, Shape] = {inp.name: (1, *chw)}
        for k in self.layers:
            ins: list[Shape | None] = []
            for pos, blob in enumerate(k.inputs):
                if blob in shapes:
                    ins.append(shapes[blob])
                elif pos >= k.n_in[0] and (blob in optional or not blob):
                    ins.append(None)
                else:
                    raise ValueError(f"layer {k.label} reads blob '{blob}', which no earlier "
                                     "layer or input produces")
            outs = k.infer(ins)
            for blob, shape in zip(k.outputs, outs, strict=True):
                if blob in shapes:
                    raise ValueError(f"layer {k.label} writes blob '{blob}', which already "
                                     "exists (Core ML requires unique blob names)")
                shapes[blob] = tuple(int(v) for v in shape)  # type: ignore[assignment]
        self.blob_shapes = shapes
        out_name = None
        for o in desc.output:
            if o.name in shapes and o.name != inp.name:
                out_name = o.name
                break
        if out_name is None:  # e.g. a classifier whose outputs are label + dictionary
            probs = getattr(desc, "predictedProbabilitiesName", "")
            out_name = probs if probs in shapes else self.layers[-1].outputs[0]
        self.output_name = out_name
        s, c, h, w = shapes[out_name]
        self.output_shape: tuple[int, ...] = (c, h, w) if s == 1 else (s, c, h, w)

    def _producer(self, blob: str) -> Kernel | None:
        return next((k for k in self.layers if blob in k.outputs), None)

    def _plan_training(self) -> None:
        """Mirror Core ML's updatable-model validation and decide who runs backward."""
        up = self.nn.updateParams
        if len(up.lossLayers) > 1:
            raise ValueError("the spec has several loss layers; Core ML supports exactly one")
        loss = up.lossLayers[0]
        self.loss_kind = loss.WhichOneof("LossLayerType")
        if self.loss_kind not in (_CCE, _MSE):
            raise ValueError(f"loss layer '{loss.name}' has unsupported type {self.loss_kind}")
        src = getattr(loss, self.loss_kind).input
        producer = self._producer(src)
        if self.loss_kind == _CCE:
            if not isinstance(producer, Softmax):
                raise ValueError(f"loss layer '{loss.name}': categorical cross-entropy input "
                                 f"'{src}' is not the output of a (legacy) softmax layer")
            s, _, h, w = self.blob_shapes[src]
            if (s, h, w) != (1, 1, 1):
                raise ValueError(f"loss layer '{loss.name}': input '{src}' has shape (Seq, C, "
                                 f"H, W) = {self.blob_shapes[src]}, expected (1, classes, 1, 1)")
            self.loss_blob, self.grad_blob = src, producer.inputs[0]
        else:
            if producer is None:
                raise ValueError(f"loss layer '{loss.name}': MSE input '{src}' is not "
                                 "produced inside the graph")
            self.loss_blob = self.grad_blob = src
        if not self.trainable:
            raise ValueError("the model has update parameters but no updatable layer")
        if self.enforce_rules:
            coreml_rules.validate(self.nn.layers, src, self.loss_kind == _CCE)
        # blobs with an updatable layer at or above them
        upd: dict[str, bool] = {}
        for k in self.layers:
            flag = k.updatable or any(upd.get(b, False) for b in k.inputs)
            for b in k.outputs:
                upd[b] = flag
        # walk back from where the loss gradient enters the graph
        needed = {self.grad_blob}
        fused = producer if self.loss_kind == _CCE else None
        for k in reversed(self.layers):
            if k is fused or not any(b in needed for b in k.outputs):
                continue
            need = [upd.get(b, False) for b in k.inputs]
            if any(need) and not (k.backprop if self.enforce_rules else k.has_backward):
                raise ValueError(f"layer {k.label} does not support backpropagation, yet "
                                 "updatable layers lie between it and the input; Core ML "
                                 "rejects this model (freeze the layers before it)")
            needed.update(b for b, n in zip(k.inputs, need, strict=True) if n)
            if any(need) or k.updatable:
                self._bwd.append((k, need))
        self._keep = {id(k) for k, _ in self._bwd}
        # updatable layers off the loss path get zero gradients (the loss does not see them)
        self._idle = [k for k in self.weighted if k.updatable and id(k) not in self._keep]

    # -- inference --------------------------------------------------------------------------
    def _as_input(self, x: AnyArray) -> Arr:
        x = np.asarray(x, dtype=self.dtype)
        if len(self.input_dims) == 1 and x.ndim == 2:
            x = x.reshape(len(x), -1, 1, 1)
        if x.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_dims))
            raise ValueError(f"x must have shape (N, {want}) in Core ML layout, got {x.shape}")
        return x

    #: elements per chunk of the gradient-free layers (see ``_run``): small enough for the
    #: largest activation of a chunk to stay in cache, large enough to amortise the
    #: per-layer Python cost
    CHUNK_ELEMENTS = 1 << 20

    def _plan_chunks(self, keep: bool) -> tuple[int, list[Kernel], list[str]]:
        """(samples per chunk, the leading layers no gradient passes, their output blobs
        that later layers or the caller read)."""
        key = bool(keep)
        cached = self._chunk_plans.get(key)
        if cached is not None:
            return cached
        prefix: list[Kernel] = []
        for k in self.layers:
            if keep and id(k) in self._keep:
                break
            prefix.append(k)
        made = {b for k in prefix for b in k.outputs}
        later = {b for k in self.layers[len(prefix):] for b in k.inputs}
        wanted = [b for b in made if b in later or b == self.output_name
                  or (keep and b in (self.loss_blob, self.grad_blob))]
        biggest = max((math.prod(self.blob_shapes[b]) for b in made), default=1)
        plan = (max(1, self.CHUNK_ELEMENTS // max(1, biggest)), prefix, wanted)
        self._chunk_plans[key] = plan
        return plan

    def _run(self, x: Arr, keep: bool) -> dict[str, Arr]:
        """Run the layers; blobs are (S, N, C, H, W).

        The leading layers no gradient has to pass (a frozen backbone; every layer when
        only predicting) run a few samples at a time: their activations then stay in the
        CPU's cache instead of streaming whole batches through memory layer after layer.
        Samples are independent in every layer, so the result is the same.
        """
        step, prefix, wanted = self._plan_chunks(keep)
        n = x.shape[0]
        blobs: dict[str, Arr] = {self.input_name: x[None]}
        if prefix and step < n:
            parts: dict[str, list[Arr]] = {b: [] for b in wanted}
            for start in range(0, n, step):
                part: dict[str, Arr] = {self.input_name: x[None, start:start + step]}
                for k in prefix:
                    ys = k.run([part.get(b) for b in k.inputs], False)
                    part.update(zip(k.outputs, ys, strict=True))
                for b in wanted:
                    parts[b].append(part[b])
            blobs.update({b: np.concatenate(v, axis=1) for b, v in parts.items()})
            rest = self.layers[len(prefix):]
        else:
            rest = self.layers
        for k in rest:
            ys = k.run([blobs.get(b) for b in k.inputs], keep and id(k) in self._keep)
            blobs.update(zip(k.outputs, ys, strict=True))
        return blobs

    def forward(self, x: AnyArray) -> AnyArray:
        """Model output for Core ML-layout ``x``: (N, C) for a vector output, (N, C, H, W)
        for a map, (N, S, …) for a sequence."""
        x = self._as_input(x)
        y = self._run(x, keep=False)[self.output_name]
        return np.ascontiguousarray(y.transpose(1, 0, 2, 3, 4).reshape(
            len(x), *self._out_dims()))

    def _out_dims(self) -> tuple[int, ...]:
        s, c, h, w = self.blob_shapes[self.output_name]
        dims = (c,) if h == w == 1 else (c, h, w)
        return dims if s == 1 else (s, *dims)

    # -- training ---------------------------------------------------------------------------
    def _require_training(self) -> None:
        if not self.has_update:
            raise ValueError("the spec has no update parameters (not an updatable model)")

    def loss_and_grads(self, x: AnyArray, target: AnyArray
                       ) -> tuple[float, list[AnyArray | None]]:
        """Batch-mean loss and its gradients, aligned with ``get_weights`` (None = frozen)."""
        self._require_training()
        x = self._as_input(x)
        n = len(x)
        if n == 0:
            raise ValueError("empty batch")
        blobs = self._run(x, keep=True)
        out = _per_sample(blobs[self.loss_blob])
        if self.loss_kind == _CCE:
            t = np.asarray(target).reshape(-1)
            if len(t) != n:
                raise ValueError(f"got {len(t)} targets for {n} samples")
            if not np.all(np.mod(t, 1) == 0) or t.min() < 0 or t.max() >= out.shape[1]:
                raise ValueError(f"CCE targets must be class indices in [0, {out.shape[1]})")
            t = t.astype(np.int64)
            rows = np.arange(n)
            picked = np.clip(out[rows, t].astype(np.float64), CCE_EPSILON, 1 - CCE_EPSILON)
            loss = float(-np.mean(np.log(picked)))
            g = out.copy()
            g[rows, t] -= 1
            g *= 1.0 / n
        else:
            t = np.asarray(target, dtype=self.dtype)
            if t.size != out.size:
                raise ValueError(f"MSE targets have {t.size} values, expected {out.size} "
                                 f"(shape {out.shape})")
            diff = out - t.reshape(out.shape)
            per = 1 if self.mse_reduction == "sum" else out.shape[1]
            loss = float(np.sum(np.square(diff, dtype=np.float64)) / (n * per))
            g = diff * (2.0 / (n * per))
        for lay in self._idle:
            lay.dW = np.zeros_like(lay.W)
            lay.db = None if lay.b is None else np.zeros_like(lay.b)
        self._backward(_from_sample(g.astype(self.dtype, copy=False),
                                    self.blob_shapes[self.grad_blob]))
        result: list[AnyArray | None] = []
        for lay in self.weighted:
            result.append(lay.dW if lay.updatable else None)
            if lay.has_bias:
                result.append(lay.db if lay.updatable else None)
        return loss, result

    def _backward(self, g: Arr) -> None:
        """Reverse sweep; a blob read by several layers receives the sum of their grads."""
        grads: dict[str, Arr] = {self.grad_blob: g}
        for k, need in self._bwd:
            dys = [grads.pop(b, None) for b in k.outputs]
            if all(d is None for d in dys):
                continue
            dxs = k.grad(dys, need)
            for blob, n, dx in zip(k.inputs, need, dxs, strict=True):
                if n and dx is not None:
                    prev = grads.get(blob)
                    grads[blob] = dx if prev is None else prev + dx

    def reset_optimizer(self) -> None:
        """Zero the optimiser state: every Core ML update task starts from scratch."""
        self._t = 0
        self._m: list[Arr | None] = [None] * len(self.trainable)
        self._v: list[Arr | None] = [None] * len(self.trainable)

    def step(self, x: AnyArray, target: AnyArray,
             hyper: dict[str, Any] | None = None) -> float:
        """One optimiser step on one mini-batch; returns its loss before the update."""
        hp = hyper or self.hyperparameters()
        loss, _ = self.loss_and_grads(x, target)
        self._t += 1
        t, lr = self._t, float(hp["learning_rate"])
        adam = hp["optimizer"] == "adam"
        if adam:
            b1, b2, eps = float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"])
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            alpha = lr * math.sqrt(c2) / c1
        for i, (lay, what) in enumerate(self.trainable):
            w = lay.W if what == "weights" else lay.b
            g = lay.dW if what == "weights" else lay.db
            assert w is not None and g is not None
            if adam:
                if self._m[i] is None:
                    self._m[i], self._v[i] = np.zeros_like(w), np.zeros_like(w)
                m, v = self._m[i], self._v[i]
                assert m is not None and v is not None
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * np.square(g)
                if self.adam_epsilon == "hat":  # Keras/TF: eps added to sqrt(v), not sqrt(v̂)
                    w -= alpha * m / (np.sqrt(v) + eps)
                else:  # Kingma & Ba, Algorithm 1
                    w -= lr * (m / c1) / (np.sqrt(v / c2) + eps)
            else:
                mu = float(hp.get("momentum", 0.0))
                if mu:
                    if self._m[i] is None:
                        self._m[i] = np.zeros_like(w)
                    vel = self._m[i]
                    assert vel is not None
                    vel *= mu
                    vel += g
                    w -= lr * vel
                else:
                    w -= lr * g
        return loss

    # -- update parameters -------------------------------------------------------------------
    def hyperparameters(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's defaults, replaced by ``overrides`` that lie in the allowed range/set.

        Like ``MLModelConfiguration.parameters``: an out-of-range value raises, as Core ML
        throws.
        """
        self._require_training()
        name, flds = training.fields(self.nn)
        if self._defaults is None:
            self._defaults = training.defaults(name, flds)
        return training.resolve(self._defaults, name, flds, overrides)

    def update(self, x: AnyArray, target: AnyArray, epochs: int | None = None,
               batch_size: int | None = None, shuffle: bool | None = None,
               seed: int | None = None, overrides: dict[str, Any] | None = None
               ) -> list[float]:
        """One update task (MLUpdateTask): per-epoch, sample-weighted mean batch losses."""
        ov = dict(overrides or {})
        for key, value in (("epochs", epochs), ("mini_batch_size", batch_size),
                           ("shuffle", shuffle), ("seed", seed)):
            if value is not None:
                ov[key] = value
        hp = self.hyperparameters(ov)
        x = self._as_input(x)
        target = np.asarray(target)
        if len(target) != len(x):
            raise ValueError(f"x has {len(x)} samples but the target has {len(target)}")
        if len(x) == 0:
            raise ValueError("update() got no samples")
        rng = np.random.default_rng(hp["seed"])
        self.reset_optimizer()
        losses = []
        for _ in range(int(hp["epochs"])):
            total = 0.0
            for idx in epoch_batches(len(x), int(hp["mini_batch_size"]), bool(hp["shuffle"]),
                                     rng):
                total += self.step(x[idx], target[idx], hp) * len(idx)
            losses.append(total / len(x))
        return losses

    # -- weights ------------------------------------------------------------------------------
    def weight_keys(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(layer name, "weights"|"bias", Core ML shape) in proto order: what a phone sends."""
        keys = []
        for lay in self.weighted:
            keys.append((lay.name, "weights", tuple(lay.w_shape)))
            if lay.has_bias:
                keys.append((lay.name, "bias", (int(lay.w_shape[0]),)))
        return keys

    def get_weights(self) -> list[AnyArray]:
        out = []
        for lay in self.weighted:
            out.append(lay.W.astype(np.float32, copy=True))
            if lay.b is not None:
                out.append(lay.b.astype(np.float32, copy=True))
        return out

    def set_weights(self, arrays: Sequence[AnyArray]) -> None:
        """Load weights in proto order; flat arrays are accepted (as on the wire)."""
        keys = self.weight_keys()
        if len(arrays) != len(keys):
            raise ValueError(f"expected {len(keys)} weight tensors "
                             f"({', '.join(f'{n} {w}' for n, w, _ in keys)}), got {len(arrays)}")
        new = [self._check_array(a, *k) for a, k in zip(arrays, keys, strict=True)]
        it = iter(new)
        for lay in self.weighted:
            lay.W = next(it)
            if lay.has_bias:
                lay.b = next(it)

    def _check_array(self, arr: Any, name: str, what: str, shape: tuple[int, ...]
                     ) -> AnyArray:
        a = np.asarray(arr, dtype=self.dtype)
        size = math.prod(shape)
        if a.size != size:
            raise ValueError(f"layer '{name}' {what}: got {a.size} values, expected {size} "
                             f"(shape {list(shape)})")
        if a.ndim > 1 and a.shape != shape:
            raise ValueError(f"layer '{name}' {what}: got shape {list(a.shape)}, expected "
                             f"{list(shape)} (or a flat array of {size})")
        return a.reshape(shape).copy()

    def to_spec(self) -> Any:
        """A copy of the spec holding the current weights (what FedKit's client writes)."""
        spec = type(self.spec)()
        spec.CopyFrom(self.spec)
        layers = getattr(spec, self.nn_kind).layers
        for lay in self.weighted:
            lay.write(layers[self._proto_index[lay.name]])
        return spec
