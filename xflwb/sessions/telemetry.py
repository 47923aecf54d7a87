"""Telemetry ↔ evaluation matching: which platform a phone's telemetry speaks for.

FedKit's telemetry carries no platform, and gRPC carries no device id; but a device reports
the same loss and test size in its EvaluateRes (platform known from the port) and in
``telemetry/evaluate_ins``. Whichever of the two arrives second makes the match, looked up
by key through the registry's ``TELEMETRY_MATCH`` / ``EVALUATION_MATCH`` indexes (never a
scan of every unmatched row). The registry calls these inside its own transaction ``c``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import sqlalchemy as sa

from xflwb.sessions.registry import TelemetryRefused, devices, evaluations, telemetry

log = logging.getLogger(__name__)


def loss_range(loss: float) -> tuple[float, float]:
    """The losses that count as "the same" (devices and JSON round floats differently)."""
    tol = 1e-4 * max(1.0, abs(loss))
    return loss - tol, loss + tol


def attribute(c: Any, tid: int, eid: int, device_id: int, platform: str, rnd: int) -> None:
    """Record a match: the telemetry row gets the platform and round, the evaluation its
    telemetry id, and a device not yet bound is bound to the platform (once, for good)."""
    c.execute(telemetry.update().where(telemetry.c.id == tid).values(
        platform=platform, round=rnd))
    c.execute(evaluations.update().where(evaluations.c.id == eid).values(
        telemetry_id=tid))
    c.execute(devices.update().where(devices.c.id == device_id,
                                     devices.c.platform.is_(None)).values(
        platform=platform))


def match_telemetry(c: Any, tid: int, session_id: int, device_id: int, bound: str | None,
                    loss: float | None, test_size: int | None) -> bool:
    """Match a new evaluate telemetry row with an unmatched evaluation; refuse it
    (``TelemetryRefused``) when it matches only evaluations of a platform other than the
    one its device is ``bound`` to."""
    if loss is None or test_size is None or not np.isfinite(loss):
        return False
    lo, hi = loss_range(float(loss))
    q = (evaluations.select().where(
        evaluations.c.session_id == session_id, evaluations.c.telemetry_id.is_(None),
        evaluations.c.num_examples == int(test_size),
        evaluations.c.loss.between(lo, hi)).order_by(evaluations.c.id).limit(8))
    found = c.execute(q).all()
    ok = [e for e in found if bound is None or e.platform == bound]
    if not ok:
        if found:
            raise TelemetryRefused(
                f"device {device_id} is a {bound} device (bound at its first evaluation),"
                f" but this telemetry matches a {found[0].platform} evaluation: another "
                "phone seems to use its device_id")
        return False
    attribute(c, tid, ok[0].id, device_id, ok[0].platform, ok[0].round)
    return True


def match_evaluation(c: Any, eid: int, session_id: int, rnd: int, platform: str,
                     loss: float | None, n: int) -> bool:
    """Match a new evaluation with unmatched evaluate telemetry of a device that is not
    bound to another platform (telemetry of a device bound elsewhere stays unmatched)."""
    if loss is None or not np.isfinite(loss):
        return False
    lo, hi = loss_range(float(loss))
    q = (sa.select(telemetry.c.id, telemetry.c.device_id, devices.c.platform)
         .join(devices, devices.c.id == telemetry.c.device_id, isouter=True)
         .where(telemetry.c.session_id == session_id, telemetry.c.kind == "evaluate",
                telemetry.c.platform.is_(None), telemetry.c.test_size == int(n),
                telemetry.c.loss.between(lo, hi))
         .order_by(telemetry.c.id).limit(8))
    for t in c.execute(q).all():
        if t.platform not in (None, platform):
            log.warning("session %s: telemetry %s of device %s (a %s device) matches a "
                        "%s evaluation: not attributed (a reused device_id?)",
                        session_id, t.id, t.device_id, t.platform, platform)
            continue
        attribute(c, t.id, eid, t.device_id, platform, rnd)
        return True
    return False
