-- CASCADE drops the triggers the worker installed on the watched tables.
DROP FUNCTION IF EXISTS stalewatch_outbox_capture() CASCADE;
DROP TABLE IF EXISTS stalewatch_outbox;
