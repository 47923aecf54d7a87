"""The registry: published models, sessions, metrics, checkpoints, devices, telemetry.

SQLAlchemy Core over embedded SQLite (WAL, so the API thread and every session process can
write at once); the URL is configurable so a team can point it at PostgreSQL. Artifacts are
copied under ``<data_dir>/registry/<name>/v<version>/`` and never change afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from xflwb.bridge import manifest as manifest_mod

PLATFORM_FLAGS = {"android": "tflite", "ios": "coreml"}
ACTIVE = ("starting", "running")

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
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("ports", sa.Text),  # JSON {"android": port, "ios": port}
    sa.Column("pid", sa.Integer),
    sa.Column("round", sa.Integer, nullable=False, default=0),
    sa.Column("resumed_from", sa.Integer),  # checkpoint id
    sa.Column("error", sa.Text),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
)
metrics = sa.Table(
    "metrics", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("time", sa.Float, nullable=False),
)
rejections = sa.Table(
    "rejections", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
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
)
#: sessions run on the Simulation Engine (their config says so; see SimulationConfig)
_SIMULATION = sessions.c.config.like('%"engine": "simulation"%')
devices = sa.Table(
    "devices", meta,
    sa.Column("id", sa.Integer, primary_key=True),  # FedKit's device_id
    sa.Column("platform", sa.String(16)),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("last_session_id", sa.Integer),
)
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


evaluations = sa.Table(  # per-client EvaluateRes, used to attribute telemetry to a platform
    "evaluations", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("session_id", sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("platform", sa.String(16), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("loss", sa.Float),
    sa.Column("num_examples", sa.Integer, nullable=False),
    sa.Column("telemetry_id", sa.Integer),
)


class RegistryError(ValueError):
    """A request the registry cannot honour; the message says why and what to do."""


class NotFound(RegistryError):
    pass


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


class Registry:
    """All persistent state; safe to open from several processes at once."""

    def __init__(self, data_dir: str | Path, db_url: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir = self.data_dir / "registry"  # not "artifacts": users export there
        self.checkpoint_dir = self.data_dir / "checkpoints"
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'xflwb.db'}"
        self.engine = _engine(self.db_url)
        meta.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- models ------------------------------------------------------------------------------
    def publish(self, source: Any) -> dict[str, Any]:
        """Register an export (``ExportResult``, manifest dict with ``_dir``, or a path)."""
        m = getattr(source, "manifest", source)
        if isinstance(m, str | Path):
            m = manifest_mod.load(m)
        if not isinstance(m, dict) or "_dir" not in m:
            raise RegistryError("publish() takes an ExportResult, an export directory or a "
                                "manifest.json path")
        manifest_mod.validate(m)
        src = Path(m["_dir"])
        for plat, entry in m["platforms"].items():
            path = src / entry["file"]
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
    def create_session(self, model: dict[str, Any], config: dict[str, Any]) -> int:
        with self.engine.begin() as c:
            return c.execute(sessions.insert().values(
                model_id=model["id"], model_name=model["name"], status="starting",
                config=json.dumps(config), round=0, started=time.time())
            ).inserted_primary_key[0]

    def update_session(self, session_id: int, **values: Any) -> None:
        if "ports" in values and not isinstance(values["ports"], str | None):
            values["ports"] = json.dumps(values["ports"])
        if values.get("status") in ("finished", "failed", "stopped", "crashed"):
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

    def active_session_for(self, model_name: str) -> dict[str, Any] | None:
        """The model's running phone session (simulations never take phones)."""
        q = (sessions.select().where(sessions.c.model_name == model_name,
                                     sessions.c.status.in_(ACTIVE), ~_SIMULATION)
             .order_by(sessions.c.id.desc()))
        with self.engine.connect() as c:
            row = c.execute(q).first()
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
                       path: Path) -> int:
        with self.engine.begin() as c:
            return c.execute(checkpoints.insert().values(
                session_id=session_id, model_name=model["name"],
                model_version=model["version"], round=rnd, path=str(path), time=time.time())
            ).inserted_primary_key[0]

    def latest_checkpoint(self, model_name: str, model_version: int | None = None,
                          session_id: int | None = None) -> dict[str, Any] | None:
        q = checkpoints.select().where(checkpoints.c.model_name == model_name)
        if model_version is not None:
            q = q.where(checkpoints.c.model_version == model_version)
        if session_id is not None:
            q = q.where(checkpoints.c.session_id == session_id)
        else:  # a phone session resumes from phone sessions, never from a simulation
            q = q.where(checkpoints.c.session_id.not_in(
                sa.select(sessions.c.id).where(_SIMULATION)))
        with self.engine.connect() as c:
            row = c.execute(q.order_by(checkpoints.c.id.desc())).first()
        return None if row is None else dict(row._mapping)

    # -- devices and telemetry ---------------------------------------------------------------
    def add_telemetry(self, kind: str, body: dict[str, Any]) -> int:
        now = time.time()
        session = self.get_session(int(body["session_id"]))
        platform = None
        with self.engine.connect() as c:
            dev = c.execute(devices.select().where(devices.c.id == body["device_id"])).first()
        platform = dev.platform if dev is not None else None
        with self.engine.begin() as c:
            if dev is None:
                c.execute(devices.insert().values(id=body["device_id"], platform=platform,
                                                  first_seen=now, last_seen=now,
                                                  last_session_id=session["id"]))
            else:
                c.execute(devices.update().where(devices.c.id == body["device_id"]).values(
                    last_seen=now, last_session_id=session["id"]))
            return c.execute(telemetry.insert().values(
                kind=kind, device_id=body["device_id"], session_id=session["id"],
                round=session["round"], platform=platform, start=body["start"],
                end=body["end"], loss=body.get("loss"), accuracy=body.get("accuracy"),
                test_size=body.get("test_size"), received=now)).inserted_primary_key[0]

    def note_device(self, device_id: int, platform: str) -> None:
        now = time.time()
        with self.engine.begin() as c:
            row = c.execute(devices.select().where(devices.c.id == device_id)).first()
            if row is None:
                c.execute(devices.insert().values(id=device_id, platform=platform,
                                                  first_seen=now, last_seen=now))
            else:
                c.execute(devices.update().where(devices.c.id == device_id).values(
                    platform=platform, last_seen=now))

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
    def add_evaluations(self, session_id: int, rnd: int,
                        rows: list[tuple[str, str, float, int]]) -> None:
        if rows:
            with self.engine.begin() as c:
                c.execute(evaluations.insert(), [
                    {"session_id": session_id, "round": rnd, "platform": p, "client": cid,
                     "loss": loss, "num_examples": n} for p, cid, loss, n in rows])
        self.match_telemetry(session_id)

    def match_telemetry(self, session_id: int) -> int:
        """Attribute evaluate telemetry to a platform and round.

        FedKit's telemetry carries no platform, and gRPC carries no device id; but a device
        reports the same loss and test size in its EvaluateRes (platform known from the port)
        and in ``telemetry/evaluate_ins``. Whichever arrives second makes the match.
        """
        matched = 0
        with self.engine.begin() as c:
            tel = c.execute(telemetry.select().where(
                telemetry.c.session_id == session_id, telemetry.c.kind == "evaluate",
                telemetry.c.platform.is_(None)).order_by(telemetry.c.id)).all()
            if not tel:
                return 0
            ev = c.execute(evaluations.select().where(
                evaluations.c.session_id == session_id,
                evaluations.c.telemetry_id.is_(None)).order_by(evaluations.c.id)).all()
            used: set[int] = set()
            for t in tel:
                for e in ev:
                    if e.id in used or e.num_examples != t.test_size or e.loss is None:
                        continue
                    if t.loss is None or abs(e.loss - t.loss) > 1e-4 * max(1.0, abs(e.loss)):
                        continue
                    used.add(e.id)
                    c.execute(telemetry.update().where(telemetry.c.id == t.id).values(
                        platform=e.platform, round=e.round))
                    c.execute(evaluations.update().where(evaluations.c.id == e.id).values(
                        telemetry_id=t.id))
                    c.execute(devices.update().where(devices.c.id == t.device_id).values(
                        platform=e.platform))
                    matched += 1
                    break
        return matched

    def accuracy_metrics(self, session_id: int) -> list[dict[str, Any]]:
        """Per round and platform: test-size-weighted accuracy reported by devices."""
        q = (sa.select(telemetry.c.round, telemetry.c.platform, telemetry.c.accuracy,
                       telemetry.c.test_size)
             .where(telemetry.c.session_id == session_id, telemetry.c.kind == "evaluate",
                    telemetry.c.accuracy.is_not(None), telemetry.c.round.is_not(None)))
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        sums: dict[tuple[int, str], list[float]] = {}
        for r in rows:
            w = float(r.test_size or 1)
            for plat in {r.platform or "unattributed", "all"}:
                acc = sums.setdefault((r.round, plat), [0.0, 0.0])
                acc[0] += float(r.accuracy) * w
                acc[1] += w
        return [{"round": rnd, "platform": plat, "metric": "accuracy", "value": s / n}
                for (rnd, plat), (s, n) in sorted(sums.items()) if n]
