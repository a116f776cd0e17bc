-- Initial weights uploaded with POST /v1/weights: a safetensors file, validated at upload,
-- with its tensors' names and shapes (JSON text) and its bytes.
CREATE TABLE weights (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT,
    bytes        INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    tensors      INTEGER NOT NULL,
    shapes       TEXT NOT NULL,
    data         BLOB NOT NULL,
    created_at   TEXT NOT NULL
);
