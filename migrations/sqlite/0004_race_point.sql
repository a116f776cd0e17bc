-- The validation points of a compare job's full runs, one row per recipe, seed and
-- evaluation, in the order they were measured (`position`, from 0 per job).
CREATE TABLE race_point (
    job_id       TEXT NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    recipe       TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    step         INTEGER NOT NULL,
    seconds      REAL NOT NULL,
    val_loss     REAL,
    val_accuracy REAL,
    PRIMARY KEY (job_id, position)
);
