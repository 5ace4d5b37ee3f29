-- One row per incident: a divergence between a DB row and its cached copy, followed from
-- detection to closure. The state machine lives in stalewatch-core::incident.
CREATE TABLE inconsistencies (
    id              bigserial   PRIMARY KEY,
    cache_key       text        NOT NULL,
    entity          text        NOT NULL,
    entity_id       text        NOT NULL,
    state           text        NOT NULL
        CHECK (state IN ('detected', 'confirmed', 'persistent', 'resolved', 'transient')),
    kind            text        NOT NULL,
    db_version      bigint,
    cache_version   bigint,
    db_value        text,
    cache_value     text,
    diff            text        NOT NULL DEFAULT '',
    first_seen_at   timestamptz NOT NULL,
    confirm_due_at  timestamptz NOT NULL,
    confirmed_at    timestamptz,
    last_seen_at    timestamptz NOT NULL,
    resolved_at     timestamptz,
    resolution      text
        CHECK (resolution IS NULL OR resolution IN ('write', 'refresh', 'repair', 'invalidation', 'natural')),
    observations    bigint      NOT NULL DEFAULT 1 CHECK (observations >= 1),
    CHECK ((state IN ('resolved', 'transient')) = (resolved_at IS NOT NULL))
);

-- The one-open-incident-per-key guarantee: a second INSERT for a key with an open incident
-- conflicts, whichever worker sends it.
CREATE UNIQUE INDEX inconsistencies_one_open_per_key
    ON inconsistencies (cache_key)
    WHERE state IN ('detected', 'confirmed', 'persistent');

-- Listing by state, newest first, with keyset pagination on id.
CREATE INDEX inconsistencies_state_id ON inconsistencies (state, id DESC);
CREATE INDEX inconsistencies_key_id ON inconsistencies (cache_key, id DESC);
