"""Convolution (grouped, depthwise, dilated; valid / same padding) and the window helpers
pooling shares.

Dense and grouped convolutions are im2col views (``as_strided``) + matmul; their input
gradients are stride-1 correlations of the up-sampled gradient with the flipped kernel.
Depthwise convolutions (one input channel per group) loop over the kh·kw kernel taps and
multiply whole strided slices by per-channel weights: no per-pixel Python loop, and no
tiny batched matmuls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from xflwb.bridge.coreml_exec.base import Arr, Chw, Weighted, pair, register

Pads = tuple[int, int, int, int]  # top, bottom, left, right


def same_pads(size: int, k_eff: int, stride: int, top_left_heavy: bool
              ) -> tuple[int, int, int]:
    """Output size and (before, after) padding of Core ML ``same`` padding."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + k_eff - size)
    small = total // 2
    return (out, total - small, small) if top_left_heavy else (out, small, total - small)


def spatial(layer_name: str, msg: Any, oneof: str, size_hw: tuple[int, int],
            k_eff: tuple[int, int], stride: tuple[int, int]
            ) -> tuple[tuple[int, int], Pads]:
    """(Ho, Wo) and pads (top, bottom, left, right) for a conv/pool padding message."""
    kind = msg.WhichOneof(oneof)
    if kind == "same":
        tl = msg.same.asymmetryMode == 1  # TOP_LEFT_HEAVY
        ho, pt, pb = same_pads(size_hw[0], k_eff[0], stride[0], tl)
        wo, pl, pr = same_pads(size_hw[1], k_eff[1], stride[1], tl)
    elif kind in ("valid", None):
        amounts = list(msg.valid.paddingAmounts.borderAmounts) if kind else []
        if amounts and len(amounts) != 2:
            raise ValueError(f"layer '{layer_name}': valid padding needs 2 border amounts")
        pt, pb = (amounts[0].startEdgeSize, amounts[0].endEdgeSize) if amounts else (0, 0)
        pl, pr = (amounts[1].startEdgeSize, amounts[1].endEdgeSize) if amounts else (0, 0)
        ho = (size_hw[0] + pt + pb - k_eff[0]) // stride[0] + 1
        wo = (size_hw[1] + pl + pr - k_eff[1]) // stride[1] + 1
    else:
        raise ValueError(f"layer '{layer_name}': padding type '{kind}' is not supported "
                         "(supported: valid, same)")
    if ho < 1 or wo < 1:
        raise ValueError(f"layer '{layer_name}': a {size_hw[0]}x{size_hw[1]} input is smaller "
                         f"than the {k_eff[0]}x{k_eff[1]} window")
    return (int(ho), int(wo)), (int(pt), int(pb), int(pl), int(pr))


def pad(x: Arr, pads: Pads, value: float) -> Arr:
    """Pad H and W of a (B, C, H, W) map (cheaper than ``np.pad`` on small maps)."""
    pt, pb, pl, pr = pads
    if not (pt or pb or pl or pr):
        return x
    n, c, h, w = x.shape
    out = np.full((n, c, h + pt + pb, w + pl + pr), value, dtype=x.dtype)
    out[:, :, pt:pt + h, pl:pl + w] = x
    return out


def pad_channels_last(x: Arr, pads: Pads) -> Arr:
    """Zero-pad a (B, C, H, W) map into a channels-last (B, H', W', C) array."""
    pt, pb, pl, pr = pads
    n, c, h, w = x.shape
    out = np.zeros((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    out[:, pt:pt + h, pl:pl + w, :] = x.transpose(0, 2, 3, 1)
    return out


def windows(xp: Arr, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
            out: tuple[int, int]) -> Arr:
    """Read-only (B, C, Ho, Wo, kh, kw) view of every window: im2col without a copy."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    return as_strided(xp, (n, c, out[0], out[1], k[0], k[1]),
                      (sn, sc, sh * s[0], sw * s[1], sh * d[0], sw * d[1]), writeable=False)


def tap(i: int, j: int, s: tuple[int, int], d: tuple[int, int],
        out: tuple[int, int]) -> tuple[slice, slice]:
    """Slices of a padded map that kernel tap (i, j) reads for every output pixel."""
    r0, c0 = i * d[0], j * d[1]
    return (slice(r0, r0 + (out[0] - 1) * s[0] + 1, s[0]),
            slice(c0, c0 + (out[1] - 1) * s[1] + 1, s[1]))


def correlate(xp: Arr, wg: Arr, groups: int, k: tuple[int, int], s: tuple[int, int],
              d: tuple[int, int], out: tuple[int, int]) -> tuple[Arr, Arr]:
    """Grouped cross-correlation of padded ``xp`` with ``wg`` (G, Cout/G, Cin/G·kh·kw).

    Returns (y as a BCHW view of a (Cout, B, Ho, Wo) array, the im2col matrix
    (G, Cin/G·kh·kw, B·Ho·Wo)). Columns are samples × pixels so the im2col copy runs along
    contiguous rows, and they are kept for dW.
    """
    n, c = xp.shape[:2]
    win = windows(xp, k, s, d, out)
    cg = c // groups
    cols = win.reshape(n, groups, cg, out[0], out[1], k[0], k[1]).transpose(
        1, 2, 5, 6, 0, 3, 4).reshape(groups, cg * k[0] * k[1], -1)
    y = (wg[0] @ cols[0])[None] if groups == 1 else np.matmul(wg, cols)  # (G, Cout/G, M)
    return y.reshape(-1, n, *out).transpose(1, 0, 2, 3), cols


@register("convolution")
class Convolution(Weighted):
    """Cross-correlation with W ``[C_out, C_in/groups, kh, kw]``, zero padding; updatable."""

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        p = layer.convolution
        super().__init__(layer, p, dtype)
        if p.isDeconvolution:
            raise self.fail("deconvolution is not supported (supported: convolution with "
                            "groups, dilation, valid/same padding)")
        self.p = p
        self.cout = int(p.outputChannels)
        self.cg = int(p.kernelChannels)
        self.groups = max(1, int(p.nGroups))
        self.k = pair(p.kernelSize, 3)
        self.s = pair(p.stride, 1)
        self.d = pair(p.dilationFactor, 1)
        if self.cout % self.groups:
            raise self.fail(f"{self.cout} output channels do not split into {self.groups} "
                            "groups")
        self.k_eff = ((self.k[0] - 1) * self.d[0] + 1, (self.k[1] - 1) * self.d[1] + 1)
        # one input channel per group: the tap-loop kernel (depthwise, any multiplier)
        self.depthwise = self.cg == 1 and self.groups > 1
        self._dw_channels_last = False  # decided by _infer from the map size
        self.pointwise = self.k == (1, 1) and self.s == (1, 1) and self.groups == 1
        self._load_params((self.cout, self.cg, *self.k), self.cout)

    def _infer(self, shape: Chw) -> Chw:
        c, h, w = shape
        if c != self.cg * self.groups:
            raise self.fail(f"input has {c} channels but kernelChannels {self.cg} x nGroups "
                            f"{self.groups} = {self.cg * self.groups}")
        self.hw_out, self.pads = spatial(self.name, self.p, "ConvolutionPaddingType", (h, w),
                                         self.k_eff, self.s)
        self.pointwise = self.pointwise and not any(self.pads)
        # Small maps with many channels (a MobileNet's later blocks) run channels-last:
        # numpy's inner loop then runs along the channels (one weight each, contiguous)
        # instead of along a row of a few pixels times one broadcast weight, where the
        # per-row overhead dominates (measured 3-6x faster for 12x12 maps and smaller; see
        # benchmarks/README.md). The output is a channels-last array seen as (B, C, H, W);
        # every kernel reads its inputs through strides, and the 1x1 fast path keeps the
        # layout, so a run of such blocks never transposes.
        self._dw_channels_last = (self.depthwise and self.cout == self.groups
                                  and self.cout >= self.hw_out[1])
        return self.cout, *self.hw_out

    def _wg(self) -> Arr:
        return self.W.reshape(self.groups, self.cout // self.groups, -1)

    def forward(self, x: Arr, keep: bool) -> Arr:
        if self.depthwise:
            if self._dw_channels_last:
                xp = pad_channels_last(x, self.pads)
                y = self._dw_forward_channels_last(xp)
                self._xp = xp.transpose(0, 3, 1, 2) if keep else None
            else:
                xp = pad(x, self.pads, 0.0)
                y = self._dw_forward(xp)
                self._xp = xp if keep else None
        elif self.pointwise and not keep:
            # 1×1, stride 1, unpadded: one matmul on the map as it lies, no im2col copy
            # (MobileNet's expand / project layers)
            n, c, h, w = x.shape
            xl = x.transpose(0, 2, 3, 1)
            if xl.flags.c_contiguous:  # channels-last memory (see _dw_channels_last)
                y = (xl.reshape(-1, c) @ self.W.reshape(self.cout, c).T).reshape(
                    n, h, w, self.cout).transpose(0, 3, 1, 2)
            else:
                y = np.matmul(self.W.reshape(self.cout, c), x.reshape(n, c, h * w)).reshape(
                    n, self.cout, h, w)
        else:
            xp = pad(x, self.pads, 0.0)
            y, cols = correlate(xp, self._wg(), self.groups, self.k, self.s, self.d,
                                self.hw_out)
            self._cols = cols if keep else None
        if self.b is not None:
            y += self.b[:, None, None]
        return y

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if self.depthwise:
            return self._dw_backward(dy, need_dx)
        n = dy.shape[0]
        g, cog = self.groups, self.cout // self.groups
        # (G, Cout/G, M): free when dy kept the (C, B, H, W) memory order of the forward pass
        dyg = dy.transpose(1, 0, 2, 3).reshape(g, cog, -1)
        if self.updatable:
            assert self._cols is not None  # kept by the forward pass that grad follows
            self.dW = np.matmul(dyg, self._cols.transpose(0, 2, 1)).reshape(self.w_shape)
            self.db = dyg.sum(axis=2).reshape(-1) if self.b is not None else None
        if not need_dx:
            return None
        # dx = stride-1 correlation of the stride-up-sampled, padded dy with the flipped
        # kernel, channels swapped per group: the transposed convolution, still im2col.
        (h, w), (ho, wo) = self.in_shape[1:], self.hw_out
        (keh, kew), (sh, sw) = self.k_eff, self.s
        pt, pb, pl, pr = self.pads
        big = np.zeros((n, self.cout, h + pt + pb + keh - 1, w + pl + pr + kew - 1), dy.dtype)
        big[:, :, keh - 1:keh - 1 + (ho - 1) * sh + 1:sh,
            kew - 1:kew - 1 + (wo - 1) * sw + 1:sw] = dy
        region = big[:, :, pt:pt + h + keh - 1, pl:pl + w + kew - 1]
        wt = self.W.reshape(g, cog, self.cg, *self.k)[:, :, :, ::-1, ::-1]
        wt = wt.transpose(0, 2, 1, 3, 4).reshape(g, self.cg, -1)
        return correlate(region, wt, g, self.k, (1, 1), self.d, (h, w))[0]

    # -- depthwise: one strided slice per kernel tap ---------------------------------------
    def _dw_weights(self) -> Arr:
        """(C_in, multiplier, kh, kw): output channel c·m + j reads input channel c."""
        return self.W.reshape(self.groups, self.cout // self.groups, *self.k)

    def _dw_forward(self, xp: Arr) -> Arr:
        n, c = xp.shape[:2]
        wd = self._dw_weights()
        m = wd.shape[1]
        y = np.empty((n, c, m, *self.hw_out), xp.dtype)
        tmp = np.empty_like(y)  # one temporary for all taps: no allocation per tap
        for t, (i, j) in enumerate(np.ndindex(*self.k)):
            rs, cs = tap(i, j, self.s, self.d, self.hw_out)
            sl = xp[:, :, None, rs, cs]  # (B, C, 1, Ho, Wo)
            if t == 0:
                np.multiply(sl, wd[:, :, i, j][:, :, None, None], out=y)
            else:
                np.multiply(sl, wd[:, :, i, j][:, :, None, None], out=tmp)
                y += tmp
        return y.reshape(n, c * m, *self.hw_out)

    def _dw_forward_channels_last(self, xp: Arr) -> Arr:
        """Depthwise (multiplier 1) on a padded (B, H, W, C) map; returns (B, C, Ho, Wo)
        seen through a channels-last array."""
        wt = self.W.reshape(self.cout, *self.k)  # (C, kh, kw)
        n, c = xp.shape[0], xp.shape[3]
        y = np.empty((n, *self.hw_out, c), xp.dtype)
        tmp = np.empty_like(y)
        for t, (i, j) in enumerate(np.ndindex(*self.k)):
            rs, cs = tap(i, j, self.s, self.d, self.hw_out)
            w_ij = np.ascontiguousarray(wt[:, i, j])
            if t == 0:
                np.multiply(xp[:, rs, cs, :], w_ij, out=y)
            else:
                np.multiply(xp[:, rs, cs, :], w_ij, out=tmp)
                y += tmp
        return y.transpose(0, 3, 1, 2)

    def _dw_backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        xp = self._xp
        assert xp is not None  # kept by the forward pass that grad follows
        n, c = dy.shape[0], self.groups
        wd = self._dw_weights()
        m = wd.shape[1]
        dyr = dy.reshape(n, c, m, *self.hw_out)
        dxp = np.zeros_like(xp) if need_dx else None
        dwd = np.zeros_like(wd) if self.updatable else None
        for i in range(self.k[0]):
            for j in range(self.k[1]):
                rs, cs = tap(i, j, self.s, self.d, self.hw_out)
                if dwd is not None:
                    dwd[:, :, i, j] = np.einsum("bcmhw,bchw->cm", dyr, xp[:, :, rs, cs])
                if dxp is not None:
                    dxp[:, :, rs, cs] += np.einsum("bcmhw,cm->bchw", dyr, wd[:, :, i, j])
        if dwd is not None:
            self.dW = dwd.reshape(self.w_shape)
            self.db = dy.sum(axis=(0, 2, 3)) if self.b is not None else None
        if dxp is None:
            return None
        h, w = self.in_shape[1:]
        pt, _, pl, _ = self.pads
        return dxp[:, :, pt:pt + h, pl:pl + w]
