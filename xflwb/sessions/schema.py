"""The registry's tables: the one declaration of its database schema.

Only the registry (``xflwb.sessions.registry``) and its migrations
(``xflwb.sessions.migrations``) use these: every other module asks a ``Registry`` method.
A change here is a new migration step too (``migrations.MIGRATIONS``), so a database made by
an older xflwb is brought up to date when it is opened.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from xflwb.sessions.status import ACTIVE

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
def _per_round(name: str, *columns: sa.Column[Any]) -> sa.Table:
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
IS_SIMULATION = sessions.c.engine == "simulation"
#: how rows written before the ``engine`` column existed said so: in their config JSON
#: (SimulationConfig's ``engine`` field); used once, to fill the column in
SIMULATION_IN_CONFIG = sessions.c.config.like('%"engine": "simulation"%')
#: at most one active phone session per model, enforced by the database itself: two starts
#: racing (threads, the API and a notebook, two processes) cannot both insert one
ONE_ACTIVE_SESSION = sa.Index(
    "one_active_session_per_model", sessions.c.model_name, unique=True,
    sqlite_where=sa.and_(sessions.c.status.in_([str(s) for s in ACTIVE]), ~IS_SIMULATION),
    postgresql_where=sa.and_(sessions.c.status.in_([str(s) for s in ACTIVE]), ~IS_SIMULATION))
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


#: per-client EvaluateRes: every client's evaluation (``Session.client_metrics``), and what
#: attributes telemetry to a platform
evaluations = _per_round(
    "evaluations",
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("loss", sa.Float),
    sa.Column("num_examples", sa.Integer, nullable=False),
    sa.Column("telemetry_id", sa.Integer),
    #: the accuracy the client reported in its metrics (simulated clients), else its matched
    #: evaluate telemetry's (FedKit phones); NULL: none (yet), or a row of an older xflwb
    sa.Column("accuracy", sa.Float),
)
#: telemetry ↔ evaluation matching looks rows up by key (session, size, loss range), never
#: scanning every unmatched row: flooding a session with telemetry costs lookups O(log n)
TELEMETRY_MATCH = sa.Index("telemetry_match", telemetry.c.session_id, telemetry.c.kind,
                           telemetry.c.platform, telemetry.c.test_size, telemetry.c.loss)
EVALUATION_MATCH = sa.Index("evaluation_match", evaluations.c.session_id,
                            evaluations.c.telemetry_id, evaluations.c.num_examples,
                            evaluations.c.loss)

#: the longest device name a token is issued for (``device_tokens.device``)
MAX_DEVICE_NAME = 128
#: per-device tokens (``xflwb.server.security.TokenStore``): SHA-256 digests only, the token
#: itself is shown once, when issued; the session processes check gRPC joins against it
device_tokens = sa.Table(
    "device_tokens", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("device", sa.String(MAX_DEVICE_NAME), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float, nullable=True),
    #: epoch seconds after which the token is refused (``ttl``); null: never
    sa.Column("expires", sa.Float, nullable=True),
    #: the one session the token is valid for; null: every session
    sa.Column("session_id", sa.Integer, nullable=True),
)
