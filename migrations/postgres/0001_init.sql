-- Jobs, their curves and sweep runs, and uploaded datasets (DESIGN section 6), for a
-- PostgreSQL database shared by API replicas and workers on many hosts. The same tables and
-- meanings as migrations/sqlite, in PostgreSQL's types: times are timestamptz (the API shows
-- them as UTC ISO 8601 with milliseconds, through iso_time), flags are booleans, and the
-- uploaded bytes are bytea, so that every host reads them from here.

CREATE FUNCTION iso_time(t timestamptz) RETURNS text
    LANGUAGE sql STABLE
    AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

CREATE TABLE job (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               text NOT NULL UNIQUE,
    kind             text NOT NULL,
    name             text,
    spec             text NOT NULL,
    status           text NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    stage            text,
    progress_done    bigint NOT NULL DEFAULT 0,
    progress_total   bigint NOT NULL DEFAULT 0,
    error            text,
    result           text,
    attempts         bigint NOT NULL DEFAULT 0,
    worker           text,
    cancel_requested boolean NOT NULL DEFAULT false,
    heartbeat_at     timestamptz,
    -- Until when the worker that runs the job holds it (see migrations/sqlite/0003_lease.sql).
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz
);

CREATE INDEX job_by_status ON job (status, seq);
CREATE INDEX job_by_lease ON job (lease_until) WHERE status = 'running';

-- One point per range-test step; `run` is the attempt that wrote it.
CREATE TABLE curve_point (
    job_id   text NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run      bigint NOT NULL,
    step     bigint NOT NULL,
    lr       double precision NOT NULL,
    loss     double precision,
    smoothed double precision,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE sweep_run (
    job_id       text NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          bigint NOT NULL,
    position     bigint NOT NULL,
    peak_lr      double precision NOT NULL,
    seed         bigint NOT NULL,
    steps        bigint,
    val_loss     double precision,
    val_accuracy double precision,
    train_loss   double precision,
    diverged     boolean NOT NULL,
    PRIMARY KEY (job_id, position)
);

CREATE TABLE dataset (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text NOT NULL UNIQUE,
    name         text,
    format       text NOT NULL CHECK (format IN ('csv', 'text', 'idx', 'npy')),
    target       text,
    rows         bigint NOT NULL,
    features     bigint NOT NULL,
    sample_shape text NOT NULL,
    classes      bigint,
    vocabulary   bigint,
    task         text NOT NULL,
    sha256       text NOT NULL,
    bytes        bigint NOT NULL,
    x            bytea NOT NULL,
    y            bytea,
    created_at   timestamptz NOT NULL
);
