UPDATE inconsistencies SET rewrite_cause = NULL, rewritten_at = NULL
    WHERE rewrite_cause = 'invalidation';
ALTER TABLE inconsistencies
    DROP CONSTRAINT inconsistencies_rewrite_cause_check,
    ADD CONSTRAINT inconsistencies_rewrite_cause_check
        CHECK (rewrite_cause IS NULL OR rewrite_cause IN ('refresh', 'repair'));
