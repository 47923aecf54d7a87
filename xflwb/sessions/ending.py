"""Why a session ended, in words: the one place every view asks (the dashboard header,
``xflwb.report``, ``repr(session)``, ``RemoteSession``, ``wb.session_table``).

A session row says *that* it ended (``status``) and, when it failed, crashed or was stopped
by its kernel's exit, the reason (``error``). A session that ran out of privacy budget ends
``finished`` like one that ran every round: the difference is in its metrics
(``privacy_budget_spent`` and ``epsilon_next_round`` at the last round run, beside the
ledger's ``epsilon``), so the reason is computed from the row and its metrics together.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from xflwb.sessions.options import is_asynchronous
from xflwb.sessions.status import SessionStatus

#: how much of a failure's reason a one-line view shows (the header shows it all)
SHORT = 200


def needs_history(info: dict[str, Any]) -> bool:
    """Whether ``end_reason`` of this row reads the metrics: a finished session that had a
    privacy budget (so a table of many sessions reads few histories)."""
    privacy = (info.get("config") or {}).get("privacy") or {}
    return info.get("status") == SessionStatus.FINISHED and bool(privacy.get("max_epsilon"))


def end_reason(info: dict[str, Any], history: pd.DataFrame | None = None) -> str | None:
    """Why the session of row ``info`` ended (None while it runs):

    * ``"finished all 8 rounds"`` (FedBuff: ``"… model versions"``);
    * ``"privacy budget spent at ε = 7.08 (max_epsilon 8) after round 6; round 7 would
      reach ε = 8.3"``;
    * ``"failed: <reason>"`` / ``"crashed: <reason>"`` (one line: a traceback's last);
    * ``"stopped by the user"``, or ``"stopped: <reason>"`` when its kernel exited.

    ``history``: the session's long metrics table (round, platform, metric, value); needed
    only when ``needs_history(info)``."""
    status = info.get("status")
    if status not in (SessionStatus.FINISHED, SessionStatus.FAILED, SessionStatus.STOPPED,
                      SessionStatus.CRASHED):
        return None
    if status == SessionStatus.FINISHED:
        spent = _budget_spent(info, history)
        return spent or _finished(info)
    reason = short_error(info.get("error"))
    if status == SessionStatus.STOPPED:
        return f"stopped: {reason}" if reason else "stopped by the user"
    return f"{status}: {reason or 'no reason recorded'}"


def short_error(error: Any) -> str:
    """One line of an error: a traceback's last line (the exception), else the first line,
    at most ``SHORT`` characters."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    more = len(lines) > 1 and not lines[0].startswith("Traceback")
    if len(line) > SHORT:
        return line[:SHORT - 1] + "…"
    return line + (" …" if more else "")


def _finished(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    unit = "model versions" if is_asynchronous(cfg) else "rounds"
    planned, done = int(cfg.get("rounds") or 0), int(info.get("round") or 0)
    if done >= planned:
        return f"finished all {planned} {unit}"
    return f"finished after {done} of {planned} {unit}"


def _metric(history: pd.DataFrame, name: str) -> pd.Series:
    """The ``all`` platform's values of metric ``name``, indexed by round."""
    rows = history[(history["metric"] == name) & (history["platform"] == "all")]
    return rows.set_index("round")["value"].dropna()


def _budget_spent(info: dict[str, Any], history: pd.DataFrame | None) -> str | None:
    """The budget-spent sentence, from the metrics the session recorded when its ledger
    refused the next round (``PrivacyBudgetSpent``); None if it did not."""
    if history is None or history.empty or not needs_history(info):
        return None
    flag = _metric(history, "privacy_budget_spent")
    if flag.empty:
        return None
    last = int(flag.index.max())  # the last round run (in the history's numbering)
    cap = float(info["config"]["privacy"]["max_epsilon"])
    eps = _metric(history, "epsilon")
    eps = eps[eps.index <= last]
    nxt = _metric(history, "epsilon_next_round")
    would = (f"; round {last + 1} would reach ε = {float(nxt.iloc[-1]):.3g}"
             if len(nxt) and math.isfinite(float(nxt.iloc[-1])) else "")
    if eps.empty:  # the lineage spent it before this session released a round
        return f"privacy budget spent before round {last + 1} (max_epsilon {cap:g}){would}"
    return (f"privacy budget spent at ε = {float(eps.iloc[-1]):.3g} (max_epsilon {cap:g}) "
            f"after round {last}{would}")
