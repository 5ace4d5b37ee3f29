// Mirrors migrations/; keep the two in step (the migration tests check every column is read).

diesel::table! {
    items (id) {
        id -> Uuid,
        name -> Text,
        value -> Jsonb,
        version -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    inconsistencies (id) {
        id -> Int8,
        cache_key -> Text,
        entity -> Text,
        entity_id -> Text,
        state -> Text,
        kind -> Text,
        db_version -> Nullable<Int8>,
        cache_version -> Nullable<Int8>,
        db_value -> Nullable<Text>,
        cache_value -> Nullable<Text>,
        diff -> Text,
        first_seen_at -> Timestamptz,
        confirm_due_at -> Timestamptz,
        confirmed_at -> Nullable<Timestamptz>,
        last_seen_at -> Timestamptz,
        resolved_at -> Nullable<Timestamptz>,
        resolution -> Nullable<Text>,
        observations -> Int8,
        rewritten_at -> Nullable<Timestamptz>,
        rewrite_cause -> Nullable<Text>,
    }
}
