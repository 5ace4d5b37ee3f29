-- An invalidation (on_change = "invalidate") deletes keys the way a refresh rewrites them, and
-- says so on their open incidents first, so the check that then finds the key agree closes the
-- incident with cause 'invalidation'.
ALTER TABLE inconsistencies
    DROP CONSTRAINT inconsistencies_rewrite_cause_check,
    ADD CONSTRAINT inconsistencies_rewrite_cause_check
        CHECK (rewrite_cause IS NULL OR rewrite_cause IN ('refresh', 'repair', 'invalidation'));
