-- The confirmation backstop: Detected incidents by due time, read every few seconds.
CREATE INDEX inconsistencies_detected_due
    ON inconsistencies (confirm_due_at)
    WHERE state = 'detected';

-- Retention: closed incidents by closing time, deleted in bounded batches.
CREATE INDEX inconsistencies_closed_at
    ON inconsistencies (resolved_at)
    WHERE resolved_at IS NOT NULL;
