-- Jobs, their curves and sweep runs, and uploaded datasets (DESIGN section 6).
-- Timestamps are UTC ISO 8601 text with milliseconds, written by SQLite itself, so that
-- string order is time order and staleness is one comparison.

CREATE TABLE job (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    name             TEXT,
    spec             TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    stage            TEXT,
    progress_done    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    result           TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    heartbeat_at     TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);

CREATE INDEX job_by_status ON job (status, seq);

-- One point per range-test step; `run` is the attempt that wrote it.
CREATE TABLE curve_point (
    job_id   TEXT NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run      INTEGER NOT NULL,
    step     INTEGER NOT NULL,
    lr       REAL NOT NULL,
    loss     REAL,
    smoothed REAL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE sweep_run (
    job_id       TEXT NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    peak_lr      REAL NOT NULL,
    seed         INTEGER NOT NULL,
    val_loss     REAL,
    val_accuracy REAL,
    train_loss   REAL,
    diverged     INTEGER NOT NULL,
    PRIMARY KEY (job_id, position)
);

CREATE TABLE dataset (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT,
    format       TEXT NOT NULL CHECK (format IN ('csv', 'text', 'idx', 'npy')),
    target       TEXT,
    rows         INTEGER NOT NULL,
    features     INTEGER NOT NULL,
    sample_shape TEXT NOT NULL,
    classes      INTEGER,
    vocabulary   INTEGER,
    task         TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    bytes        INTEGER NOT NULL,
    x            BLOB NOT NULL,
    y            BLOB,
    created_at   TEXT NOT NULL
);
