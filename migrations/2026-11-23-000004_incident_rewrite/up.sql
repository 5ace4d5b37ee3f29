-- A refresh or repair that is rewriting an open incident's key says so here before it writes,
-- so that whichever observer then sees the key agree (the rewrite's own check, the sweep, a
-- keyspace notification) closes the incident with the rewrite's cause.
ALTER TABLE inconsistencies
    ADD COLUMN rewritten_at  timestamptz,
    ADD COLUMN rewrite_cause text
        CHECK (rewrite_cause IS NULL OR rewrite_cause IN ('refresh', 'repair'));
