"""SecAgg+ sums decoded into a mean policy (``secure_sums``).

Under Flower's SecAgg+ workflow the server never sees one client's update: every surviving
client's result carries the workflow's one unmasked aggregate (``xflwb.simulation.secagg``),
over clients i with weights w_i (num_examples; 1 each under DP): per canonical tensor
``A_k = Σ w·m_k·x_k / W``, per tensor ``B_k = Σ w·m_k / W``, then ``U = Σ w / W``. The
masked average is ``A_k / B_k`` over the tensors someone trained; it enters the policy as
one contribution (per tensor: under DP, weighted by its count of clients ``N·B_k/U``, which
the noise is calibrated to), so the server optimiser and the noise apply to it. DP clients
clipped their update themselves (Flower's fl-dp-sa); their reported bits are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge.arrays import Array

__all__ = ["add_secure_sums"]


def add_secure_sums(policy: Any, arrays: Sequence[Array], global_: Sequence[Array],
                    counts: Sequence[int], bits: Sequence[float | None] = ()) -> None:
    """Decode the unmasked ``arrays`` (sums, per-tensor weights, the count) of a round whose
    clients declared ``counts`` examples into ``policy`` (a mean, or ``Private`` over one:
    its clients' reported ``bits`` are counted). ``ValueError`` when they do not fit."""
    k = len(global_)
    if len(arrays) != 2 * k + 1:
        raise ValueError(f"expected {2 * k + 1} tensors (sums, weights, count), got "
                         f"{len(arrays)}")
    total = float(np.asarray(arrays[2 * k]).reshape(-1)[0])
    # share of the weight behind each tensor; a tensor trained by the lightest client
    # alone has min(w) / Σw, below half of that it is quantisation noise
    shares = [float(np.asarray(w).reshape(-1)[0]) / total for w in arrays[k:2 * k]]
    private = getattr(policy, "dp", None) is not None
    lightest = 1 / len(counts) if private else min(counts) / sum(counts)
    mask = [s > 0.5 * lightest for s in shares]
    average = [np.asarray(a, np.float64).reshape(g.shape) / (s * total) if t else g
               for a, s, t, g in zip(arrays[:k], shares, mask, global_, strict=True)]
    average = [np.asarray(a, np.float32) for a in average]
    examples = int(sum(counts))
    if not private:
        policy.add_sum(average, 1, mask, examples)
        return
    clients = [round(s * len(counts)) if t else 0 for s, t in zip(shares, mask, strict=True)]
    for c in sorted(set(clients) - {0}):  # one contribution per count: the noise's c_k
        policy.add_sum(average, c, [n == c for n in clients], examples)
        examples = 0
    policy.reported(bits)
