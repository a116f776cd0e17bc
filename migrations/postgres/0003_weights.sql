-- Initial weights uploaded with POST /v1/weights: a safetensors file, validated at upload,
-- with its tensors' names and shapes (JSON text) and its bytes.
CREATE TABLE weights (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text NOT NULL UNIQUE,
    name         text,
    bytes        bigint NOT NULL,
    sha256       text NOT NULL,
    tensors      bigint NOT NULL,
    shapes       text NOT NULL,
    data         bytea NOT NULL,
    created_at   timestamptz NOT NULL
);
