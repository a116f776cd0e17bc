-- Uploaded bytes in parts of at most 1 MiB (src/store/parts.rs): storing or reading a large
-- upload never makes the database hold a second whole copy of it (a bound value, the record
-- built from it). Uploads stored before keep their bytes inline (dataset.x and y,
-- weights.data); new ones leave those empty (y stays NULL when there is no y).
CREATE TABLE dataset_part (
    dataset_id TEXT NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    part       TEXT NOT NULL CHECK (part IN ('x', 'y')),
    position   INTEGER NOT NULL,
    bytes      BLOB NOT NULL,
    PRIMARY KEY (dataset_id, part, position)
);

CREATE TABLE weights_part (
    weights_id TEXT NOT NULL REFERENCES weights (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    bytes      BLOB NOT NULL,
    PRIMARY KEY (weights_id, position)
);
