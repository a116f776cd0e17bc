-- A job's trials: each training run of its range test, sweep and race, one row each, in the
-- order they started (`position`, from 0 per job); `run` is the job's attempt that ran it.
-- A row is written as the trial starts (`running`) and updated once as it ends. `lr` is a
-- sweep run's peak or a race run's rate (NULL for the range test); `recipe` names a compare
-- job's recipe. A finished trial keeps its wall time, the steps it took, its final
-- validation and the step its loss stopped being finite at (`diverged_at`).
CREATE TABLE trial (
    job_id       TEXT NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('range_test', 'sweep', 'race')),
    lr           REAL,
    recipe       TEXT,
    seed         INTEGER NOT NULL,
    steps        INTEGER NOT NULL,
    status       TEXT NOT NULL
                 CHECK (status IN ('running', 'succeeded', 'failed', 'canceled')),
    worker       TEXT,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    seconds      REAL,
    steps_run    INTEGER,
    val_loss     REAL,
    val_accuracy REAL,
    diverged_at  INTEGER,
    PRIMARY KEY (job_id, position)
);

CREATE INDEX trial_by_status ON trial (status);
