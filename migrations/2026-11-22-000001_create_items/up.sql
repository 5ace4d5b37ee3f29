-- The application data stalewatch watches: one row per item, cached in Redis as JSON.
CREATE TABLE items (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    value      jsonb       NOT NULL,
    -- Bumped by exactly one on every update; the cache carries it so a stale copy is recognisable.
    version    bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
