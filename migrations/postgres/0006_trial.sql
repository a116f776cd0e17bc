-- A job's trials, one row per training run (see migrations/sqlite/0008_trial.sql).
CREATE TABLE trial (
    job_id       text NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          bigint NOT NULL,
    position     bigint NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('range_test', 'sweep', 'race')),
    lr           double precision,
    recipe       text,
    seed         bigint NOT NULL,
    steps        bigint NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('running', 'succeeded', 'failed', 'canceled')),
    worker       text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    seconds      double precision,
    steps_run    bigint,
    val_loss     double precision,
    val_accuracy double precision,
    diverged_at  bigint,
    PRIMARY KEY (job_id, position)
);

CREATE INDEX trial_by_status ON trial (status);
