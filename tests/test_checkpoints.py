"""Issue 20, item 6: checkpoint retention. A session keeps its last ``keep_checkpoints`` and
every ``keep_every``-th round's checkpoint, never one a resume or a report needs, and
``xflwb server status`` reports the disk use. Real sessions (scripted wire phones over real
gRPC), real files, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.wirephone import WirePhone
from xflwb.bridge import manifest as manifest_mod
from xflwb.server.config import SessionConfig
from xflwb.sessions.checkpoints import (
    Retention,
    load_checkpoint,
    prunable,
    prune_checkpoints,
    save_checkpoint,
)
from xflwb.sessions.registry import Registry, checkpoints
from xflwb.simulation.config import SimulationConfig

pytestmark = pytest.mark.timeout(300)

NAME, DATA = "keep", "keep-data"
ADMIN = {"Authorization": "Bearer secret"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    return xflwb.export(model, name=NAME, data_type=DATA,
                        out_dir=tmp_path_factory.mktemp("keep"))


def plus(k: float):
    return lambda tensors, _round: [t + k for t in tensors]


def rows_of(registry: Registry, session_id: int) -> list[dict]:
    """Every checkpoint row of a session, pruned or not, oldest first."""
    with registry.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(
            checkpoints.select().where(checkpoints.c.session_id == session_id)
            .order_by(checkpoints.c.id))]


def kept_rounds(registry: Registry, session_id: int) -> list[int]:
    return sorted(c["round"] for c in registry.checkpoints_newest_first(
        NAME, session_id=session_id))


def files_of(registry: Registry, session_id: int) -> list[int]:
    folder = registry.checkpoint_dir / NAME / f"session-{session_id}"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.npz"))


def xflwb_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "xflwb", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_fedbuff_session_keeps_last_n_every_kth_and_what_a_resume_needs(export, tmp_path):
    """12 FedBuff versions with keep_checkpoints=3, keep_every=5: versions 0 (the start),
    5, 10, 11, 12 stay on disk and in the registry; the pruned ones keep their rows (marked)
    but are never offered to a resume; a resume picks the newest; a file a crash left
    between marking and deleting is swept by the next session start; status reports it."""
    data = tmp_path / "xfl"
    with xflwb.Workbench(data_dir=data, port=0, admin_token="secret") as wb:
        wb.publish(export)
        s1 = wb.train(NAME, rounds=12, min_clients=1, round_timeout=60, strategy="fedbuff",
                      strategy_options={"buffer_size": 1, "evaluate_every": 0},
                      keep_checkpoints=3, keep_every=5)
        p1 = WirePhone(wb.url, "android", DATA, plus(0.5), device_id=1)
        p1.start().join(120)
        assert s1.wait(timeout=120) == "finished", s1.error
        reg = wb.registry
        assert kept_rounds(reg, s1.id) == [0, 5, 10, 11, 12]
        assert files_of(reg, s1.id) == [0, 5, 10, 11, 12]
        rows = rows_of(reg, s1.id)
        assert [r["round"] for r in rows] == list(range(13))  # history of every version
        assert sorted(r["round"] for r in rows if r["pruned"] is not None) == [
            1, 2, 3, 4, 6, 7, 8, 9]
        assert sorted(set(s1.history["round"])) == list(range(1, 13))
        newest = next(r for r in rows if r["round"] == 12)
        for got, want in zip(s1.global_parameters(),
                             load_checkpoint(newest["path"], newest["sha256"]), strict=True):
            np.testing.assert_array_equal(got, want)

        # a crash after marking round 11 pruned, before deleting its file: no resume is
        # offered it, and the next session's start deletes it
        r11 = next(r for r in rows if r["round"] == 11)
        reg.mark_checkpoints_pruned([r11["id"]])
        assert Path(r11["path"]).is_file()
        assert 11 not in kept_rounds(reg, s1.id)

        s2 = wb.train(NAME, rounds=4, min_clients=1, round_timeout=60, resume=True,
                      keep_checkpoints=2)
        p2 = WirePhone(wb.url, "android", DATA, plus(1.0), device_id=2)
        p2.start().join(120)
        assert s2.wait(timeout=120) == "finished", s2.error
        assert s2.info["resumed_from"] == newest["id"]
        assert s2.started_from == f"resumed from session {s1.id}, round 12"
        assert s2.first_round == 13
        for got, want in zip(p2.report.received[0], load_checkpoint(newest["path"]),
                             strict=True):
            np.testing.assert_allclose(got, want.ravel(), atol=1e-7)
        assert not Path(r11["path"]).exists()  # swept
        # s2: its start (round 12, the weights it resumed from) and its last 2
        assert kept_rounds(reg, s2.id) == [12, 15, 16] == files_of(reg, s2.id)
        # s1's checkpoints, the resumed-from round 12 among them, are untouched by s2
        assert kept_rounds(reg, s1.id) == [0, 5, 10, 12] == files_of(reg, s1.id)

        # what a report shows: the disk use, in %xfl_server status too
        from xflwb.magics import status_html

        page = status_html(wb, [])
        assert "7 files" in page and "pruned by retention" in page

        # the admin API refuses bad retention with the option's name
        for body in ({"keep_checkpoints": 0}, {"keep_every": -1}, {"keep_checkpoints": 1.5}):
            r = httpx.post(f"{wb.url}/api/v1/sessions", json={"model": NAME, **body},
                           headers=ADMIN, timeout=30)
            assert r.status_code == 422 and next(iter(body)) in r.text, r.text

    on_disk = sorted((data / "checkpoints").rglob("*.npz"))
    assert len(on_disk) == 7
    out = xflwb_cli("server", "status", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert "checkpoints  7 files, " in out.stdout
    assert f"({sum(p.stat().st_size for p in on_disk):,} bytes)" in out.stdout
    assert "7 kept, 11 pruned by retention" in out.stdout
    as_json = json.loads(xflwb_cli("server", "status", "--json", "--data-dir",
                                   str(data)).stdout)
    assert as_json["checkpoint_files"] == 7
    assert as_json["checkpoint_bytes"] == sum(p.stat().st_size for p in on_disk)
    assert as_json["database_bytes"] >= (data / "xflwb.db").stat().st_size > 0
    assert as_json["artifact_bytes"] > 0
    assert as_json["total_bytes"] > as_json["checkpoint_bytes"] + as_json["artifact_bytes"]


def test_server_status_names_a_data_dir_without_a_registry(tmp_path):
    out = xflwb_cli("server", "status", "--data-dir", str(tmp_path / "nothing"))
    assert out.returncode == 2
    assert "holds no xflwb registry" in out.stderr and "--data-dir" in out.stderr
    assert not (tmp_path / "nothing").exists()  # status creates nothing


@pytest.fixture
def registry(tmp_path, export):
    reg = Registry(tmp_path / "reg")
    yield reg, reg.publish(export)
    reg.close()


def test_prune_never_deletes_a_resumed_from_start_or_newest_valid_checkpoint(registry):
    """Session A writes rounds 0..6 (4..6 diverged to NaN, which no resume loads); session
    B resumed from A's round 2. Keeping the last 2 of A still keeps its start (0), round 2
    (B resumed from it) and round 3 (the newest that verifies)."""
    reg, model = registry
    a = reg.create_session(model, {"rounds": 6})
    start = manifest_mod.initial_parameters(model["manifest"])
    ids = {}
    for rnd in range(7):
        arrays = [x + rnd if rnd < 4 else x * np.nan for x in start]
        save_checkpoint(reg, a, model, rnd, arrays)
        ids[rnd] = reg.latest_checkpoint(NAME, session_id=a)["id"]
    reg.update_session(a, status="failed")  # one active session per model
    b = reg.create_session(model, {"rounds": 1, "resume": True})
    reg.update_session(b, resumed_from=ids[2])
    pruned = prune_checkpoints(reg, a, model, Retention(keep_last=2))
    assert sorted(pruned) == [ids[1], ids[4]]
    assert kept_rounds(reg, a) == [0, 2, 3, 5, 6] == files_of(reg, a)
    # nothing to prune now: the same set again (no error, no change)
    assert prune_checkpoints(reg, a, model, Retention(keep_last=2)) == []
    # keep-all never prunes
    assert prune_checkpoints(reg, a, model, Retention(keep_last=None)) == []
    # the resumed-from row still says where B started
    assert reg.round_offset(reg.get_session(b)) == 2


rows_st = st.integers(0, 40).flatmap(lambda n: st.tuples(
    st.just([{"id": i + 10, "round": i + 3} for i in range(n)]),
    st.sets(st.integers(10, 10 + max(n - 1, 0)))))


@settings(max_examples=60, deadline=None)
@given(rows_protected=rows_st, keep=st.one_of(st.none(), st.integers(1, 50)),
       every=st.one_of(st.none(), st.integers(1, 12)))
def test_prunable_keeps_exactly_last_n_every_kth_and_protected(rows_protected, keep, every):
    rows, protected = rows_protected
    doomed = {r["id"] for r in prunable(rows, Retention(keep, every), protected)}
    for i, r in enumerate(rows):
        wanted = (keep is None or i >= len(rows) - keep or r["id"] in protected
                  or (every is not None and r["round"] % every == 0))
        assert (r["id"] not in doomed) == wanted, (r, keep, every, protected)


values = st.one_of(st.none(), st.integers(-5, 1_000_005), st.booleans(),
                   st.floats(allow_nan=True), st.text(max_size=3))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["keep_checkpoints", "keep_every"]), value=values,
       simulation=st.booleans())
def test_retention_options_are_validated_with_the_option_named(name, value, simulation):
    valid = value is None or (type(value) is int and 1 <= value <= 1_000_000)

    def make():
        if simulation:
            return SimulationConfig(android=1, **{name: value})
        return SessionConfig(**{name: value})

    if valid:
        assert getattr(make(), name) == value
        return
    with pytest.raises(ValueError, match=name) as err:
        make()
    if value == 0 and type(value) is int:
        assert "None" in str(err.value)  # the way to keep all / none extra


def test_retention_defaults_bound_every_session():
    assert SessionConfig().keep_checkpoints == 5 and SessionConfig().keep_every is None
    assert Retention.of(SessionConfig(keep_checkpoints=None, keep_every=3)) == Retention(None, 3)
    with pytest.raises(ValueError, match="pass None to keep every checkpoint"):
        SessionConfig(keep_checkpoints=0)


@pytest.mark.slow
def test_simulation_prunes_its_checkpoints_too(tmp_path, shared_ray):
    """A simulation writes its checkpoints through the same recorders: 4 rounds with
    keep_checkpoints=1, keep_every=2 leave rounds 0, 2 and 4."""
    from tests.conftest import digits_cnn

    # Android only: the one simulated client is an Android phone (no Core ML export)
    res = xflwb.export(digits_cnn(7), name="keep_sim", data_type="digits",
                       out_dir=tmp_path / "exp", platforms=("android",))
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        sim = wb.simulate("keep_sim", android=1, rounds=4, keep_checkpoints=1, keep_every=2,
                          fraction_evaluate=0.0, ray_address=shared_ray)
        assert sim.wait(timeout=600) == "finished", sim.info["error"]
        kept = sorted(c["round"] for c in wb.registry.checkpoints_newest_first(
            "keep_sim", session_id=sim.id))
        folder = wb.registry.checkpoint_dir / "keep_sim" / f"session-{sim.id}"
        files = sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.npz"))
        pruned = [r["round"] for r in rows_of(wb.registry, sim.id) if r["pruned"]]
    assert kept == files == [0, 2, 4] and pruned == [1, 3]


def test_pruning_is_queued_after_the_rounds_checkpoint_and_runs_in_order(registry):
    """A round's recorder writes its checkpoint and returns; pruning the older ones and the
    row's round counter are queued (``Housekeeping``) off the round's critical path and run
    in order; ``close`` waits for them. (That a session records its end only after the
    queue is done, the sessions above show: their checkpoints are already pruned once they
    finished.)"""
    from xflwb.federation.report import RoundReport
    from xflwb.sessions.process import Housekeeping, round_recorders

    reg, model = registry
    sid = reg.create_session(model, {"rounds": 4, "keep_checkpoints": 2})
    start = manifest_mod.initial_parameters(model["manifest"])
    queued = []
    on_fit, _ = round_recorders(reg, sid, model, retention=Retention(keep_last=2),
                                later=queued.append)
    save_checkpoint(reg, sid, model, 0, start)
    for rnd in range(1, 5):
        on_fit(RoundReport(rnd), [x + rnd for x in start])
    # every checkpoint is written, none pruned yet: the four prunes (and the row's round
    # counter) wait in the queue
    assert kept_rounds(reg, sid) == [0, 1, 2, 3, 4] == files_of(reg, sid)
    assert len(queued) == 8 and reg.get_session(sid)["round"] == 0
    work = Housekeeping()
    for fn in queued:
        work.later(fn)
    work.close()
    assert kept_rounds(reg, sid) == [0, 3, 4] == files_of(reg, sid)  # the start stays
    assert reg.get_session(sid)["round"] == 4

