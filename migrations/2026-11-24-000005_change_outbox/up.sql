-- CHANGE_CAPTURE=outbox, for a PostgreSQL where logical decoding cannot be enabled: a trigger
-- on each watched table (installed by the worker at start-up) writes every changed row here
-- in the writer's own transaction, and NOTIFY wakes the reader at commit. A rolled-back
-- transaction leaves no row; the reader deletes rows once the checks of their keys are queued.
CREATE TABLE stalewatch_outbox (
    id           bigserial   PRIMARY KEY,
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    -- 'I'nsert, 'U'pdate, 'D'elete, or 'T'runcate (the whole table, no rows).
    op           "char"      NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    old_row      jsonb,
    new_row      jsonb,
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- SECURITY DEFINER with a fixed search_path: the application's role writes its tables with
-- its own privileges and search_path, and needs neither to reach the outbox.
CREATE FUNCTION stalewatch_outbox_capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO stalewatch_outbox (table_schema, table_name, op)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'T');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO stalewatch_outbox (table_schema, table_name, op, new_row)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'I', to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO stalewatch_outbox (table_schema, table_name, op, old_row, new_row)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'U', to_jsonb(OLD), to_jsonb(NEW));
    ELSE
        INSERT INTO stalewatch_outbox (table_schema, table_name, op, old_row)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'D', to_jsonb(OLD));
    END IF;
    -- Delivered at commit, one per transaction (repeats are folded): cheap.
    PERFORM pg_notify('stalewatch_outbox', '');
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION stalewatch_outbox_capture() SET search_path = %I, pg_catalog',
                   current_schema());
END
$$;
