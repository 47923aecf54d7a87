"""The registry: published models, sessions, metrics, checkpoints, devices, telemetry.

SQLAlchemy Core over embedded SQLite (WAL, so the API thread and every session process can
write at once); the URL is configurable so a team can point it at PostgreSQL. Artifacts are
copied under ``<data_dir>/registry/<name>/v<version>/`` and never change afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from xflwb.bridge import manifest as manifest_mod
from xflwb.sessions.status import ACTIVE, DONE, SessionStatus

log = logging.getLogger(__name__)

#: the engines a session row runs on (``sessions.engine``): phones join only ``phone`` rows
ENGINES = ("phone", "simulation")

meta = sa.MetaData()
models = sa.Table(
    "models", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("data_type", sa.String(128), nullable=False, index=True),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("directory", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("name", "version"),
)
artifacts = sa.Table(  # one row per (model version, platform): FedKit's platform model id
    "artifacts", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.ForeignKey("models.id"), nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("file", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.UniqueConstraint("model_id", "platform"),
)
sessions = sa.Table(
    "sessions", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.ForeignKey("models.id"), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    #: "phone" or "simulation" (``ENGINES``), set when the row is created
    sa.Column("engine", sa.String(16), nullable=False, server_default="phone"),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("ports", sa.Text),  # JSON {"android": port, "ios": port}
    sa.Column("pid", sa.Integer),
    #: the process that inserted the row and launches its process: while a ``starting`` row
    #: has no pid yet, it is only crashed when this launcher is gone (or after a deadline)
    sa.Column("launcher_pid", sa.Integer),
    sa.Column("round", sa.Integer, nullable=False, default=0),
    sa.Column("resumed_from", sa.Integer),  # checkpoint id
    sa.Column("error", sa.Text),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
)
def _per_round(name: str, *columns: sa.Column) -> sa.Table:
    """A table of per-session, per-round, per-platform rows (metrics, rejections,
    evaluations)."""
    return sa.Table(
        name, meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        *columns)


metrics = _per_round(
    "metrics",
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("time", sa.Float, nullable=False),
)
rejections = _per_round(
    "rejections",
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)
client_failures = sa.Table(  # a client's fit that failed (error or lost), with the reason
    "client_failures", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)
checkpoints = sa.Table(
    "checkpoints", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False, index=True),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64)),  # of the file's bytes; NULL in rows of older xflwb
    #: when retention deleted the file (``xflwb.sessions.checkpoints.prune_checkpoints``);
    #: NULL: on disk. The row stays, so round numbers, timings and ``started_from`` still read
    sa.Column("pruned", sa.Float),
)
#: one row per update that reached a FedBuff session's server, applied or rejected (issue
#: 15); ``ARRIVAL_COLUMNS`` is their order in ``Session.arrivals``
arrivals = sa.Table(
    "arrivals", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),  # the version it went (would go) into
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("base_version", sa.Integer, nullable=False),  # the version it trained from
    sa.Column("staleness", sa.Integer, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),  # staleness weight; 0 when rejected
    sa.Column("examples", sa.Integer, nullable=False),
    sa.Column("fit_seconds", sa.Float),
    sa.Column("seconds", sa.Float, nullable=False),  # since the session started
    sa.Column("status", sa.String(16), nullable=False),  # applied | rejected
    sa.Column("reason", sa.Text, nullable=False),  # "" when applied
    sa.Column("time", sa.Float, nullable=False),
)
ARRIVAL_COLUMNS = ("version", "platform", "client", "base_version", "staleness", "weight",
                   "examples", "fit_seconds", "seconds", "status", "reason")
#: the ε ledger of a model lineage (issue 20): one row per round a session released a model,
#: written before that model is (checkpoint, next round), so a crash can only over-count.
#: Kept apart from checkpoints, which retention may delete. ``noise_multiplier`` 0 (population
#: and sample 0): a round released without DP
privacy_events = sa.Table(
    "privacy_events", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("population", sa.Integer, nullable=False),  # clients available to sample
    sa.Column("sample_size", sa.Integer, nullable=False),  # sampled without replacement
    sa.Column("noise_multiplier", sa.Float, nullable=False),
    sa.Column("target_delta", sa.Float),  # the δ its session stated ε at
    sa.Column("time", sa.Float, nullable=False),
)
#: which session a phone session continues (the one whose checkpoint it resumed; NULL:
#: fresh), written when it starts: a session with a row has every released round in
#: ``privacy_events``; one without (older xflwb) is walked through ``resumed_from``
lineages = sa.Table(
    "lineages", meta,
    sa.Column("session_id", sa.ForeignKey("sessions.id"), primary_key=True),
    sa.Column("parent_id", sa.Integer),
    sa.Column("round", sa.Integer, nullable=False),  # the round it continues from
    sa.Column("time", sa.Float, nullable=False),
)
#: sessions run on the Simulation Engine
_SIMULATION = sessions.c.engine == "simulation"
#: how rows written before the ``engine`` column existed said so: in their config JSON
#: (SimulationConfig's ``engine`` field); used once, to fill the column in
_SIMULATION_CONFIG = sessions.c.config.like('%"engine": "simulation"%')
#: at most one active phone session per model, enforced by the database itself: two starts
#: racing (threads, the API and a notebook, two processes) cannot both insert one
ONE_ACTIVE_SESSION = sa.Index(
    "one_active_session_per_model", sessions.c.model_name, unique=True,
    sqlite_where=sa.and_(sessions.c.status.in_([str(s) for s in ACTIVE]), ~_SIMULATION),
    postgresql_where=sa.and_(sessions.c.status.in_([str(s) for s in ACTIVE]), ~_SIMULATION))
devices = sa.Table(
    "devices", meta,
    sa.Column("id", sa.Integer, primary_key=True),  # FedKit's device_id
    sa.Column("platform", sa.String(16)),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("last_session_id", sa.Integer),
    # device_auth="token": the device token whose first telemetry carried this device_id
    sa.Column("token_id", sa.Integer),
)
#: a device token speaks for one device id (the first it posts telemetry with)
ONE_DEVICE_PER_TOKEN = sa.Index("one_device_per_token", devices.c.token_id, unique=True)
telemetry = sa.Table(
    "telemetry", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # fit | evaluate
    sa.Column("device_id", sa.Integer, nullable=False),
    sa.Column("session_id", sa.Integer, nullable=False, index=True),
    sa.Column("round", sa.Integer),
    sa.Column("platform", sa.String(16)),
    sa.Column("start", sa.BigInteger, nullable=False),
    sa.Column("end", sa.BigInteger, nullable=False),
    sa.Column("loss", sa.Float),
    sa.Column("accuracy", sa.Float),
    sa.Column("test_size", sa.Integer),
    sa.Column("received", sa.Float, nullable=False),
)


evaluations = _per_round(  # per-client EvaluateRes, to attribute telemetry to a platform
    "evaluations",
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("loss", sa.Float),
    sa.Column("num_examples", sa.Integer, nullable=False),
    sa.Column("telemetry_id", sa.Integer),
)
#: telemetry ↔ evaluation matching looks rows up by key (session, size, loss range), never
#: scanning every unmatched row: flooding a session with telemetry costs lookups O(log n)
TELEMETRY_MATCH = sa.Index("telemetry_match", telemetry.c.session_id, telemetry.c.kind,
                           telemetry.c.platform, telemetry.c.test_size, telemetry.c.loss)
EVALUATION_MATCH = sa.Index("evaluation_match", evaluations.c.session_id,
                            evaluations.c.telemetry_id, evaluations.c.num_examples,
                            evaluations.c.loss)


class RegistryError(ValueError):
    """A request the registry cannot honour; the message says why and what to do."""


class NotFound(RegistryError):
    pass


class TelemetryRefused(RegistryError):
    """Telemetry the registry will not record; the message says why (HTTP 409)."""


class DeviceNotYours(TelemetryRefused):
    """Telemetry whose device_id is not the posting token's device (HTTP 403)."""


#: seconds after a session ends in which its last round's telemetry is still taken (phones
#: post it right after answering, possibly just after the session finished)
TELEMETRY_GRACE = 30.0


class SessionConflict(RegistryError):
    """The model already has an active phone session (``session_id``); HTTP 409."""

    def __init__(self, model_name: str, session_id: int | None, status: str | None) -> None:
        self.model_name, self.session_id, self.status = model_name, session_id, status
        which = (f"session {session_id} ({status})" if session_id is not None
                 else "a session that started at the same moment")
        super().__init__(f"model {model_name!r} already has {which}; stop it first "
                         f"(wb.session({session_id}).stop()) or join it")


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(eng, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return eng
    return sa.create_engine(url, pool_pre_ping=True)


#: what a published model name or artifact file name may be: it becomes a directory under
#: ``data_dir`` and part of the ``/static`` download path
PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def check_plain_name(name: Any, what: str) -> None:
    """Refuse anything but a plain identifier (no ``/``, no ``..``): names become paths."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"{what} {name!r} is not a plain name: use a letter, then up to 63 letters, "
            "digits, '_', '.' or '-' (no '/', no '..'); export again with such a name")


def _refuse_symlinks(src: Path) -> None:
    """An export directory holding a symlink could publish (and serve from ``/static``) a
    file from anywhere on the server's disk: refuse it, naming the link."""
    if src.is_symlink():
        raise RegistryError(f"export directory {src} is a symlink; publish the directory "
                            "it points to")
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise RegistryError(f"{path} in the export directory is a symlink (to "
                                f"{os.readlink(path)}); replace it with the file itself or "
                                "export again")


def _check_token_device(c: Any, dev: Any, device_id: int, token_id: int) -> None:
    """Refuse (``DeviceNotYours``) telemetry of token ``token_id`` for ``device_id`` unless
    that is the token's device, or may become it: the token has none yet, and the row is
    new, unbound, or bound to a token revoked or expired since, or issued for the same device
    name (a phone re-enrolled, e.g. a virtual fleet spawned again after a kernel restart)."""
    from xflwb.server.security import device_tokens as tokens

    mine = c.execute(sa.select(devices.c.id).where(devices.c.token_id == token_id)).scalar()
    if mine is not None and mine != device_id:
        raise DeviceNotYours(f"this device token speaks for device {mine} (bound by its "
                             f"first telemetry), not device {device_id}: send device_id "
                             f"{mine}, or issue the phone its own token")
    if dev is None or dev.token_id in (None, token_id):
        return
    rows = {r.id: r for r in c.execute(sa.select(tokens.c.id, tokens.c.device, tokens.c.revoked,
                                                 tokens.c.expires)
                                       .where(tokens.c.id.in_([dev.token_id, token_id])))}
    owner, poster = rows.get(dev.token_id), rows.get(token_id)
    # an expired token is as gone as a revoked one: its phone's next token may claim the row
    live = owner is not None and owner.revoked is None and (
        owner.expires is None or owner.expires > time.time())
    if live and (poster is None or poster.device != owner.device):
        raise DeviceNotYours(f"device {device_id} belongs to another device token: each "
                             "phone sends its own device_id with its own token")


class Registry:
    """All persistent state; safe to open from several processes at once."""

    def __init__(self, data_dir: str | Path, db_url: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir = self.data_dir / "registry"  # not "artifacts": users export there
        self.checkpoint_dir = self.data_dir / "checkpoints"
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'xflwb.db'}"
        self.engine = _engine(self.db_url)
        meta.create_all(self.engine)  # also the tables an older registry lacks (arrivals)
        self._migrate_sessions()
        self._migrate_checkpoints_and_telemetry()
        self._migrate_devices()

    def _migrate_sessions(self) -> None:
        """Bring a sessions table made by an older xflwb up to date (new columns, the
        one-active-session index). A database that already holds two active sessions of one
        model (made before the index existed) keeps working without the index."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("sessions")}
        if "launcher_pid" not in cols:
            # (another process may add it first)
            with contextlib.suppress(sa.exc.OperationalError), self.engine.begin() as c:
                c.execute(sa.text("ALTER TABLE sessions ADD COLUMN launcher_pid INTEGER"))
        if "engine" not in cols:
            self._add_engine_column()
        try:
            ONE_ACTIVE_SESSION.create(self.engine, checkfirst=True)
        except sa.exc.OperationalError:  # made by another process meanwhile
            pass
        except sa.exc.IntegrityError:
            log.warning("the registry %s has two active sessions of one model; stop one: "
                        "starts are not protected against races until then", self.db_url)

    def _add_engine_column(self) -> None:
        """Add ``sessions.engine``, fill it in from the config JSON that used to tell
        simulations apart, and rebuild the one-active-session index over the column (the
        old one matched text in the config). Another process may be doing the same: the
        loser's statements fail harmlessly or repeat the same values."""
        with contextlib.suppress(sa.exc.OperationalError), self.engine.begin() as c:
            c.execute(sa.text("ALTER TABLE sessions ADD COLUMN engine VARCHAR(16) NOT NULL "
                              "DEFAULT 'phone'"))
        with self.engine.begin() as c:
            c.execute(sessions.update().where(_SIMULATION_CONFIG).values(engine="simulation"))
        with contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError):
            ONE_ACTIVE_SESSION.drop(self.engine, checkfirst=True)

    def _migrate_checkpoints_and_telemetry(self) -> None:
        """A registry made by an older xflwb: add the checkpoints' sha256 column and the
        matching indexes (several processes may race here: the loser sees them made)."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("checkpoints")}
        if "sha256" not in cols:
            with contextlib.suppress(sa.exc.OperationalError), self.engine.begin() as c:
                # (another process may have added it first)
                c.execute(sa.text("ALTER TABLE checkpoints ADD COLUMN sha256 VARCHAR(64)"))
        if "pruned" not in cols:  # checkpoint retention (issue 20)
            with contextlib.suppress(sa.exc.OperationalError), self.engine.begin() as c:
                c.execute(sa.text("ALTER TABLE checkpoints ADD COLUMN pruned FLOAT"))
        for index in (TELEMETRY_MATCH, EVALUATION_MATCH):
            with contextlib.suppress(sa.exc.OperationalError):  # made by another process
                index.create(self.engine, checkfirst=True)

    def _migrate_devices(self) -> None:
        """A registry made by an older xflwb: add ``devices.token_id`` and its index."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("devices")}
        if "token_id" not in cols:
            with contextlib.suppress(sa.exc.OperationalError), self.engine.begin() as c:
                c.execute(sa.text("ALTER TABLE devices ADD COLUMN token_id INTEGER"))
        with contextlib.suppress(sa.exc.OperationalError):  # made by another process
            ONE_DEVICE_PER_TOKEN.create(self.engine, checkfirst=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- models ------------------------------------------------------------------------------
    def resolve(self, name_or_export: Any) -> str:
        """The registry name of an ``ExportResult``, export directory, manifest path or a
        published model name (publishing the export first when needed; versions are
        immutable, so publishing the same export twice is a no-op)."""
        if isinstance(name_or_export, str) and not Path(name_or_export).exists():
            self.latest_model(name_or_export)  # a clear "no model named ..." otherwise
            return name_or_export
        return str(self.publish(name_or_export)["name"])

    def publish(self, source: Any) -> dict[str, Any]:
        """Register an export (``ExportResult``, manifest dict with ``_dir``, or a path)."""
        m = getattr(source, "manifest", source)
        if isinstance(m, str | Path):
            m = manifest_mod.load(m)
        if not isinstance(m, dict) or "_dir" not in m:
            raise RegistryError("publish() takes an ExportResult, an export directory or a "
                                "manifest.json path")
        manifest_mod.validate(m)
        check_plain_name(m["name"], "model name")
        version = m["version"]
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:
            raise RegistryError(f"model version must be an integer in [1, 2^31), got "
                                f"{version!r}; export the model again")
        src = Path(m["_dir"])
        _refuse_symlinks(src)
        for plat, entry in m["platforms"].items():
            check_plain_name(entry["file"], f"{plat} artifact file name")
            path = src / entry["file"]
            if not path.resolve().is_relative_to(src.resolve()):
                raise RegistryError(f"{plat} artifact {path} resolves outside the export "
                                    f"directory {src}; publish only files xflwb.export wrote")
            if not path.is_file():
                raise RegistryError(f"{plat} artifact {path} is missing")
            if manifest_mod.sha256(path) != entry["sha256"]:
                raise RegistryError(f"{plat} artifact {path} does not match its manifest "
                                    "sha256; re-export the model")
        existing = self.find_model(m["name"], m["version"])
        if existing is not None:
            same = all(existing["manifest"]["platforms"].get(p, {}).get("sha256")
                       == e["sha256"] for p, e in m["platforms"].items())
            if same and set(existing["manifest"]["platforms"]) == set(m["platforms"]):
                return existing
            raise RegistryError(
                f"the registry already has {m['name']} v{m['version']} with different files;"
                " versions are immutable: export again (a new version) and publish that")
        dest = self.artifact_dir / m["name"] / f"v{m['version']}"
        if dest.exists():
            raise RegistryError(f"{dest} exists but is not registered; move it away")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".v{m['version']}.tmp-{time.time_ns()}"
        shutil.copytree(src, tmp)
        tmp.rename(dest)
        public = {k: v for k, v in m.items() if not k.startswith("_")}
        with self.engine.begin() as c:
            mid = c.execute(models.insert().values(
                name=m["name"], version=m["version"], data_type=m["data_type"],
                manifest=json.dumps(public), directory=str(dest), created=time.time())
            ).inserted_primary_key[0]
            for plat, entry in m["platforms"].items():
                c.execute(artifacts.insert().values(
                    model_id=mid, platform=plat, file=entry["file"], sha256=entry["sha256"],
                    bytes=entry["bytes"]))
        return self.get_model(mid)

    def _model_row(self, row: Any) -> dict[str, Any]:
        m = json.loads(row.manifest)
        m["_dir"] = row.directory
        return {"id": row.id, "name": row.name, "version": row.version,
                "data_type": row.data_type, "directory": row.directory,
                "created": row.created, "manifest": m}

    def get_model(self, model_id: int) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(models.select().where(models.c.id == model_id)).first()
        if row is None:
            raise NotFound(f"no model with id {model_id}")
        return self._model_row(row)

    def find_model(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        q = models.select().where(models.c.name == name)
        q = (q.where(models.c.version == version) if version is not None
             else q.order_by(models.c.version.desc()))
        with self.engine.connect() as c:
            row = c.execute(q).first()
        return None if row is None else self._model_row(row)

    def latest_model(self, name: str) -> dict[str, Any]:
        found = self.find_model(name)
        if found is None:
            names = sorted({m["name"] for m in self.list_models()})
            raise NotFound(f"no published model named {name!r}; published: {names or 'none'}"
                           " (wb.publish(xflwb.export(...)) first)")
        return found

    def list_models(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(models.select().order_by(models.c.id)).all()
        return [self._model_row(r) for r in rows]

    def get_artifact(self, artifact_id: int) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(artifacts.select().where(artifacts.c.id == artifact_id)).first()
        if row is None:
            raise NotFound(f"no model with id {artifact_id}")
        return dict(row._mapping)

    def largest_artifact_bytes(self) -> int:
        """Size of the largest published model file (0 when none): request limits scale
        with it."""
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.max(artifacts.c.bytes))).scalar() or 0)

    def model_file(self, filename: str) -> tuple[str, str] | None:
        """``(directory, file)`` of the published file served as ``filename``
        (``<model name>--<file>``, the name ``/static`` downloads use), or None."""
        q = (sa.select(models.c.directory, artifacts.c.file)
             .join(artifacts, artifacts.c.model_id == models.c.id)
             .where((models.c.name + "--" + artifacts.c.file) == filename))
        with self.engine.connect() as c:
            row = c.execute(q).first()
        return None if row is None else (row.directory, row.file)

    def artifacts_of(self, model_id: int) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(artifacts.select().where(artifacts.c.model_id == model_id)).all()
        return {r.platform: dict(r._mapping) for r in rows}

    def advertised(self, data_type: str, platform: str) -> tuple[dict, dict] | None:
        """The model a phone of ``platform`` with ``data_type`` should train.

        A model with a running session wins (phones join the live experiment); otherwise
        the most recently published one.
        """
        q = (sa.select(models, artifacts.c.id.label("artifact_id"))
             .join(artifacts, artifacts.c.model_id == models.c.id)
             .where(models.c.data_type == data_type, artifacts.c.platform == platform))
        with self.engine.connect() as c:
            running = c.execute(
                q.join(sessions, sessions.c.model_id == models.c.id)
                .where(sessions.c.status.in_(ACTIVE)).order_by(sessions.c.id.desc())).first()
            row = running or c.execute(q.order_by(models.c.id.desc())).first()
        if row is None:
            return None
        return self._model_row(row), self.get_artifact(row.artifact_id)

    # -- sessions ----------------------------------------------------------------------------
    def create_session(self, model: dict[str, Any], config: dict[str, Any],
                       exclusive: bool = False, engine: str | None = None) -> int:
        """Insert a ``starting`` session launched by this process.

        ``engine``: "phone" or "simulation" (default: the config's ``engine``, else
        "phone"). ``exclusive`` (phone sessions): the check for the model's active session
        and the insert are one transaction, and the unique partial index refuses a racing
        second insert; the loser gets ``SessionConflict`` naming the winner."""
        engine = engine or str(config.get("engine", "phone"))
        if engine not in ENGINES:
            raise RegistryError(f"unknown session engine {engine!r}; one of {ENGINES}")
        values = {"model_id": model["id"], "model_name": model["name"],
                  "status": str(SessionStatus.STARTING), "engine": engine,
                  "config": json.dumps(config), "round": 0, "started": time.time(),
                  "launcher_pid": os.getpid()}
        try:
            with self.engine.begin() as c:
                if exclusive:
                    row = c.execute(self._active_query(model["name"])).first()
                    if row is not None:
                        raise SessionConflict(model["name"], row.id, row.status)
                return c.execute(sessions.insert().values(**values)).inserted_primary_key[0]
        except sa.exc.IntegrityError:
            if not exclusive:
                raise
            active = self.active_session_for(model["name"])
            raise SessionConflict(model["name"], active and active["id"],
                                  active and active["status"]) from None

    def mark_crashed(self, session_id: int, error: str, without_pid: bool = False) -> bool:
        """Mark an active session crashed; a no-op (False) when it ended meanwhile, or, with
        ``without_pid``, when its process wrote its pid meanwhile (one UPDATE, no race)."""
        q = sessions.update().where(sessions.c.id == session_id,
                                    sessions.c.status.in_(ACTIVE))
        if without_pid:
            q = q.where(sessions.c.pid.is_(None))
        with self.engine.begin() as c:
            n = c.execute(q.values(status=str(SessionStatus.CRASHED), error=error,
                                   ended=time.time())).rowcount
        return bool(n)

    def update_session(self, session_id: int, **values: Any) -> None:
        if "ports" in values and not isinstance(values["ports"], str | None):
            values["ports"] = json.dumps(values["ports"])
        if "status" in values:
            values["status"] = str(SessionStatus(values["status"]))  # the plain string
            if values["status"] in DONE:
                values.setdefault("ended", time.time())
        with self.engine.begin() as c:
            c.execute(sessions.update().where(sessions.c.id == session_id).values(**values))

    def get_session(self, session_id: int) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(sessions.select().where(sessions.c.id == session_id)).first()
        if row is None:
            raise NotFound(f"no session with id {session_id}")
        return self._session_row(row)

    @staticmethod
    def _session_row(row: Any) -> dict[str, Any]:
        d = dict(row._mapping)
        d["config"] = json.loads(d["config"])
        d["ports"] = json.loads(d["ports"]) if d["ports"] else {}
        return d

    def list_sessions(self, status: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        q = sessions.select().order_by(sessions.c.id)
        if status:
            q = q.where(sessions.c.status.in_(status))
        with self.engine.connect() as c:
            return [self._session_row(r) for r in c.execute(q).all()]

    @staticmethod
    def _active_query(model_name: str) -> sa.Select:
        return (sessions.select().where(sessions.c.model_name == model_name,
                                        sessions.c.status.in_(ACTIVE), ~_SIMULATION)
                .order_by(sessions.c.id.desc()))

    def active_session_for(self, model_name: str) -> dict[str, Any] | None:
        """The model's running phone session (simulations never take phones)."""
        with self.engine.connect() as c:
            row = c.execute(self._active_query(model_name)).first()
        return None if row is None else self._session_row(row)

    # -- metrics, rejections, checkpoints ----------------------------------------------------
    def add_metrics(self, session_id: int, rnd: int,
                    values: list[tuple[str, str, float | None]]) -> None:
        """``values``: (platform, metric, value) triples for one round."""
        now = time.time()
        if not values:
            return
        with self.engine.begin() as c:
            c.execute(metrics.insert(), [
                {"session_id": session_id, "round": rnd, "platform": p, "metric": k,
                 "value": None if v is None else float(v), "time": now}
                for p, k, v in values])

    def get_metrics(self, session_id: int) -> list[dict[str, Any]]:
        q = (sa.select(metrics.c.round, metrics.c.platform, metrics.c.metric, metrics.c.value)
             .where(metrics.c.session_id == session_id).order_by(metrics.c.id))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    def add_rejection(self, session_id: int, rnd: int, platform: str, client: str,
                      reason: str) -> None:
        with self.engine.begin() as c:
            c.execute(rejections.insert().values(session_id=session_id, round=rnd,
                                                 platform=platform, client=client,
                                                 reason=reason, time=time.time()))

    def get_rejections(self, session_id: int) -> list[dict[str, Any]]:
        q = (sa.select(rejections.c.round, rejections.c.platform, rejections.c.client,
                       rejections.c.reason)
             .where(rejections.c.session_id == session_id).order_by(rejections.c.id))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    def add_arrivals(self, session_id: int, rows: list[dict[str, Any]]) -> None:
        """Record FedBuff arrivals (dicts with ``ARRIVAL_COLUMNS``' keys; ``reason`` may be
        left out when applied) in one transaction: a version's arrivals land together."""
        if not rows:
            return
        now = time.time()
        missing = [sorted(set(ARRIVAL_COLUMNS) - {"reason"} - set(r)) for r in rows]
        if any(missing):
            raise RegistryError(f"arrival rows lack {next(m for m in missing if m)}")
        with self.engine.begin() as c:
            c.execute(arrivals.insert(), [
                {"session_id": session_id, "version": int(r["version"]),
                 "platform": str(r["platform"]), "client": str(r["client"])[:64],
                 "base_version": int(r["base_version"]), "staleness": int(r["staleness"]),
                 "weight": float(r["weight"]), "examples": int(r["examples"]),
                 "fit_seconds": None if r["fit_seconds"] is None else float(r["fit_seconds"]),
                 "seconds": float(r["seconds"]), "status": str(r["status"]),
                 "reason": str(r.get("reason") or "")[:2000], "time": now} for r in rows])

    def get_arrivals(self, session_id: int) -> list[dict[str, Any]]:
        """The session's arrivals in the order they were recorded (``ARRIVAL_COLUMNS``)."""
        q = (sa.select(*(arrivals.c[k] for k in ARRIVAL_COLUMNS))
             .where(arrivals.c.session_id == session_id).order_by(arrivals.c.id))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    def add_failures(self, session_id: int, rnd: int,
                     rows: list[tuple[str, str, str]]) -> None:
        """``rows``: (platform, client, reason) of the round's failed fits."""
        if not rows:
            return
        now = time.time()
        with self.engine.begin() as c:
            c.execute(client_failures.insert(), [
                {"session_id": session_id, "round": rnd, "platform": p, "client": cid,
                 "reason": reason[:2000], "time": now} for p, cid, reason in rows])

    def get_failures(self, session_id: int, last: int | None = None) -> list[dict[str, Any]]:
        """The session's failed fits, oldest first (only the ``last`` ones if given)."""
        q = (sa.select(client_failures.c.round, client_failures.c.platform,
                       client_failures.c.client, client_failures.c.reason)
             .where(client_failures.c.session_id == session_id)
             .order_by(client_failures.c.id.desc()))
        if last is not None:
            q = q.limit(last)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in reversed(c.execute(q).all())]

    def add_checkpoint(self, session_id: int, model: dict[str, Any], rnd: int,
                       path: Path, sha256: str | None = None) -> int:
        """Record a written checkpoint; ``sha256`` of its bytes is checked when loaded."""
        with self.engine.begin() as c:
            return c.execute(checkpoints.insert().values(
                session_id=session_id, model_name=model["name"],
                model_version=model["version"], round=rnd, path=str(path), time=time.time(),
                sha256=sha256)).inserted_primary_key[0]

    def get_checkpoint(self, checkpoint_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(checkpoints.select().where(checkpoints.c.id == checkpoint_id)
                            ).first()
        return None if row is None else dict(row._mapping)

    def round_offset(self, session: dict[str, Any]) -> int:
        """The round a session's numbering continues from: the (absolute) round of the
        checkpoint it resumed from, 0 for a fresh session."""
        ckpt_id = session.get("resumed_from")
        ckpt = self.get_checkpoint(ckpt_id) if ckpt_id is not None else None
        return int(ckpt["round"]) if ckpt is not None else 0

    def latest_checkpoint(self, model_name: str, model_version: int | None = None,
                          session_id: int | None = None) -> dict[str, Any] | None:
        found = self.checkpoints_newest_first(model_name, model_version, session_id, limit=1)
        return found[0] if found else None

    def checkpoints_newest_first(self, model_name: str, model_version: int | None = None,
                                 session_id: int | None = None,
                                 limit: int | None = None) -> list[dict[str, Any]]:
        """The model's checkpoints on disk, newest first (a resume falls back along this
        list when the newest is missing or corrupt); pruned ones are never offered."""
        q = checkpoints.select().where(checkpoints.c.model_name == model_name,
                                       checkpoints.c.pruned.is_(None))
        if model_version is not None:
            q = q.where(checkpoints.c.model_version == model_version)
        if session_id is not None:
            q = q.where(checkpoints.c.session_id == session_id)
        else:  # a phone session resumes from phone sessions, never from a simulation
            q = q.where(checkpoints.c.session_id.not_in(
                sa.select(sessions.c.id).where(_SIMULATION)))
        q = q.order_by(checkpoints.c.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    # -- the ε ledger of a lineage (xflwb.sessions.lineage) --------------------------------------
    def add_privacy_event(self, session_id: int, rnd: int, population: int,
                          sample_size: int, noise_multiplier: float,
                          target_delta: float | None = None) -> None:
        """Record that round ``rnd`` of the session released a model, and how (noise
        multiplier 0: without DP); one transaction, durable before it returns."""
        with self.engine.begin() as c:
            c.execute(privacy_events.insert().values(
                session_id=session_id, round=int(rnd), population=int(population),
                sample_size=int(sample_size), noise_multiplier=float(noise_multiplier),
                target_delta=None if target_delta is None else float(target_delta),
                time=time.time()))

    def get_privacy_events(self, session_id: int) -> list[dict[str, Any]]:
        """The session's released rounds, in order: round, population, sample_size,
        noise_multiplier, target_delta."""
        q = (sa.select(privacy_events.c.round, privacy_events.c.population,
                       privacy_events.c.sample_size, privacy_events.c.noise_multiplier,
                       privacy_events.c.target_delta)
             .where(privacy_events.c.session_id == session_id).order_by(privacy_events.c.id))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    def set_lineage(self, session_id: int, parent_id: int | None, rnd: int) -> None:
        """Record which session ``session_id`` continues (None: fresh) from round ``rnd``."""
        with self.engine.begin() as c:
            c.execute(lineages.insert().values(session_id=session_id, parent_id=parent_id,
                                               round=int(rnd), time=time.time()))

    def get_lineage(self, session_id: int) -> dict[str, Any] | None:
        """``{"parent_id", "round"}`` as ``set_lineage`` recorded it; None for a session of
        an older xflwb (or a simulation)."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(lineages.c.parent_id, lineages.c.round)
                            .where(lineages.c.session_id == session_id)).first()
        return None if row is None else dict(row._mapping)

    def resumed_from_ids(self) -> set[int]:
        """Every checkpoint a session resumed from (retention never deletes these:
        ``started_from`` and ``round_offset`` name them)."""
        with self.engine.connect() as c:
            return {int(r[0]) for r in c.execute(
                sa.select(sessions.c.resumed_from).where(sessions.c.resumed_from.is_not(None))
                .distinct())}

    def mark_checkpoints_pruned(self, ids: list[int]) -> None:
        """Record that retention deletes these checkpoints' files (before they are deleted:
        a crash in between leaves a file no resume is offered, swept later)."""
        if not ids:
            return
        with self.engine.begin() as c:
            c.execute(checkpoints.update().where(checkpoints.c.id.in_(ids),
                                                 checkpoints.c.pruned.is_(None))
                      .values(pruned=time.time()))

    def pruned_checkpoint_paths(self, paths: list[str]) -> set[str]:
        """Which of ``paths`` belong to pruned checkpoints (files left by a crash between
        marking and deleting)."""
        found: set[str] = set()
        with self.engine.connect() as c:
            for i in range(0, len(paths), 500):  # well below SQLite's bound-variable limit
                found.update(r[0] for r in c.execute(
                    sa.select(checkpoints.c.path).where(checkpoints.c.path.in_(paths[i:i + 500]),
                                                        checkpoints.c.pruned.is_not(None))))
        return found

    def checkpoint_counts(self) -> dict[str, int]:
        """How many checkpoint rows are on disk (``kept``) and how many were ``pruned``."""
        with self.engine.connect() as c:
            kept = c.execute(sa.select(sa.func.count()).select_from(checkpoints)
                             .where(checkpoints.c.pruned.is_(None))).scalar()
            total = c.execute(sa.select(sa.func.count()).select_from(checkpoints)).scalar()
        return {"kept": int(kept or 0), "pruned": int((total or 0) - (kept or 0))}

    # -- devices and telemetry ---------------------------------------------------------------
    def device_known(self, device_id: int) -> bool:
        """Whether telemetry has created a row for ``device_id`` already."""
        with self.engine.connect() as c:
            return c.execute(sa.select(devices.c.id).where(
                devices.c.id == int(device_id))).first() is not None

    def add_telemetry(self, kind: str, body: dict[str, Any],
                      token_id: int | None = None) -> int:
        """Record one FedKit telemetry post (``kind``: fit | evaluate); the body's values are
        range-checked by the caller (the HTTP route).

        Refused (``TelemetryRefused``): a session that is not running (a short grace after
        it ends lets the last round's posts land), a device id that is in another running
        session, and evaluate telemetry that matches an evaluation of a platform other than
        the one its device id is bound to. A device's platform is bound at its first match
        and never rewritten; telemetry counts for a platform only through a match with an
        EvaluateRes (never through its device id alone), so a reused device id cannot
        speak for another phone's platform.

        ``token_id``: the device token the post came with (``device_auth="token"``). A
        token speaks for one device: the device id of its first telemetry is bound to it
        (a new row, or a row made before tokens, bound to a since-revoked token or to a
        token of the same device name); any other device id from it, or a device id of
        another valid token, is refused (``DeviceNotYours``). So with tokens, telemetry
        creates at most one device row per issued token.
        """
        now = time.time()
        sid, device_id = int(body["session_id"]), int(body["device_id"])
        session = self.get_session(sid)
        if session["engine"] == "simulation":
            raise TelemetryRefused(f"session {sid} is a simulation: it takes no phone "
                                   "telemetry")
        if session["status"] != SessionStatus.RUNNING:
            ended = session["ended"] or now
            if session["status"] == SessionStatus.STARTING or now - ended > TELEMETRY_GRACE:
                raise TelemetryRefused(
                    f"session {sid} is {session['status']}: telemetry is taken only while a "
                    f"session runs (and {TELEMETRY_GRACE:g} s after it ends)")
        # fit telemetry: the round being trained; evaluate telemetry: set by its match
        rnd = self.round_offset(session) + int(session["round"]) + 1 if kind == "fit" else None
        try:
            return self._add_telemetry(kind, body, sid, device_id, rnd, now, token_id)
        except sa.exc.IntegrityError:  # a post racing this one made the row first
            raise TelemetryRefused(f"device {device_id} was being recorded by another "
                                   "telemetry post at the same moment; send again") from None

    def _add_telemetry(self, kind: str, body: dict[str, Any], sid: int, device_id: int,
                       rnd: int | None, now: float, token_id: int | None) -> int:
        with self.engine.begin() as c:
            dev = c.execute(devices.select().where(devices.c.id == device_id)).first()
            if token_id is not None:
                _check_token_device(c, dev, device_id, token_id)
            if dev is not None and dev.last_session_id not in (None, sid):
                other = c.execute(sa.select(sessions.c.status).where(
                    sessions.c.id == dev.last_session_id)).scalar()
                if other in ACTIVE:
                    raise TelemetryRefused(
                        f"device {device_id} joined session {dev.last_session_id}, which is "
                        f"still {other}: a device id takes part in one session at a time "
                        "(does another phone use the same device_id?)")
            if dev is None:
                c.execute(devices.insert().values(id=device_id, platform=None,
                                                  first_seen=now, last_seen=now,
                                                  last_session_id=sid, token_id=token_id))
            else:
                bound = {"token_id": token_id} if token_id is not None else {}
                c.execute(devices.update().where(devices.c.id == device_id).values(
                    last_seen=now, last_session_id=sid, **bound))
            tid = c.execute(telemetry.insert().values(
                kind=kind, device_id=device_id, session_id=sid, round=rnd, platform=None,
                start=body["start"], end=body["end"], loss=body.get("loss"),
                accuracy=body.get("accuracy"), test_size=body.get("test_size"),
                received=now)).inserted_primary_key[0]
            if kind == "evaluate":
                from xflwb.sessions.telemetry import match_telemetry

                match_telemetry(c, tid, sid, device_id,
                                dev.platform if dev is not None else None,
                                body.get("loss"), body.get("test_size"))
            return tid

    def list_devices(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in
                    c.execute(devices.select().order_by(devices.c.id)).all()]

    def get_telemetry(self, session_id: int | None = None) -> list[dict[str, Any]]:
        q = telemetry.select().order_by(telemetry.c.id)
        if session_id is not None:
            q = q.where(telemetry.c.session_id == session_id)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q).all()]

    # -- evaluation ↔ telemetry ---------------------------------------------------------------
    # Whichever of a device's EvaluateRes and its evaluate telemetry arrives second makes the
    # match (xflwb.sessions.telemetry says how).
    def add_evaluations(self, session_id: int, rnd: int,
                        rows: list[tuple[str, str, float, int]]) -> None:
        """Record the round's per-client EvaluateRes ``(platform, client, loss,
        num_examples)``, each matched with telemetry already received."""
        if not rows:
            return
        from xflwb.sessions.telemetry import match_evaluation

        with self.engine.begin() as c:
            for p, cid, loss, n in rows:
                eid = c.execute(evaluations.insert().values(
                    session_id=session_id, round=rnd, platform=p, client=cid, loss=loss,
                    num_examples=n)).inserted_primary_key[0]
                match_evaluation(c, eid, session_id, rnd, p, loss, n)

    def accuracy_metrics(self, session_id: int) -> list[dict[str, Any]]:
        """Per round and platform: test-size-weighted accuracy reported by devices whose
        telemetry matched an EvaluateRes (unmatched telemetry counts nowhere)."""
        q = (sa.select(telemetry.c.round, telemetry.c.platform, telemetry.c.accuracy,
                       telemetry.c.test_size)
             .where(telemetry.c.session_id == session_id, telemetry.c.kind == "evaluate",
                    telemetry.c.accuracy.is_not(None), telemetry.c.round.is_not(None),
                    telemetry.c.platform.is_not(None)))
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        sums: dict[tuple[int, str], list[float]] = {}
        for r in rows:
            acc_value = float(r.accuracy)
            if not 0.0 <= acc_value <= 1.0:  # rows stored before telemetry was range-checked
                continue
            w = float(r.test_size or 1)
            for plat in {r.platform, "all"}:
                acc = sums.setdefault((r.round, plat), [0.0, 0.0])
                acc[0] += acc_value * w
                acc[1] += w
        return [{"round": rnd, "platform": plat, "metric": "accuracy", "value": s / n}
                for (rnd, plat), (s, n) in sorted(sums.items()) if n]
