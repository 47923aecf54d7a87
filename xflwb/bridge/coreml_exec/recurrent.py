"""Recurrent layers on rank-5 sequences: uniDirectionalLSTM and GRU (forward only).

Inputs are [Seq, Batch, C, 1, 1] blobs, carried as (S, N, C, 1, 1). Gate equations,
weight layouts ``[out, in]`` and the clip of every gate pre-activation to [−50, 50] follow
the proto. The input projections of all steps are one matmul; only the recurrence loops
over time. Core ML neither updates nor back-propagates through these layers.

Assumption (undocumented): with ``reverseInput`` and ``sequenceOutput``, outputs come in
processing order (last input first), as Keras' ``go_backwards``, which coremltools' Keras
converter mapped onto ``reverseInput``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xflwb.bridge.coreml_exec.activation import rnn_activation
from xflwb.bridge.coreml_exec.base import Arr, Kernel, Shape, read_weights, register

GATE_CLIP = 50.0


class _Recurrent(Kernel):
    """Shared shape checks, weight reading and the time loop's bookkeeping."""

    n_acts = 0
    seq_out: bool  # set by each layer's __init__ from its parameters
    reverse: bool

    def _setup(self, p: Any, acts: Any) -> None:
        self.n_x, self.n_h = int(p.inputVectorSize), int(p.outputVectorSize)
        if len(acts) != self.n_acts:
            raise self.fail(f"expected {self.n_acts} activations, got {len(acts)}")
        self.acts = [rnn_activation(self.label, a) for a in acts]

    def _read(self, wp: Any, what: str, shape: tuple[int, ...]) -> Arr:
        return read_weights(self.name, what, wp, shape, self.dtype)[0]

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        x = shapes[0]
        assert x is not None
        if x[1:] != (self.n_x, 1, 1):
            raise self.fail(f"input must be a sequence of ({self.n_x}, 1, 1) vectors "
                            f"[Seq, C, H, W], got {x} (permute a (C, 1, T) map with axis "
                            "(3, 1, 2, 0) first)")
        for name, s in zip(self.inputs[1:], shapes[1:], strict=True):
            if s is not None and s != (1, self.n_h, 1, 1):
                raise self.fail(f"initial state '{name}' must be (1, {self.n_h}, 1, 1), "
                                f"got {s}")
        state: Shape = (1, self.n_h, 1, 1)
        outs = [(x[0] if self.seq_out else 1, self.n_h, 1, 1), state, state]
        return outs[:len(self.outputs)]

    def _state(self, xs: list[Arr | None], i: int, n: int) -> Arr:
        s = xs[i] if i < len(xs) else None
        return np.zeros((n, self.n_h), self.dtype) if s is None else s.reshape(n, self.n_h)

    def _steps(self, s: int) -> range:
        return range(s - 1, -1, -1) if self.reverse else range(s)

    def _pack(self, ys: list[Arr], *states: Arr) -> list[Arr]:
        n = len(ys[-1])
        y = np.stack(ys) if self.seq_out else ys[-1][None]
        outs = [y.reshape(len(y), n, self.n_h, 1, 1),
                *(st.reshape(1, n, self.n_h, 1, 1) for st in states)]
        return outs[:len(self.outputs)]


@register("uniDirectionalLSTM")
class UniLSTM(_Recurrent):
    """LSTM with gates i, f, z (block input), o; outputs y, h_T, c_T; inputs x, h_0, c_0."""

    n_in = (1, 3)
    n_out = (1, 3)
    n_acts = 3

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.uniDirectionalLSTM
        self._setup(p, p.activations)
        prm = p.params
        if prm.hasPeepholeVectors:
            raise self.fail("peephole vectors are not supported (supported: "
                            "hasPeepholeVectors=false)")
        if prm.coupledInputAndForgetGate:
            raise self.fail("coupledInputAndForgetGate is not supported")
        self.seq_out = bool(prm.sequenceOutput)
        self.cell_clip = float(prm.cellClipThreshold) or 50.0  # the proto: 0 means 50
        self.reverse = bool(p.reverseInput)
        wp, h, x = p.weightParams, self.n_h, self.n_x
        gates = ("inputGate", "forgetGate", "outputGate", "blockInput")  # stacked i, f, o, z
        self.W = np.concatenate([self._read(getattr(wp, f"{g}WeightMatrix"), f"{g} W", (h, x))
                                 for g in gates])
        self.R = np.concatenate([self._read(getattr(wp, f"{g}RecursionMatrix"), f"{g} R",
                                            (h, h)) for g in gates])
        self.b = np.concatenate([self._read(getattr(wp, f"{g}BiasVector"), f"{g} bias", (h,))
                                 if prm.hasBiasVectors else np.zeros(h, self.dtype)
                                 for g in gates])
        if prm.forgetBias:  # "a vector of 1 values is added to b_f" (also without biases)
            self.b[h:2 * h] += 1

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        x = xs[0]
        assert x is not None
        s, n = x.shape[:2]
        f, g, hf = self.acts
        hn = self.n_h
        pre = (x.reshape(s * n, self.n_x) @ self.W.T + self.b).reshape(s, n, 4 * hn)
        h, c = self._state(xs, 1, n), self._state(xs, 2, n)
        ys = []
        for t in self._steps(s):
            a = np.clip(pre[t] + h @ self.R.T, -GATE_CLIP, GATE_CLIP)
            i, fg, o = f(a[:, :hn]), f(a[:, hn:2 * hn]), f(a[:, 2 * hn:3 * hn])
            z = g(a[:, 3 * hn:])
            c = np.clip(fg * c + i * z, -self.cell_clip, self.cell_clip)
            h = hf(c) * o
            ys.append(h)
        return self._pack(ys, h, c)


@register("gru")
class GRU(_Recurrent):
    """GRU: z, r gates, c = y_{t−1}⊙r, o = g(W_o x + R_o c + b_o), y = (1−z)⊙o + z⊙y_{t−1}."""

    n_in = (1, 2)
    n_out = (1, 2)
    n_acts = 2

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.gru
        self._setup(p, p.activations)
        self.seq_out = bool(p.sequenceOutput)
        self.reverse = bool(p.reverseInput)
        h, x = self.n_h, self.n_x
        gates = ("updateGate", "resetGate", "outputGate")  # stacked z, r, o
        self.W = np.concatenate([self._read(getattr(p, f"{g}WeightMatrix"), f"{g} W", (h, x))
                                 for g in gates])
        self.R = np.concatenate([self._read(getattr(p, f"{g}RecursionMatrix"), f"{g} R",
                                            (h, h)) for g in gates])
        self.b = np.concatenate([self._read(getattr(p, f"{g}BiasVector"), f"{g} bias", (h,))
                                 if p.hasBiasVectors else np.zeros(h, self.dtype)
                                 for g in gates])

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        x = xs[0]
        assert x is not None
        s, n = x.shape[:2]
        f, g = self.acts
        hn = self.n_h
        pre = (x.reshape(s * n, self.n_x) @ self.W.T + self.b).reshape(s, n, 3 * hn)
        r_zr, r_o = self.R[:2 * hn].T, self.R[2 * hn:].T
        h = self._state(xs, 1, n)
        ys = []
        for t in self._steps(s):
            a = np.clip(pre[t, :, :2 * hn] + h @ r_zr, -GATE_CLIP, GATE_CLIP)
            z, r = f(a[:, :hn]), f(a[:, hn:])
            o = g(np.clip(pre[t, :, 2 * hn:] + (h * r) @ r_o, -GATE_CLIP, GATE_CLIP))
            h = (1 - z) * o + z * h
            ys.append(h)
        return self._pack(ys, h)
