"""Pooling: MAX / AVERAGE, valid / same / global, exclude-padding; backward included.

Max-pool padding acts as −inf and the gradient goes to the first arg-max (undocumented);
average pooling divides by the forward divisor. Gradients are scattered with
``np.bincount``, so there is no per-window Python loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Chw, StepKernel, pair, register
from xflwb.bridge.coreml_exec.conv import pad, spatial, windows


@register("pooling")
class Pooling(StepKernel):
    backprop = True
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.pooling
        if p.type not in (0, 1):
            raise self.fail("only MAX and AVERAGE pooling are supported (not L2)")
        if p.WhichOneof("PoolingPaddingType") == "includeLastPixel":
            raise self.fail("includeLastPixel padding is not supported (supported: valid, "
                            "same, global)")
        self.p = p
        self.is_max = p.type == 0
        self.exclude = bool(p.avgPoolExcludePadding)

    def _infer(self, shape: Chw) -> Chw:
        c, h, w = shape
        if self.p.globalPooling:
            self.k, self.s = (h, w), (1, 1)
            self.hw_out, self.pads = (1, 1), (0, 0, 0, 0)
        else:
            self.k, self.s = pair(self.p.kernelSize, 3), pair(self.p.stride, 1)
            self.hw_out, self.pads = spatial(self.name, self.p, "PoolingPaddingType", (h, w),
                                             self.k, self.s)
        (ho, wo), (kh, kw), (sh, sw) = self.hw_out, self.k, self.s
        pt, pb, pl, pr = self.pads
        self.hp, self.wp = h + pt + pb, w + pl + pr
        rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :]  # padded coordinates
        cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :]
        if self.exclude:  # divisor: window cells inside the unpadded input (separable)
            rin = ((rows >= pt) & (rows < pt + h)).sum(1)
            cin = ((cols >= pl) & (cols < pl + w)).sum(1)
            div = np.maximum(np.outer(rin, cin), 1)
        else:
            div = np.full((ho, wo), kh * kw)
        self._inv_div = (1.0 / div).astype(self.dtype)
        # flat index of every window cell inside one padded (Hp, Wp) map: for the scatter
        self._pos = (rows[:, None, :, None] * self.wp + cols[None, :, None, :]).reshape(
            ho, wo, kh * kw)
        self._row0 = rows[:, :1] * self.wp  # (Ho, 1)
        self._col0 = cols[:, 0][None, :]  # (1, Wo)
        return c, ho, wo

    def forward(self, x: Arr, keep: bool) -> Arr:
        n, c = x.shape[:2]
        xp = pad(x, self.pads, -np.inf if self.is_max else 0.0)
        win = windows(xp, self.k, self.s, (1, 1), self.hw_out)
        # window cells first: reductions over a leading axis run along contiguous rows
        flat = win.transpose(4, 5, 0, 1, 2, 3).reshape(self.k[0] * self.k[1], n, c,
                                                         *self.hw_out)
        if not self.is_max:
            mean: Arr = flat.sum(axis=0) * self._inv_div
            return mean
        y = flat.max(axis=0)
        if keep:  # the first arg-max, as Core ML is assumed to do (argmax(axis=0) is slower)
            cells = np.arange(len(flat), dtype=np.min_scalar_type(len(flat)))
            self._arg = np.where(flat == y, cells.reshape(-1, 1, 1, 1, 1), len(flat)).min(axis=0)
        out: Arr = y
        return out

    def _scatter(self, idx: Arr, vals: Arr, n: int) -> Arr:
        """Sum ``vals`` into a padded (B, C, Hp, Wp) map at flat ``idx``; crop the padding."""
        c, h, w = self.in_shape
        dxp = np.bincount(idx.ravel(), weights=vals.ravel(), minlength=n * c * self.hp * self.wp)
        pt, _, pl, _ = self.pads
        dxp = dxp.reshape(n, c, self.hp, self.wp)[:, :, pt:pt + h, pl:pl + w]
        return dxp.astype(self.dtype)

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if not need_dx:
            return None
        n, c = dy.shape[:2]
        off = (np.arange(n * c) * (self.hp * self.wp)).reshape(n, c, 1, 1)
        if self.is_max:
            ai, aj = np.divmod(self._arg, self.k[1])
            idx = off + self._row0 + self._col0 + ai * self.wp + aj
            return self._scatter(idx, dy, n)
        g = dy * self._inv_div
        idx = off[..., None] + self._pos
        return self._scatter(idx, np.broadcast_to(g[..., None], idx.shape), n)
