"""One ε ledger per model lineage (issue 20, item 1): a resumed session — after kill -9, after
a stop, with other DP settings — composes every round its lineage released, checked against
dp-accounting on the full event list; privacy gaps are refused unless allowed, and recorded.

Real sessions (their own processes, real gRPC on loopback) with scripted wire phones."""

from __future__ import annotations

import os
import signal
import threading

import dp_accounting
import keras
import pytest
from dp_accounting import rdp

import xflwb
from tests.support import wait_until
from tests.wirephone import WirePhone

NAME, DATA = "dp_line", "line-data"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    return xflwb.export(model, name=NAME, data_type=DATA, out_dir=tmp_path_factory.mktemp("l"))


def _phones(wb, n: int, first_id: int, hold: threading.Event | None = None,
            hold_from: int = 2) -> list[tuple[WirePhone, threading.Thread]]:
    """``n`` phones sending updates far beyond the clipping norm; with ``hold``, each
    blocks its fit number ``hold_from`` (0-based) until ``hold`` is set."""

    def update(ts, rnd):
        if hold is not None and rnd >= hold_from:
            hold.wait(60)
        return [t + 0.5 for t in ts]

    phones = [WirePhone(wb.url, "android", DATA, update, device_id=first_id + k)
              for k in range(n)]
    return [(p, p.start()) for p in phones]


def _join(phones) -> None:
    for _, thread in phones:
        thread.join(60)


def _wait_round(session, rnd: int, timeout: float = 90) -> None:
    wait_until(lambda: session.round >= rnd, timeout, f"round {rnd}",
               describe=lambda: session.info)
    assert session.round == rnd, session.info


def _events(wb, *sessions) -> list[tuple[int, int, float]]:
    return [(e["population"], e["sample_size"], e["noise_multiplier"])
            for s in sessions for e in wb.registry.get_privacy_events(s.id)]


def _dp_accounting(events, delta: float) -> float:
    """ε of ``events`` composed by a plain dp-accounting accountant (no cache, no xflwb)."""
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for population, sample, z in events:
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample, dp_accounting.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


def _metric(session, name: str):
    h = session.history
    return h.query(f"metric == '{name}' and platform == 'all'")


def test_kill_9_mid_round_then_resume_composes_the_lineage_and_max_epsilon_bounds_it(
        export, tmp_path):
    """The issue's case: DP(1, 0.5, max_epsilon=10), 2 clients, rounds 1–2, kill -9 in round
    3, resume: the lineage's 3rd round reaches ε 9.01, its 4th (10.73) is refused."""
    dp = xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5, max_epsilon=10.0)
    release = threading.Event()
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        s1 = wb.train(NAME, rounds=10, min_clients=2, round_timeout=60, privacy=dp)
        first = _phones(wb, 2, 1, hold=release)
        _wait_round(s1, 2)  # rounds 1 and 2 released; both phones now hold round 3's fit
        os.kill(s1.info["pid"], signal.SIGKILL)
        wait_until(lambda: s1.status == "crashed", 10, "the killed session to read crashed",
                   describe=lambda: s1.info)
        release.set()
        _join(first)
        s2 = wb.train(NAME, rounds=10, min_clients=2, round_timeout=60, privacy=dp,
                      resume=True)
        second = _phones(wb, 2, 11)
        assert s2.wait(timeout=120) == "finished", s2.error
        _join(second)
        eps = _metric(s2, "epsilon").set_index("round")["value"]
        spent = _metric(s2, "privacy_budget_spent")
        # the lineage's 3rd round (s2's first): 9.01, not a fresh ledger's 4.73; a 4th round
        # would compose to 10.73 > 10
        assert eps[3] == pytest.approx(9.01, abs=0.01) and eps.index.max() == 3
        assert list(spent["round"]) == [3]
        events = _events(wb, s1, s2)
    assert events == [(2, 2, 1.0)] * 3  # every released round of both sessions, once
    # the lineage's ε where s2 resumed (round 2), then after its one round (round 3)
    assert eps[2] == pytest.approx(_dp_accounting(events[:2], 1e-5), rel=1e-9)
    assert eps[3] == pytest.approx(_dp_accounting(events, 1e-5), rel=1e-9)


def test_stop_then_resume_with_other_dp_settings_composes_heterogeneous_events(
        export, tmp_path):
    """Stopped after 2 rounds of z = 1 with 2 clients, resumed with z = 2, 3 clients and
    another δ: ε at the new δ over all four rounds, as dp-accounting composes them."""
    release = threading.Event()
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        s1 = wb.train(NAME, rounds=10, min_clients=2, round_timeout=60,
                      privacy=xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5))
        first = _phones(wb, 2, 1, hold=release)
        _wait_round(s1, 2)
        s1.stop()
        assert s1.status == "stopped"
        release.set()
        _join(first)
        s2 = wb.train(NAME, rounds=2, min_clients=3, round_timeout=60, resume=True,
                      privacy=xflwb.DP(noise_multiplier=2.0, clipping_norm=0.5,
                                       target_delta=1e-6))
        second = _phones(wb, 3, 11)
        assert s2.wait(timeout=120) == "finished", s2.error
        _join(second)
        eps = _metric(s2, "epsilon").set_index("round")["value"]
        full = [(2, 2, 1.0)] * 2 + [(3, 3, 2.0)] * 2
        assert eps[4] == pytest.approx(_dp_accounting(full, 1e-6), rel=1e-9)
        events = _events(wb, s1, s2)
    assert events == full
    assert list(eps.index) == [2, 3, 4]
    assert eps[4] > _dp_accounting(events[2:], 1e-6) + 1  # not the session's own ε


def test_privacy_gaps_are_refused_at_start_unless_allowed_and_then_recorded(export, tmp_path):
    dp = xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5)
    opts = {"rounds": 1, "min_clients": 1, "round_timeout": 60}
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)

        def run(**options):
            s = wb.train(NAME, **opts, **options)
            phone = _phones(wb, 1, 100 + s.id)
            assert s.wait(timeout=120) == "finished", s.error
            _join(phone)
            return s

        s1 = run(privacy=dp)
        # a DP lineage resumed without DP: refused before any phone trains, naming why
        with pytest.raises(RuntimeError, match=rf"refused: .*session {s1.id} .*differential "
                                               r"privacy.*allow_privacy_gap=True"):
            wb.train(NAME, **opts, resume=True)
        s2 = run(resume=True, allow_privacy_gap=True)  # allowed: the gap is in the history
        gap = _metric(s2, "privacy_gap")
        assert list(gap["round"]) == [2] and list(gap["value"]) == [1.0]
        assert _events(wb, s2) == [(0, 0, 0.0)]  # its round, released without noise
        # DP again on a lineage that released a round without it: ε is infinite
        with pytest.raises(RuntimeError, match=rf"ε is infinite: session {s2.id} released "
                                               r"1 round\(s\) without differential privacy"):
            wb.train(NAME, **opts, resume=True, privacy=dp)
        capped = xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5, max_epsilon=50.0)
        with pytest.raises(RuntimeError, match="max_epsilon 50 can never be met"):
            wb.train(NAME, **opts, resume=True, privacy=capped, allow_privacy_gap=True)
        s3 = run(resume=True, privacy=dp, allow_privacy_gap=True)
        eps = _metric(s3, "epsilon").set_index("round")["value"]
        gap = _metric(s3, "privacy_gap")
        statuses = [s["status"] for s in wb.registry.list_sessions()]
    assert list(eps.index) == [2, 3] and eps.isna().all()  # ε = ∞, stated as no value
    assert list(gap["round"]) == [3]
    assert statuses.count("failed") == 3  # the three refused starts, nothing else


def test_the_walk_needs_no_checkpoint_rows_and_counts_unrecorded_rounds_as_infinite(
        export, tmp_path):
    """Retention may delete checkpoint rows: ``lineages`` still links the sessions. A session
    of an older xflwb (no ``lineages`` row, rounds but no events) makes ε unknown: ∞."""
    import sqlalchemy as sa

    from xflwb.federation.dp import Ledger
    from xflwb.sessions import lineage
    from xflwb.sessions.registry import Registry, checkpoints

    reg = Registry(tmp_path / "xfl")
    model = reg.publish(export)
    dp = {"noise_multiplier": 1.0, "clipping_norm": 0.5}

    def session(parent: int | None, rnd: int, events, recorded: bool = True) -> int:
        sid = reg.create_session(model, {"privacy": dp}, engine="phone")
        if recorded:
            reg.set_lineage(sid, parent, rnd)
        if parent is not None:  # resumed_from: a checkpoint of the parent at ``rnd``
            ckpt = reg.add_checkpoint(parent, model, rnd, tmp_path / f"c{sid}.npz")
            reg.update_session(sid, resumed_from=ckpt)
        for k, (n, m, z) in enumerate(events, start=rnd + 1):
            reg.add_privacy_event(sid, k, n, m, z, 1e-5)
        reg.update_session(sid, status="finished", round=len(events) or 3)
        return sid

    old = session(None, 0, [], recorded=False)  # 3 rounds, never recorded
    s1 = session(old, 3, [(2, 2, 1.0)] * 2)
    s2 = session(s1, 5, [(3, 3, 2.0)])
    with reg.engine.begin() as c:  # retention deleted every checkpoint row
        c.execute(sa.delete(checkpoints))
    line = lineage.walk(reg, s2)
    assert [a.session_id for a in line.ancestors] == [s2, s1, old]
    assert line.unprotected() == [f"session {old} released 3 round(s) before xflwb "
                                  "recorded privacy events: they cannot be composed"]
    assert Ledger(1e-5).restore(line.events) == float("inf")
    recent = lineage.walk(reg, s2)
    recent.ancestors = recent.ancestors[:2]  # the recorded part composes as recorded
    assert [(e.population, e.sample_size, e.noise_multiplier) for e in recent.events] == \
        [(2, 2, 1.0)] * 2 + [(3, 3, 2.0)]
    assert Ledger(1e-6).restore(recent.events) == pytest.approx(_dp_accounting(
        [(2, 2, 1.0)] * 2 + [(3, 3, 2.0)], 1e-6), rel=1e-9)
    reg.close()
