"""What a round produced (``RoundReport``), how its failures are told (``summarize``), and
the session-ending failure (``AllClientsFailed``).

Hosts persist reports (the registry's metrics, rejections, evaluations, failures) and
raise nothing of their own for a round: the driver and the adapter hand the report over,
then raise ``AllClientsFailed`` when ``failed`` is set.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from xflwb.errors import SessionFailure

__all__ = ["MAX_REASONS", "AllClientsFailed", "Failure", "RoundReport", "summarize"]

#: how many distinct failure reasons a session's error quotes (the rest are counted)
MAX_REASONS = 3


class AllClientsFailed(SessionFailure):
    """Every client selected for a round failed, at least one with an error (not a lost
    connection): the next round would fail the same way, so the session fails with the
    clients' reasons instead of waiting for clients that will not come."""


@dataclass(frozen=True)
class Failure:
    """A client whose fit failed, as its host describes it: ``is_error`` False for a lost
    connection or a timeout (a phone may come back), True for an error (the next round
    would fail the same way). Both drivers (``rounds``, ``versions``) take it."""

    platform: str
    client: str
    reason: str
    is_error: bool = True


@dataclass
class RoundReport:
    """What one round produced, handed to the session for persistence."""

    round: int
    metrics: list[tuple[str, str, float | None]] = field(default_factory=list)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)  # platform, cid, why
    #: platform, cid, loss, examples, accuracy (None: the client reported none)
    evaluations: list[tuple[str, str, float, int, float | None]] = field(
        default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # platform, cid, why
    #: set when every selected client failed with an error: the session fails after this
    #: round's record (no checkpoint, the round does not count)
    failed: str | None = None
    #: with DP, the round's ``PrivacyEvent`` when it released a model (persisted before
    #: the model is: the lineage's ledger)
    privacy_event: Any = None


_NUMBER = re.compile(r"\d+(\.\d+)?")


def summarize(reasons: list[str], limit: int = MAX_REASONS) -> str:
    """Distinct reasons, most frequent first, each with its count; the rest counted.

    Reasons that differ only in numbers (each device's sample count in the same shape
    error) count as one, quoted as the first of them."""
    first: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for r in reasons:
        key = _NUMBER.sub("#", r)
        first.setdefault(key, r)
        counts[key] += 1
    parts = [f"{first[k]} (×{n})" if n > 1 else first[k] for k, n in counts.most_common(limit)]
    rest = sum(n for _, n in counts.most_common()[limit:])
    if rest:
        parts.append(f"and {rest} more")
    return "; ".join(parts)
