"""The registry: published models, sessions, metrics, checkpoints, devices, telemetry.

SQLAlchemy Core over embedded SQLite (WAL, so the API thread and every session process can
write at once); the URL is configurable so a team can point it at PostgreSQL. Artifacts are
copied under ``<data_dir>/registry/<name>/v<version>/`` and never change afterwards.

The one place that runs SQL (``tests/test_architecture.py`` holds every other module to it):
the HTTP routes, the token store, telemetry matching and the session views ask a method
here. The tables are declared in ``xflwb.sessions.schema``; opening a registry brings an
older database up to date (``xflwb.sessions.migrations``) and refuses a newer one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import sqlalchemy as sa

from xflwb.bridge import manifest as manifest_mod
from xflwb.errors import BackendError
from xflwb.sessions import migrations
from xflwb.sessions.schema import (
    ARRIVAL_COLUMNS,
    ENGINES,
    IS_SIMULATION,
    MAX_DEVICE_NAME,
    arrivals,
    artifacts,
    checkpoints,
    client_failures,
    device_tokens,
    devices,
    evaluations,
    lineages,
    metrics,
    models,
    privacy_events,
    rejections,
    sessions,
    telemetry,
)
from xflwb.sessions.status import ACTIVE, DONE, SessionStatus

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVE", "ARRIVAL_COLUMNS", "ENGINES", "MAX_DEVICE_NAME", "TELEMETRY_GRACE",
    "DeviceNotYours", "NotFound", "Registry", "RegistryError", "SchemaTooNew",
    "SessionConflict", "TelemetryRefused", "check_plain_name", "checkpoints", "sessions",
]

class RegistryError(BackendError, ValueError):
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


class SchemaTooNew(RegistryError):
    """The database was written by a newer xflwb (a schema this one does not know)."""


class SessionConflict(RegistryError):
    """The model already has an active phone session (``session_id``); HTTP 409."""

    def __init__(self, model_name: str, session_id: int | None, status: str | None) -> None:
        self.model_name, self.session_id, self.status = model_name, session_id, status
        which = (f"session {session_id} ({status})" if session_id is not None
                 else "a session that started at the same moment")
        super().__init__(f"model {model_name!r} already has {which}; stop it first "
                         f"(wb.session({session_id}).stop()) or join it")


def _engine(url: str, pooled: bool = True) -> sa.Engine:
    """The registry's engine; ``pooled=False``: every use opens its own connection and
    closes it (what a closed registry reads through, holding nothing open)."""
    pool: dict[str, Any] = {} if pooled else {"poolclass": sa.pool.NullPool}
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **pool)

        @sa.event.listens_for(eng, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return eng
    return sa.create_engine(url, pool_pre_ping=True, **pool)


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
    tokens = device_tokens
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
    if live and owner is not None and (poster is None or poster.device != owner.device):
        raise DeviceNotYours(f"device {device_id} belongs to another device token: each "
                             "phone sends its own device_id with its own token")


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    """The id of the one row ``result`` inserted (SQLAlchemy types the key Optional: it is
    None only for statements that insert nothing)."""
    key = result.inserted_primary_key
    if key is None:
        raise RegistryError("the insert returned no primary key")
    return int(key[0])


# -- telemetry ↔ evaluation matching ------------------------------------------------------------
# FedKit's telemetry carries no platform, and gRPC carries no device id; but a device reports
# the same loss and test size in its EvaluateRes (platform known from the port) and in
# ``telemetry/evaluate_ins``. Whichever of the two arrives second makes the match, looked up by
# key through the ``TELEMETRY_MATCH`` / ``EVALUATION_MATCH`` indexes (never a scan of every
# unmatched row), inside the transaction ``c`` that records it.
def loss_range(loss: float) -> tuple[float, float]:
    """The losses that count as "the same" (devices and JSON round floats differently)."""
    tol = 1e-4 * max(1.0, abs(loss))
    return loss - tol, loss + tol


def _attribute(c: Any, tid: int, eid: int, device_id: int, platform: str, rnd: int) -> None:
    """Record a match: the telemetry row gets the platform and round, the evaluation its
    telemetry id and (unless the client reported one itself) the telemetry's accuracy when
    it is one (in [0, 1]), and a device not yet bound is bound to the platform (once, for
    good)."""
    c.execute(telemetry.update().where(telemetry.c.id == tid).values(
        platform=platform, round=rnd))
    reported = (sa.select(telemetry.c.accuracy)
                .where(telemetry.c.id == tid, telemetry.c.accuracy.between(0.0, 1.0))
                .scalar_subquery())
    c.execute(evaluations.update().where(evaluations.c.id == eid).values(
        telemetry_id=tid, accuracy=sa.func.coalesce(evaluations.c.accuracy, reported)))
    c.execute(devices.update().where(devices.c.id == device_id,
                                     devices.c.platform.is_(None)).values(
        platform=platform))


def _match_telemetry(c: Any, tid: int, session_id: int, device_id: int, bound: str | None,
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
    _attribute(c, tid, ok[0].id, device_id, ok[0].platform, ok[0].round)
    return True


def _match_evaluation(c: Any, eid: int, session_id: int, rnd: int, platform: str,
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
        _attribute(c, t.id, eid, t.device_id, platform, rnd)
        return True
    return False


class Registry:
    """All persistent state; safe to open from several processes at once."""

    def __init__(self, data_dir: str | os.PathLike[str], db_url: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir = self.data_dir / "registry"  # not "artifacts": users export there
        self.checkpoint_dir = self.data_dir / "checkpoints"
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'xflwb.db'}"
        self.engine = _engine(self.db_url)
        try:  # the schema a registry of any older xflwb had, brought up to date
            migrations.migrate(self.engine)
        except migrations.NewerSchema as exc:
            self.engine.dispose()
            raise SchemaTooNew(
                f"the registry database {self.db_url} has schema version {exc.found}, "
                f"written by a newer xflwb (this one knows up to version {exc.known}): "
                "upgrade xflwb (pip install -U xflwb), or open another data_dir / db_url"
            ) from None

    def close(self) -> None:
        """Close every connection this registry holds. It stays readable (a session handle
        is read after its simulation ended): from now on each call opens a connection of
        its own and closes it again, so a closed registry never holds the database open."""
        old, self.engine = self.engine, _engine(self.db_url, pooled=False)
        old.dispose()  # the new engine first: a reader meanwhile never reopens the old pool

    def database_file(self) -> Path | None:
        """The SQLite database file (None for a server database such as PostgreSQL, or an
        in-memory one)."""
        url = sa.engine.make_url(self.db_url)
        if not url.drivername.startswith("sqlite") or not url.database \
                or url.database == ":memory:":
            return None
        return Path(url.database).resolve()

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
            mid = _inserted_id(c.execute(models.insert().values(
                name=m["name"], version=m["version"], data_type=m["data_type"],
                manifest=json.dumps(public), directory=str(dest), created=time.time())))
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

    def advertised(self, data_type: str, platform: str
                   ) -> tuple[dict[str, Any], dict[str, Any]] | None:
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
    def create_session(self, model: dict[str, Any], config: Any,
                       exclusive: bool = False, engine: str | None = None) -> int:
        """Insert a ``starting`` session launched by this process.

        ``config``: the session's validated options (a ``RoundOptions`` dataclass: stored
        as its JSON, the one place options become JSON; the session process rebuilds it
        with ``from_stored``), or such a dict.
        ``engine``: "phone" or "simulation" (default: the config's ``engine``, else
        "phone"). ``exclusive`` (phone sessions): the check for the model's active session
        and the insert are one transaction, and the unique partial index refuses a racing
        second insert; the loser gets ``SessionConflict`` naming the winner."""
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
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
                return _inserted_id(c.execute(sessions.insert().values(**values)))
        except sa.exc.IntegrityError:
            if not exclusive:
                raise
            active = self.active_session_for(model["name"])
            raise SessionConflict(model["name"], active["id"] if active else None,
                                  active["status"] if active else None) from None

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
    def _active_query(model_name: str) -> sa.Select[Any]:
        return (sessions.select().where(sessions.c.model_name == model_name,
                                        sessions.c.status.in_(ACTIVE), ~IS_SIMULATION)
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
            return _inserted_id(c.execute(checkpoints.insert().values(
                session_id=session_id, model_name=model["name"],
                model_version=model["version"], round=rnd, path=str(path), time=time.time(),
                sha256=sha256)))

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
                sa.select(sessions.c.id).where(IS_SIMULATION)))
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

    def resume_origin(self, checkpoint_id: int) -> dict[str, Any]:
        """Where the weights of checkpoint ``checkpoint_id`` (a session resumed from it)
        came from, following resumes back while a checkpoint only holds weights its session
        started from: ``{"session_id", "round"}`` of the session that trained them (round 0
        of a session that did not resume: the exported weights, ``"exported": True``), or
        ``{"missing": id}`` when a checkpoint on the way is no longer in the registry."""
        ckpt_id, seen = checkpoint_id, set()
        with self.engine.connect() as c:
            while True:
                row = c.execute(checkpoints.select().where(checkpoints.c.id == ckpt_id)
                                ).first()
                if row is None:
                    return {"missing": ckpt_id}
                if row.session_id in seen:
                    break
                seen.add(row.session_id)
                origin = c.execute(sa.select(sessions.c.resumed_from)
                                   .where(sessions.c.id == row.session_id)).scalar()
                if origin is None:
                    return {"session_id": row.session_id, "round": row.round,
                            "exported": row.round == 0}
                start = c.execute(sa.select(checkpoints.c.round)
                                  .where(checkpoints.c.id == origin)).scalar()
                if row.round not in (0, start):  # a round that session trained itself
                    break
                ckpt_id = origin
        return {"session_id": row.session_id, "round": row.round, "exported": False}

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

    # -- device tokens (xflwb.server.security.TokenStore says what they mean) -----------------
    def add_device_token(self, device: str, sha256: str, expires: float | None,
                         session_id: int | None) -> dict[str, Any]:
        """Store a new token's digest; its row (id, device, created, expires, session)."""
        now = time.time()
        with self.engine.begin() as c:
            tid = _inserted_id(c.execute(device_tokens.insert().values(
                device=device, sha256=sha256, created=now, expires=expires,
                session_id=session_id)))
        return {"id": int(tid), "device": device, "created": now, "expires": expires,
                "session": session_id}

    def device_token(self, sha256: str) -> dict[str, Any] | None:
        """The token row with this digest (id, device, created, revoked, expires,
        session_id), or None."""
        with self.engine.connect() as c:
            row = c.execute(device_tokens.select().where(device_tokens.c.sha256 == sha256)
                            ).first()
        return None if row is None else dict(row._mapping)

    def device_tokens_by_id(self, ids: list[int]) -> list[dict[str, Any]]:
        """The token rows of ``ids`` (those that exist)."""
        t, out = device_tokens, []
        with self.engine.connect() as c:
            for k in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                out += [dict(r._mapping) for r in c.execute(
                    t.select().where(t.c.id.in_(ids[k:k + 500])))]
        return out

    def device_token_revocations(self) -> tuple[int, float]:
        """(revoked tokens, newest revocation time): one cheap row that changes whenever a
        token is revoked."""
        t = device_tokens
        with self.engine.connect() as c:
            n, newest = cast(tuple[int | None, float | None],  # SQLAlchemy types it object
                             c.execute(sa.select(sa.func.count(t.c.id), sa.func.max(t.c.revoked))
                                       .where(t.c.revoked.is_not(None))).one())
        return int(n or 0), float(newest or 0.0)

    def revoke_device_tokens(self, token_id: int | None = None,
                             device: str | None = None) -> int:
        """Revoke the token ``token_id``, or every token of ``device``; how many were
        still unrevoked."""
        t = device_tokens
        where = (t.c.id == int(token_id)) if token_id is not None else (t.c.device == device)
        with self.engine.begin() as c:
            n = c.execute(t.update().where(where & t.c.revoked.is_(None))
                          .values(revoked=time.time())).rowcount
        return int(n or 0)

    def list_device_tokens(self) -> list[dict[str, Any]]:
        """Every token row (id, device, created, expires, session, revoked), oldest first."""
        t = device_tokens
        with self.engine.connect() as c:
            rows = c.execute(sa.select(t.c.id, t.c.device, t.c.created, t.c.expires,
                                       t.c.session_id.label("session"), t.c.revoked)
                             .order_by(t.c.id)).all()
        return [dict(r._mapping) for r in rows]

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
            tid = _inserted_id(c.execute(telemetry.insert().values(
                kind=kind, device_id=device_id, session_id=sid, round=rnd, platform=None,
                start=body["start"], end=body["end"], loss=body.get("loss"),
                accuracy=body.get("accuracy"), test_size=body.get("test_size"),
                received=now)))
            if kind == "evaluate":
                _match_telemetry(c, tid, sid, device_id,
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
    # match (``_match_telemetry`` / ``_match_evaluation`` above).
    def add_evaluations(self, session_id: int, rnd: int,
                        rows: Sequence[tuple[Any, ...]]) -> None:
        """Record the round's per-client EvaluateRes ``(platform, client, loss,
        num_examples[, accuracy])`` (accuracy None or absent: the client reported none, its
        matched telemetry may bring it), each matched with telemetry already received."""
        if not rows:
            return
        with self.engine.begin() as c:
            for p, cid, loss, n, *rest in rows:
                acc = rest[0] if rest else None
                eid = _inserted_id(c.execute(evaluations.insert().values(
                    session_id=session_id, round=rnd, platform=p, client=cid, loss=loss,
                    num_examples=n,
                    accuracy=None if acc is None or not np.isfinite(acc) else float(acc))))
                _match_evaluation(c, eid, session_id, rnd, p, loss, n)

    def client_evaluations(self, session_id: int) -> list[tuple[Any, ...]]:
        """Every client evaluation of a session, ``(round, platform, client, num_examples,
        loss, accuracy)`` in round order (then as recorded): one query over the
        ``session_id`` index, one row per client evaluation (a session of R rounds
        evaluating E clients each has R × E)."""
        e = evaluations
        q = (sa.select(e.c.round, e.c.platform, e.c.client, e.c.num_examples, e.c.loss,
                       e.c.accuracy)
             .where(e.c.session_id == int(session_id)).order_by(e.c.round, e.c.id))
        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(q).all()]

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
