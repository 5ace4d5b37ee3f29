ALTER TABLE inconsistencies DROP COLUMN rewrite_cause, DROP COLUMN rewritten_at;
