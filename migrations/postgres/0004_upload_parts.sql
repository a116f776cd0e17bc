-- Uploaded bytes in parts of at most 1 MiB (src/store/parts.rs): storing or reading a large
-- upload never holds a second whole copy of it in a message. Uploads stored before keep
-- their bytes inline (dataset.x and y, weights.data); new ones leave those empty (y stays
-- NULL when there is no y).
CREATE TABLE dataset_part (
    dataset_id text NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    part       text NOT NULL CHECK (part IN ('x', 'y')),
    position   bigint NOT NULL,
    bytes      bytea NOT NULL,
    PRIMARY KEY (dataset_id, part, position)
);

CREATE TABLE weights_part (
    weights_id text NOT NULL REFERENCES weights (id) ON DELETE CASCADE,
    position   bigint NOT NULL,
    bytes      bytea NOT NULL,
    PRIMARY KEY (weights_id, position)
);
