"""The registry owns its schema's versions: a database an older xflwb made is migrated when
opened (its rows kept, the new features working), one a newer xflwb made is refused.

The old database is built from ``tests/data/registry_62e53d1.sql``: the ``CREATE``
statements a registry of the release before schema versions wrote (no ``schema_version``,
no ε ledger tables, no ``devices.token_id``, no token expiry or session scope).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from xflwb.server.security import TokenStore
from xflwb.sessions import migrations
from xflwb.sessions.handle import started_from
from xflwb.sessions.registry import Registry, SchemaTooNew

OLD_SCHEMA = Path(__file__).parent / "data" / "registry_62e53d1.sql"


def _old_database(path: Path) -> None:
    """A database as the previous release left it, with a model, two sessions (the second
    resumed from the first's checkpoint), their metrics, a device, telemetry and a token."""
    db = sqlite3.connect(path)
    with db:
        db.executescript(OLD_SCHEMA.read_text())
        db.execute("INSERT INTO models VALUES (1, 'm', 1, 'digits', ?, '/nowhere', 1.0)",
                   (json.dumps({"name": "m", "version": 1, "parameters": []}),))
        for sid, resumed in ((1, None), (2, 1)):
            db.execute("INSERT INTO sessions (id, model_id, model_name, status, engine, "
                       "config, round, resumed_from, started, ended) VALUES "
                       "(?, 1, 'm', 'finished', 'phone', ?, 3, ?, 1.0, 2.0)",
                       (sid, json.dumps({"rounds": 3, "strategy": "fedavg"}), resumed))
        db.execute("INSERT INTO checkpoints (id, session_id, model_name, model_version, "
                   "round, path, time) VALUES (1, 1, 'm', 1, 3, '/nowhere/c.npz', 1.5)")
        db.execute("INSERT INTO metrics (session_id, round, platform, metric, value, time) "
                   "VALUES (1, 1, 'all', 'loss', 0.5, 1.2)")
        db.execute("INSERT INTO devices VALUES (7, 'android', 1.0, 1.0, 1)")
        db.execute("INSERT INTO telemetry (kind, device_id, session_id, round, platform, "
                   "start, \"end\", loss, accuracy, test_size, received) VALUES "
                   "('evaluate', 7, 1, 1, 'android', 0, 1, 0.5, 0.75, 10, 1.3)")
        db.execute("INSERT INTO device_tokens (device, sha256, created) VALUES "
                   "('old-phone', ?, 1.0)", (hashlib.sha256(b"old-token").hexdigest(),))
    db.close()


def _version(path: Path) -> int | None:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version FROM schema_version").fetchone()[0]
    except sqlite3.OperationalError:  # no such table
        return None
    finally:
        db.close()


def _shape(path: Path) -> dict[str, tuple[set[str], set[str]]]:
    """Each table's columns and index names."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: ({r[1] for r in db.execute(f'PRAGMA table_info("{t}")')},
                    {r[1] for r in db.execute(f'PRAGMA index_list("{t}")')
                     if not r[1].startswith("sqlite_autoindex")})
                for t in tables}
    finally:
        db.close()


def test_the_steps_are_ordered_and_a_new_database_has_the_newest_schema(tmp_path):
    versions = [m.version for m in migrations.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == migrations.SCHEMA_VERSION
    Registry(tmp_path / "new").close()
    assert _version(tmp_path / "new" / "xflwb.db") == migrations.SCHEMA_VERSION


def test_an_old_database_is_migrated_keeping_its_rows(tmp_path):
    old = tmp_path / "old" / "xflwb.db"
    old.parent.mkdir()
    _old_database(old)
    assert _version(old) is None

    reg = Registry(old.parent)
    try:
        assert _version(old) == migrations.SCHEMA_VERSION
        # the old rows, as the registry reads them
        assert reg.get_session(1)["status"] == "finished"
        assert reg.get_metrics(1) == [{"round": 1, "platform": "all", "metric": "loss",
                                       "value": 0.5}]
        assert [d["id"] for d in reg.list_devices()] == [7]
        assert reg.list_devices()[0]["token_id"] is None
        assert reg.accuracy_metrics(1)[0]["value"] == pytest.approx(0.75)
        assert started_from(reg, reg.get_session(2)) == "resumed from session 1, round 3"
        store = TokenStore(reg)
        kept = store.check("old-token", session=5)  # never expires, every session
        assert kept["device"] == "old-phone" and kept["expires"] is None
        assert kept["session"] is None
        # the features the migration brought
        reg.add_privacy_event(2, 4, 100, 10, 1.1, 1e-5)
        assert reg.get_privacy_events(2)[0]["noise_multiplier"] == pytest.approx(1.1)
        reg.set_lineage(2, 1, 3)
        assert reg.get_lineage(2) == {"parent_id": 1, "round": 3}
        scoped = store.issue("new-phone", ttl=60, session=2)
        assert store.check(scoped["token"], session=2)["session"] == 2
        assert store.verify(scoped["token"], session=1) is None
    finally:
        reg.close()
    fresh = tmp_path / "fresh"
    Registry(fresh).close()
    assert _shape(old) == _shape(fresh / "xflwb.db")

    Registry(old.parent).close()  # opening again changes nothing
    assert _version(old) == migrations.SCHEMA_VERSION
    assert len(TokenStore(Registry(old.parent)).list()) == 2


def test_a_database_of_a_newer_xflwb_is_refused_untouched(tmp_path):
    Registry(tmp_path).close()
    db = tmp_path / "xflwb.db"
    newer = migrations.SCHEMA_VERSION + 1
    with sqlite3.connect(db) as c:
        c.execute("UPDATE schema_version SET version = ?", (newer,))
    before = _shape(db)
    with pytest.raises(SchemaTooNew, match=f"schema version {newer}, written by a newer "
                                           "xflwb .*upgrade xflwb"):
        Registry(tmp_path)
    assert _version(db) == newer and _shape(db) == before


def test_each_step_is_safe_to_repeat(tmp_path):
    """Processes opening one database at once may run a step twice: a repeated step
    changes nothing and fails nothing."""
    reg = Registry(tmp_path)
    try:
        before = _shape(tmp_path / "xflwb.db")
        for step in migrations.MIGRATIONS:
            step.apply(reg.engine)
        assert _shape(tmp_path / "xflwb.db") == before
    finally:
        reg.close()
