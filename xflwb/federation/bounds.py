"""``Bounds``: how much one update may weigh and how far it may move the model, relative to
its peers (today's ``max_weight_ratio`` / ``max_norm_ratio``; the rules are
``xflwb.federation.influence``).

It holds the per-platform windows of recent norms, which live as long as the session (across
rounds and FedBuff versions), and applies both bounds to one accepted update. Hosts and
drivers call it between the gate and the policy; policies that bound outliers themselves
(robust rules), that weigh every update 1 and clip (DP), or that never see a single update
(secure sums) run without the norm bound (``max_norm_ratio`` None).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from xflwb.bridge.arrays import Array
from xflwb.federation.aggregate import update_norm
from xflwb.federation.gate import NonFiniteUpdate
from xflwb.federation.influence import WARM, PeerWindow, weight_cap
from xflwb.federation.update import Update

__all__ = ["Bounds"]


class Bounds:
    """The relative bounds of one session.

    ``masks``: each platform's trained mask (a platform's norm is over the tensors it
    trains: an Android update of a transfer model moves adapter, BatchNorm and head, an iOS
    one only the head, so a platform's peers are the clients of the same platform).
    """

    def __init__(self, masks: dict[str, list[bool]], max_weight_ratio: float | None,
                 max_norm_ratio: float | None) -> None:
        self.masks = masks
        self.max_weight_ratio = None if max_weight_ratio is None else float(max_weight_ratio)
        self.max_norm_ratio = None if max_norm_ratio is None else float(max_norm_ratio)
        self.norms: defaultdict[str, PeerWindow] = defaultdict(PeerWindow)

    def cap(self, claims: Iterable[int]) -> int | None:
        """The most examples one update of a round may count for, from the round's claims
        (``max_weight_ratio`` × their lower median), or None."""
        return weight_cap(claims, self.max_weight_ratio)

    def warming(self, platform: str) -> bool:
        """Whether ``platform`` has fewer than ``WARM`` clients' norms known (its updates
        are then judged against the round's: ``observe`` them all first)."""
        return (self.max_norm_ratio is not None and platform in self.masks
                and len(self.norms[platform]) < WARM)

    def observe(self, update: Update, base: Sequence[Array]) -> None:
        """Remember ``update``'s norm among its platform's peers, judging nothing."""
        norm = update_norm(update.tensors, list(base), self.masks[update.platform])
        self.norms[update.platform].observe(update.client, norm)

    def bound(self, platform: str, client: str, tensors: Sequence[Array], n: int,
              base: Sequence[Array], cap: int | None = None,
              scale: float = 1.0) -> tuple[int, bool]:
        """(examples the update counts for, whether ``cap`` cut them), or
        ``UpdateTooLarge`` when its norm exceeds ``max_norm_ratio`` × the median of recent
        clients' norms. Its norm is remembered first, rejected or not: one entry per client
        moves no median, and a fleet whose updates all grow is followed instead of rejected
        for ever. ``scale``: FedBuff's staleness weight, so what is judged is the step the
        update will make."""
        if self.max_norm_ratio is not None:
            norm = update_norm(list(tensors), list(base), self.masks[platform]) * scale
            if not np.isfinite(norm):
                raise NonFiniteUpdate("update contains NaN or inf (in float32)")
            peers = self.norms[platform]
            peers.observe(client, norm)
            peers.check(norm, self.max_norm_ratio, platform)
        if cap is not None and n > cap:
            return cap, True
        return n, False

    def apply(self, update: Update, base: Sequence[Array], cap: int | None = None,
              scale: float = 1.0) -> Update:
        """``bound`` on an ``Update``: its ``examples`` cut to ``cap`` (``capped`` set)."""
        n, cut = self.bound(update.platform, update.client, update.tensors, update.examples,
                            base, cap, scale)
        update.examples = n
        update.capped = update.capped or cut
        return update
