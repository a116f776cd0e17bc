-- The validation points of a compare job's full runs, one row per recipe, seed and
-- evaluation, in the order they were measured (`position`, from 0 per job).
CREATE TABLE race_point (
    job_id       text NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    run          bigint NOT NULL,
    position     bigint NOT NULL,
    recipe       text NOT NULL,
    seed         bigint NOT NULL,
    step         bigint NOT NULL,
    seconds      double precision NOT NULL,
    val_loss     double precision,
    val_accuracy double precision,
    PRIMARY KEY (job_id, position)
);
