"""The registry's schema versions: ordered migration steps, applied when a registry opens.

A database records the version of its schema in ``schema_version`` (one row). Opening it
runs every step above that version, in order, and records the last; a database without the
table was made before versions existed (version 0) and runs them all. Each step checks
before it changes (a column or index already there is left alone), so a database of any
older xflwb, and several processes opening one database at once, end in the same schema.
A database of a *newer* schema (a newer xflwb wrote it) is refused untouched
(``NewerSchema``): an older xflwb would misread what it does not know.

A change to ``xflwb.sessions.schema`` adds a step here (never edit a released one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from xflwb.errors import BackendError
from xflwb.sessions import schema as s

log = logging.getLogger(__name__)

#: the one row saying which schema the database has
schema_version = sa.Table(
    "schema_version", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("version", sa.Integer, nullable=False),
)


class NewerSchema(BackendError):
    """The database's schema is newer than this xflwb's (``found`` > ``known``)."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"schema version {found}, newer than {known}")
        self.found, self.known = found, known


@dataclass(frozen=True)
class Migration:
    """One step: the schema ``version`` it brings the database to, and how."""

    version: int
    what: str
    apply: Callable[[sa.Engine], None]


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def _add_column(engine: sa.Engine, table: str, ddl: str) -> None:
    """``ALTER TABLE table ADD COLUMN ddl`` unless the column exists (another process may
    add it first: its error is harmless)."""
    if ddl.split()[0] in _columns(engine, table):
        return
    with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError), \
            engine.begin() as c:
        c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {ddl}"))


def _create(engine: sa.Engine, *tables: sa.Table) -> None:
    for table in tables:
        with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError):
            table.create(engine, checkfirst=True)  # (made by another process meanwhile)


def _index(engine: sa.Engine, index: sa.Index) -> None:
    with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError):
        index.create(engine, checkfirst=True)  # (made by another process meanwhile)


# -- the steps, oldest first -------------------------------------------------------------------
def _base_tables(engine: sa.Engine) -> None:
    """The tables of the first registry (created in today's form when missing)."""
    _create(engine, s.models, s.artifacts, s.sessions, s.metrics, s.rejections,
            s.client_failures, s.checkpoints, s.devices, s.telemetry, s.evaluations,
            s.device_tokens)


def _session_engine(engine: sa.Engine) -> None:
    """``sessions.launcher_pid`` and ``sessions.engine`` (filled in from the config JSON
    that used to tell simulations apart), and the one-active-phone-session index over it
    (the old one matched text in the config). A database that already holds two active
    sessions of one model (made before the index existed) keeps working without it."""
    _add_column(engine, "sessions", "launcher_pid INTEGER")
    if "engine" not in _columns(engine, "sessions"):
        _add_column(engine, "sessions", "engine VARCHAR(16) NOT NULL DEFAULT 'phone'")
        with engine.begin() as c:
            c.execute(s.sessions.update().where(s.SIMULATION_IN_CONFIG)
                      .values(engine="simulation"))
        with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError):
            s.ONE_ACTIVE_SESSION.drop(engine, checkfirst=True)
    try:
        s.ONE_ACTIVE_SESSION.create(engine, checkfirst=True)
    except sa.exc.OperationalError:  # made by another process meanwhile
        pass
    except sa.exc.IntegrityError:
        log.warning("the registry %s has two active sessions of one model; stop one: "
                    "starts are not protected against races until then", engine.url)


def _verified_checkpoints(engine: sa.Engine) -> None:
    """``checkpoints.sha256`` and the telemetry ↔ evaluation matching indexes."""
    _add_column(engine, "checkpoints", "sha256 VARCHAR(64)")
    _index(engine, s.TELEMETRY_MATCH)
    _index(engine, s.EVALUATION_MATCH)


def _fedbuff_arrivals(engine: sa.Engine) -> None:
    """FedBuff's ``arrivals`` (issue 15)."""
    _create(engine, s.arrivals)


def _checkpoint_retention(engine: sa.Engine) -> None:
    """``checkpoints.pruned`` (issue 20)."""
    _add_column(engine, "checkpoints", "pruned FLOAT")


def _privacy_ledger(engine: sa.Engine) -> None:
    """The ε ledger of a model lineage: ``privacy_events`` and ``lineages`` (issue 20)."""
    _create(engine, s.privacy_events, s.lineages)


def _token_devices(engine: sa.Engine) -> None:
    """``devices.token_id`` and its index: a device token speaks for one device."""
    _add_column(engine, "devices", "token_id INTEGER")
    _index(engine, s.ONE_DEVICE_PER_TOKEN)


def _token_expiry_and_scope(engine: sa.Engine) -> None:
    """``device_tokens.expires`` and ``.session_id`` (null: its tokens never expire and are
    valid for every session, as before)."""
    _add_column(engine, "device_tokens", "expires FLOAT")
    _add_column(engine, "device_tokens", "session_id INTEGER")


def _client_accuracy(engine: sa.Engine) -> None:
    """``evaluations.accuracy`` (issue 24: every client's evaluation kept), filled in for
    the evaluations already matched with telemetry; the others stay NULL."""
    _add_column(engine, "evaluations", "accuracy FLOAT")
    e, t = s.evaluations, s.telemetry
    telemetry_accuracy = (sa.select(t.c.accuracy)
                          .where(t.c.id == e.c.telemetry_id, t.c.accuracy.between(0.0, 1.0))
                          .scalar_subquery())
    with engine.begin() as c:
        c.execute(e.update().where(e.c.telemetry_id.is_not(None), e.c.accuracy.is_(None))
                  .values(accuracy=telemetry_accuracy))


#: every step, in order; ``SCHEMA_VERSION`` is the last one's
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the base tables", _base_tables),
    Migration(2, "sessions: launcher_pid, engine, one active phone session per model",
              _session_engine),
    Migration(3, "checkpoints.sha256, telemetry matching indexes", _verified_checkpoints),
    Migration(4, "FedBuff arrivals", _fedbuff_arrivals),
    Migration(5, "checkpoints.pruned (retention)", _checkpoint_retention),
    Migration(6, "privacy_events and lineages (the ε ledger)", _privacy_ledger),
    Migration(7, "devices.token_id (one device per token)", _token_devices),
    Migration(8, "device_tokens.expires and session_id", _token_expiry_and_scope),
    Migration(9, "evaluations.accuracy (every client's accuracy)", _client_accuracy),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def stored_version(engine: sa.Engine) -> int:
    """The database's schema version: 0 for a database without the version table (empty,
    or made before versions existed)."""
    if not sa.inspect(engine).has_table("schema_version"):
        return 0
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)


def _record(engine: sa.Engine, version: int) -> None:
    """Record ``version`` (never lowering it: another process may have gone further)."""
    with engine.begin() as c:
        if c.execute(schema_version.update().where(schema_version.c.id == 1,
                                                   schema_version.c.version < version)
                     .values(version=version)).rowcount:
            return
    with contextlib.suppress(sa.exc.IntegrityError), engine.begin() as c:
        if c.execute(sa.select(schema_version.c.id)).first() is None:
            c.execute(schema_version.insert().values(id=1, version=version))


def migrate(engine: sa.Engine) -> int:
    """Bring the database to ``SCHEMA_VERSION``; returns the version it had. Raises
    ``NewerSchema`` (changing nothing) when it has a newer one."""
    found = stored_version(engine)
    if found > SCHEMA_VERSION:
        raise NewerSchema(found, SCHEMA_VERSION)
    if found == SCHEMA_VERSION:
        return found
    with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError):
        schema_version.create(engine, checkfirst=True)  # (made by another process)
    for step in MIGRATIONS:
        if step.version > found:
            if found:  # a fresh database says nothing
                log.info("registry %s: schema %s: %s", engine.url, step.version, step.what)
            step.apply(engine)
            _record(engine, step.version)
    return found
