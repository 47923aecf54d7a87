"""One ε ledger per model lineage: what a resumed phone session inherits (issue 20).

A phone session that resumes (``resume=True``, the phones' auto-start, a restart after a
crash) continues a model whose earlier rounds were released to phones by other sessions:
the one whose checkpoint it resumed from, the one *that* session resumed from, and so on.
Their data contributors are the same phones, so ε is the lineage's, not the session's.

* **What counts**: every round any ancestor session released (``privacy_events``), not only
  the rounds up to the checkpoint resumed from. Rounds after that checkpoint (a corrupt
  newest checkpoint, a fallback) are not in the resumed model, but their models went out
  to phones; counting them is the conservative choice for the privacy of the data.
* **How**: each round's event is stored by the session that released it (``Registry.
  add_privacy_event``, written before the model it contains is released, so a crash can
  only over-count) and composed again here, as recorded: other noise multipliers and
  populations compose as they were (heterogeneous events); ε is stated at the resuming
  session's ``target_delta`` over all the RDP curves (RDP composes whatever δ each session
  stated ε at).
* **The walk** follows ``lineages`` (written at each session's start, so it survives
  checkpoint retention); sessions of an older xflwb are followed through their
  ``resumed_from`` checkpoint, and their rounds, never recorded, make ε unknown (∞).
* **Gaps**: resuming a DP lineage without DP, or with DP a lineage that released rounds
  without it (ε is then ∞), is refused at start with the reason, unless the session says
  ``allow_privacy_gap=True``: then it runs and records ``privacy_gap`` = 1 at its first
  round (without DP: the lineage has no guarantee from that round on; with DP: ε stays ∞,
  so ``max_epsilon`` cannot be met and is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from xflwb.errors import PrivacyError
from xflwb.federation.dp import Ledger, PrivacyEvent
from xflwb.sessions.registry import NotFound, Registry


class PrivacyLineageError(PrivacyError, RuntimeError):
    """A resume the lineage's privacy does not allow; the message says why and what to do."""


@dataclass
class Ancestor:
    """One session of the lineage and the rounds it released."""

    session_id: int
    private: bool  # it ran with DP
    events: list[PrivacyEvent]
    #: why its released rounds cannot be composed (None: they can)
    unaccounted: str | None = None


@dataclass
class Lineage:
    """The sessions a resumed session continues, nearest first."""

    ancestors: list[Ancestor] = field(default_factory=list)

    @property
    def events(self) -> list[PrivacyEvent]:
        """Every released round, oldest session first (placeholders without noise for
        rounds that cannot be composed: ε is then infinite)."""
        out: list[PrivacyEvent] = []
        for a in reversed(self.ancestors):
            out += a.events
            if a.unaccounted:
                out.append(PrivacyEvent(0, 0, 0.0))
        return out

    @property
    def private(self) -> list[Ancestor]:
        """The ancestors that released rounds with DP (or, of an older xflwb, ran with DP
        and released rounds it never recorded)."""
        return [a for a in self.ancestors
                if a.private and (any(e.private for e in a.events) or a.unaccounted)]

    def unprotected(self) -> list[str]:
        """Why the lineage's ε is infinite: rounds released without DP or never recorded."""
        why = []
        for a in self.ancestors:
            plain = [e for e in a.events if not e.private]
            if plain:
                why.append(f"session {a.session_id} released {len(plain)} round(s) without "
                           "differential privacy")
            if a.unaccounted:
                why.append(a.unaccounted)
        return why

    def describe(self) -> str:
        ids = [a.session_id for a in self.ancestors]
        rounds = sum(len(a.events) for a in self.ancestors)
        return (f"session{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} "
                f"({rounds} released round{'s' if rounds != 1 else ''})")


def _parent(registry: Registry, info: dict[str, Any]) -> tuple[int | None, str | None]:
    """(the session ``info`` continues, why the walk cannot go on): its ``lineages`` row,
    else (an older xflwb) the checkpoint it resumed from."""
    row = registry.get_lineage(info["id"])
    if row is not None:
        return row["parent_id"], None
    ckpt_id = info.get("resumed_from")
    if ckpt_id is None:
        return None, None
    ckpt = registry.get_checkpoint(ckpt_id)
    if ckpt is None:
        return None, (f"session {info['id']} resumed from checkpoint {ckpt_id}, which is no "
                      "longer in the registry: the rounds before it are unknown")
    return int(ckpt["session_id"]), None


def walk(registry: Registry, session_id: int | None) -> Lineage:
    """The lineage ending at ``session_id`` (the session whose checkpoint is resumed; None:
    a fresh start, an empty lineage)."""
    lineage = Lineage()
    seen: set[int] = set()
    sid = session_id
    while sid is not None and sid not in seen:
        seen.add(sid)
        try:
            info = registry.get_session(sid)
        except NotFound:
            lineage.ancestors.append(Ancestor(sid, False, [], f"session {sid} is no longer "
                                              "in the registry: its rounds are unknown"))
            break
        events = [PrivacyEvent(int(r["population"]), int(r["sample_size"]),
                               float(r["noise_multiplier"]), r["target_delta"])
                  for r in registry.get_privacy_events(sid)]
        unaccounted = None
        if registry.get_lineage(sid) is None and not events and int(info["round"]) > 0:
            unaccounted = (f"session {sid} released {info['round']} round(s) before xflwb "
                           "recorded privacy events: they cannot be composed")
        parent, broken = _parent(registry, info)
        lineage.ancestors.append(Ancestor(sid, info["config"].get("privacy") is not None,
                                          events, unaccounted or broken))
        sid = parent
    return lineage


@dataclass
class Plan:
    """What a starting session does about its lineage's privacy."""

    events: list[PrivacyEvent]  # to restore into its ledger (DP sessions)
    gap: str | None = None  # the allowed gap, recorded as ``privacy_gap`` and logged


def plan(lineage: Lineage, privacy: dict[str, Any] | None, allow_gap: bool,
         what: str) -> Plan:
    """Check a session's ``privacy`` against the ``lineage`` it resumes (``what``: the
    model and round, for messages); ``PrivacyLineageError`` when it may not start."""
    how = ("start fresh with resume=False (a new model, a new ledger), or pass "
           "allow_privacy_gap=True to continue and record the gap in the history")
    if privacy is None:
        dp = lineage.private
        if not dp:
            return Plan([])
        deltas = [e.target_delta for a in dp for e in a.events if e.target_delta]
        ledger = Ledger(float(deltas[0]) if deltas else 1e-5)  # the nearest session's δ
        eps = ledger.restore(lineage.events)
        spent = f"ε = {eps:.4g}" if math.isfinite(eps) else "ε = ∞"
        why = (f"{what} continues {lineage.describe()} that ran with differential privacy "
               f"({spent} so far); a session without privacy would release its models "
               "with no guarantee")
        if not allow_gap:
            raise PrivacyLineageError(
                f"refused: {why}. Resume with the lineage's privacy (privacy=xflwb.DP(...)) "
                f"to keep composing its ledger, or {how}")
        return Plan([], gap=f"privacy gap allowed: {why}")
    unprotected = lineage.unprotected()
    if not unprotected:
        return Plan(lineage.events)
    why = (f"{what} continues {lineage.describe()}, whose ε is infinite: "
           + "; ".join(unprotected))
    if not allow_gap:
        raise PrivacyLineageError(f"refused: {why}. No privacy budget can be stated for "
                                  f"this model; {how} (ε then stays ∞)")
    if privacy.get("max_epsilon") is not None:
        raise PrivacyLineageError(f"refused: {why}, so max_epsilon "
                                  f"{privacy['max_epsilon']:g} can never be met; start fresh "
                                  "with resume=False, or drop max_epsilon")
    return Plan(lineage.events, gap=f"privacy gap allowed: {why}; ε stays ∞")


def start(registry: Registry, session_id: int, offset: int, plan: Plan, dp: Any,
          log: Any) -> None:
    """Carry ``plan`` out in a starting session: restore the lineage's events into its
    ledger (``dp``: its ``CentralDP``, None without DP), refuse a lineage whose budget is
    already spent, and record the lineage's ε at round ``offset`` (where it resumes) and an
    allowed gap at its first round."""
    if dp is not None and plan.events:
        eps = dp.restore(plan.events)
        limit = dp.config.max_epsilon
        shown = f"{eps:.4g}" if math.isfinite(eps) else "∞"
        if limit is not None and eps >= limit:
            raise PrivacyLineageError(
                f"refused: the model's lineage has spent its privacy budget: ε = {shown} "
                f"≥ max_epsilon {limit:g} over {len(plan.events)} released rounds; no "
                "round can run. Start fresh with resume=False (a new model, a new ledger)")
        log.info("privacy: restored %d released round(s) of the lineage; ε = %s at δ = %g "
                 "before this session's first round", len(plan.events), shown,
                 dp.ledger.delta)
        registry.add_metrics(session_id, offset,
                             [("all", "epsilon", eps if math.isfinite(eps) else None)])
    if plan.gap:
        log.warning("%s (from round %d on)", plan.gap, offset + 1)
        registry.add_metrics(session_id, offset + 1, [("all", "privacy_gap", 1.0)])
