-- The registry schema of xflwb at 62e53d1 (checkpoint retention), the release before schema
-- versions: no schema_version, privacy_events, lineages, devices.token_id, device_tokens.expires
-- or device_tokens.session_id. Dumped from a database that release made (sqlite_master).

CREATE TABLE models (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	version INTEGER NOT NULL,
	data_type VARCHAR(128) NOT NULL,
	manifest TEXT NOT NULL,
	directory TEXT NOT NULL,
	created FLOAT NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name, version)
);
CREATE INDEX ix_models_data_type ON models (data_type);
CREATE TABLE devices (
	id INTEGER NOT NULL,
	platform VARCHAR(16),
	first_seen FLOAT NOT NULL,
	last_seen FLOAT NOT NULL,
	last_session_id INTEGER,
	PRIMARY KEY (id)
);
CREATE TABLE telemetry (
	id INTEGER NOT NULL,
	kind VARCHAR(16) NOT NULL,
	device_id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	round INTEGER,
	platform VARCHAR(16),
	start BIGINT NOT NULL,
	"end" BIGINT NOT NULL,
	loss FLOAT,
	accuracy FLOAT,
	test_size INTEGER,
	received FLOAT NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_telemetry_session_id ON telemetry (session_id);
CREATE INDEX telemetry_match ON telemetry (session_id, kind, platform, test_size, loss);
CREATE TABLE artifacts (
	id INTEGER NOT NULL,
	model_id INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	file TEXT NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	bytes INTEGER NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (model_id, platform),
	FOREIGN KEY(model_id) REFERENCES models (id)
);
CREATE TABLE sessions (
	id INTEGER NOT NULL,
	model_id INTEGER NOT NULL,
	model_name VARCHAR(64) NOT NULL,
	status VARCHAR(16) NOT NULL,
	engine VARCHAR(16) DEFAULT 'phone' NOT NULL,
	config TEXT NOT NULL,
	ports TEXT,
	pid INTEGER,
	launcher_pid INTEGER,
	round INTEGER NOT NULL,
	resumed_from INTEGER,
	error TEXT,
	started FLOAT NOT NULL,
	ended FLOAT,
	PRIMARY KEY (id),
	FOREIGN KEY(model_id) REFERENCES models (id)
);
CREATE INDEX ix_sessions_model_name ON sessions (model_name);
CREATE UNIQUE INDEX one_active_session_per_model ON sessions (model_name) WHERE status IN ('starting', 'running') AND engine != 'simulation';
CREATE TABLE metrics (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	metric VARCHAR(64) NOT NULL,
	value FLOAT,
	time FLOAT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX ix_metrics_session_id ON metrics (session_id);
CREATE TABLE rejections (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	client VARCHAR(64) NOT NULL,
	reason TEXT NOT NULL,
	time FLOAT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX ix_rejections_session_id ON rejections (session_id);
CREATE TABLE client_failures (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	client VARCHAR(64) NOT NULL,
	reason TEXT NOT NULL,
	time FLOAT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX ix_client_failures_session_id ON client_failures (session_id);
CREATE TABLE checkpoints (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	model_name VARCHAR(64) NOT NULL,
	model_version INTEGER NOT NULL,
	round INTEGER NOT NULL,
	path TEXT NOT NULL,
	time FLOAT NOT NULL,
	sha256 VARCHAR(64),
	pruned FLOAT,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX ix_checkpoints_model_name ON checkpoints (model_name);
CREATE TABLE arrivals (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	version INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	client VARCHAR(64) NOT NULL,
	base_version INTEGER NOT NULL,
	staleness INTEGER NOT NULL,
	weight FLOAT NOT NULL,
	examples INTEGER NOT NULL,
	fit_seconds FLOAT,
	seconds FLOAT NOT NULL,
	status VARCHAR(16) NOT NULL,
	reason TEXT NOT NULL,
	time FLOAT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX ix_arrivals_session_id ON arrivals (session_id);
CREATE TABLE evaluations (
	id INTEGER NOT NULL,
	session_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	platform VARCHAR(16) NOT NULL,
	client VARCHAR(64) NOT NULL,
	loss FLOAT,
	num_examples INTEGER NOT NULL,
	telemetry_id INTEGER,
	PRIMARY KEY (id),
	FOREIGN KEY(session_id) REFERENCES sessions (id)
);
CREATE INDEX evaluation_match ON evaluations (session_id, telemetry_id, num_examples, loss);
CREATE INDEX ix_evaluations_session_id ON evaluations (session_id);
CREATE TABLE device_tokens (
	id INTEGER NOT NULL,
	device VARCHAR(128) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	created FLOAT NOT NULL,
	revoked FLOAT,
	PRIMARY KEY (id),
	UNIQUE (sha256)
);
