//! Every column type as stalewatch reads it from the real PostgreSQL, against the documents an
//! application caches: rows rendered by PostgreSQL's `to_jsonb` (numbers with every digit,
//! `+00:00` offsets) and by `row_to_json` (floats as `1e-07`, json columns as written) both
//! match the row, through a key lookup and through a sweep page, and a changed value does not.

use diesel_async::RunQueryDsl;
use stalewatch_core::{cache::Cached, compare::Kind, rows::Rows, watch, watch::Watched};
use stalewatch_testkit::TestEnv;

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('calm', 'cross');
CREATE TABLE typed (
    id      bigint PRIMARY KEY,
    small   smallint,
    whole   integer,
    money   numeric(20, 6),
    huge    numeric,
    single  real,
    double  double precision,
    flag    boolean,
    name    text,
    code    varchar(10),
    fixed   char(6),
    uid     uuid,
    day     date,
    at      timestamp,
    at_tz   timestamptz,
    doc     json,
    docb    jsonb,
    ints    integer[],
    floats  double precision[],
    span    interval,
    feeling mood,
    codes   varchar(10)[],
    label   name
);
INSERT INTO typed
SELECT g,
       (g * 7 - 100)::smallint,
       g * 1000003,
       g * 1.000001 - 20,
       (10::numeric ^ (g % 40)) + 0.5,
       (g / 3.0)::real,
       CASE g % 6 WHEN 0 THEN 1.7976931348623157e308 WHEN 1 THEN 5e-324
                  WHEN 2 THEN 1e-7 WHEN 3 THEN -0.1 ELSE g / 7.0 END,
       g % 2 = 0,
       'name \"' || g || E'\\n',
       'c' || g,
       'f' || g,
       md5(g::text)::uuid,
       DATE '2024-02-28' + g,
       TIMESTAMP '2024-01-01 12:00:00.123456' + g * INTERVAL '1 hour',
       TIMESTAMPTZ '2024-06-30 23:59:59.5+02' + g * INTERVAL '1 day',
       ('{ \"b\": [1, 2.50, {\"c\": null}], \"a\":  \"x\" }')::json,
       jsonb_build_object('n', g, 'f', g / 8.0, 'deep', jsonb_build_array(1e-5, 'é')),
       ARRAY[g, -g, 0],
       ARRAY[g / 3.0, 1e300, 1e-7]::double precision[],
       g * INTERVAL '90 minutes',
       (CASE WHEN g % 2 = 0 THEN 'calm' ELSE 'cross' END)::mood,
       ARRAY['c' || g, 'x \"' || g]::varchar(10)[],
       ('label ' || g)::name
FROM generate_series(1, 40) g;
-- Every nullable column SQL NULL in a row of its own.
INSERT INTO typed (id) VALUES (41);
";

fn entities(prefix: &str) -> String {
    format!(
        r#"
[[entity]]
name = "typed_jsonb"
table = "public.typed"
primary_key = ["id"]
key = "{prefix}b:{{id}}"
representation = "json"

[[entity]]
name = "typed_json"
table = "public.typed"
primary_key = ["id"]
key = "{prefix}j:{{id}}"
representation = "json"
"#
    )
}

/// A test's own database holding the `typed` table of [`SCHEMA`].
async fn typed_table() -> TestEnv {
    let env = TestEnv::new().await.unwrap();
    for statement in SCHEMA.split(";\n").filter(|s| !s.trim().is_empty()) {
        sql(&env, statement).await;
    }
    env
}

async fn sql(env: &TestEnv, query: &str) {
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(query)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"));
}

/// Caches every row under `key` as PostgreSQL's `render` prints it.
async fn cache_rows(env: &TestEnv, key: &str, render: &str) {
    sql(
        env,
        &format!("CREATE TABLE cached_{key} AS SELECT id, {render}(t)::text AS doc FROM typed t"),
    )
    .await;
    #[derive(diesel::QueryableByName)]
    struct Doc {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        doc: String,
    }
    let mut conn = env.pool.get().await.unwrap();
    let docs: Vec<Doc> = diesel::sql_query(format!("SELECT id, doc FROM cached_{key}"))
        .load(&mut conn)
        .await
        .unwrap();
    for d in docs {
        let full = format!("{}{key}:{}", env.prefix, d.id);
        env.cache
            .set(&full, d.doc.as_bytes(), std::time::Duration::from_secs(600))
            .await
            .unwrap();
    }
}

/// Each key's verdict, read by key (as a check job reads) and by page (as the sweep reads).
async fn verdicts(env: &TestEnv, watched: &Watched, rows: &Rows) -> Vec<(String, Kind, Kind)> {
    let mut conn = env.pool.get().await.unwrap();
    let (_, page, _) = rows.page(&mut conn, None, None, 1000).await.unwrap();
    let shape = watch::shape(&rows.entity.representation);
    let keys: Vec<String> = page.iter().map(|r| r.key.clone().unwrap()).collect();
    let cached: Vec<Cached> = env.cache.read_many(shape, &keys).await.unwrap();
    let values: Vec<Vec<String>> = keys.iter().map(|k| rows.key_values(k).unwrap()).collect();
    let (_, by_key) = rows.by_keys(&mut conn, &values).await.unwrap();
    page.into_iter()
        .zip(by_key)
        .zip(cached)
        .map(|((row, found), cached)| {
            let key = row.key.unwrap();
            let paged = watched.evidence(rows, key.clone(), row.row, cached.clone());
            let looked_up = watched.evidence(rows, key.clone(), found, cached);
            (key, paged.kind, looked_up.kind)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_column_type_matches_the_documents_postgresql_renders_and_a_change_does_not() {
    let env = typed_table().await;
    cache_rows(&env, "b", "to_jsonb").await;
    cache_rows(&env, "j", "row_to_json").await;
    let watched = Watched::load(&env.pool, &entities(&env.prefix), &|_| None)
        .await
        .unwrap();

    for entity in ["typed_jsonb", "typed_json"] {
        let rows = watched.source(entity).unwrap();
        let seen = verdicts(&env, &watched, rows).await;
        assert_eq!(seen.len(), 41, "{entity}: every row");
        let wrong: Vec<_> = seen
            .iter()
            .filter(|(_, paged, looked_up)| *paged != Kind::Match || *looked_up != Kind::Match)
            .collect();
        assert!(
            wrong.is_empty(),
            "{entity}: rows that do not match: {wrong:?}"
        );
    }

    // The comparison is real: the same rows, each changed in one column of its own type.
    let changes = [
        "small = small + 1",
        "money = money + 0.000001",
        "huge = huge + 1",
        "double = double * 2",
        "flag = NOT flag",
        "fixed = 'g'",
        "day = day + 1",
        "at_tz = at_tz + INTERVAL '1 microsecond'",
        "docb = jsonb_set(docb, '{n}', '0')",
        "floats[1] = 0.5",
        "span = span + INTERVAL '1 second'",
    ];
    for (i, change) in changes.iter().enumerate() {
        sql(
            &env,
            &format!("UPDATE typed SET {change} WHERE id = {}", i + 1),
        )
        .await;
    }
    let rows = watched.source("typed_jsonb").unwrap();
    let seen = verdicts(&env, &watched, rows).await;
    for (i, change) in changes.iter().enumerate() {
        let key = format!("{}b:{}", env.prefix, i + 1);
        let (_, paged, looked_up) = seen.iter().find(|(k, _, _)| *k == key).unwrap();
        assert!(
            *paged != Kind::Match && *looked_up != Kind::Match,
            "`{change}` went unnoticed: {paged:?} / {looked_up:?}"
        );
    }
    let unchanged = seen[changes.len()..]
        .iter()
        .filter(|(_, paged, _)| *paged == Kind::Match)
        .count();
    assert_eq!(unchanged, 41 - changes.len(), "{seen:?}");
}

/// A row arrives as one text cell per column, and the worker builds its document
/// (`rows::Spelling`): for every column type, the document built is the one PostgreSQL renders
/// for the row itself (`row_to_json`, as `json_build_object` renders each value), by page and
/// by key. A padded `char(n)`, whose cast to text drops the padding, and an array of
/// `varchar(n)`, whose type's name starts as `varchar(n)`'s does, are among them.
#[tokio::test(flavor = "multi_thread")]
async fn documents_built_from_the_cells_are_the_rows_postgresql_renders_as_json() {
    use serde_json::{Map, Value};
    use stalewatch_core::rows::Row;

    let env = typed_table().await;
    let watched = Watched::load(&env.pool, &entities(&env.prefix), &|_| None)
        .await
        .unwrap();
    let rows = watched.source("typed_json").unwrap();
    #[derive(diesel::QueryableByName)]
    struct Rendered {
        #[diesel(sql_type = diesel::sql_types::Text)]
        doc: String,
    }
    let mut conn = env.pool.get().await.unwrap();
    let rendered: Vec<Map<String, Value>> =
        diesel::sql_query("SELECT row_to_json(t)::text AS doc FROM typed t ORDER BY id")
            .load::<Rendered>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|r| serde_json::from_str(&r.doc).unwrap())
            .collect();
    let (_, page, _) = rows.page(&mut conn, None, None, 1000).await.unwrap();
    let values: Vec<Vec<String>> = page
        .iter()
        .map(|r| rows.key_values(r.key.as_deref().unwrap()).unwrap())
        .collect();
    let (_, by_key) = rows.by_keys(&mut conn, &values).await.unwrap();
    assert_eq!(page.len(), 41);
    for ((expected, paged), looked_up) in rendered.iter().zip(page).zip(by_key) {
        let key = paged.key.unwrap();
        assert_eq!(
            paged.row,
            Ok(Some(Row::Doc(expected.clone()))),
            "{key} by page"
        );
        assert_eq!(
            looked_up,
            Ok(Some(Row::Doc(expected.clone()))),
            "{key} by key"
        );
    }
    assert_eq!(rendered[0]["fixed"], "f1    ", "char(6) keeps its padding");
}

/// A rebuild writes most JSON documents from the row's cells without decoding them
/// (`repair::render_cells`); what it writes must be byte for byte what a refresh writes from
/// the decoded row (`repair::render`). Over every column type, and over a table of the values
/// the cell path takes (strings with every escape, integers at the edges, booleans, nulls,
/// json scalars), with the json escapes serde_json would write differently, which it must
/// leave to the decoded path.
#[tokio::test(flavor = "multi_thread")]
async fn documents_written_from_their_cells_are_the_bytes_written_from_the_decoded_row() {
    use stalewatch_core::repair::{render, render_cells};

    let env = typed_table().await;
    sql(
        &env,
        r#"CREATE TABLE plain (id bigint PRIMARY KEY, version bigint, n bigint, name text,
                               flag boolean, at timestamptz, uid uuid, scalar json)"#,
    )
    .await;
    // Rows 1-8 take the cell path, whatever their integers and strings; rows 9-11 hold a
    // json value it must leave alone (escapes serde_json writes differently). Row 1's
    // timestamp is a string serde_json writes back as PostgreSQL rendered it.
    sql(
        &env,
        r#"INSERT INTO plain VALUES
          (1, 1, 0, 'plain', true, '2024-06-30 23:59:59.5+02', md5('1')::uuid, '"x"'),
          (2, 2, -1, E'quote " backslash \\ slash / tab \t newline \n cr \r', false, NULL, NULL, 'null'),
          (3, 3, 999999999999999999, E'bell \x07 escape \x1b unit \x1f bs \x08 ff \x0c', NULL, NULL, NULL, '12'),
          (4, 4, -999999999999999999, 'é ü 日本 🙂 ' || chr(8232), true, NULL, NULL, '"\u001f"'),
          (5, 5, NULL, '', NULL, NULL, NULL, 'true'),
          (6, 9223372036854775807, 1, 'max version', NULL, NULL, NULL, NULL),
          (7, NULL, 2, 'no version', NULL, NULL, NULL, '"\\ \""'),
          (8, 8, 1000000000000000000, 'nineteen digits', NULL, NULL, NULL, NULL),
          (9, 9, 1, 'json slash', NULL, NULL, NULL, '"a\/b"'),
          (10, 10, 1, 'json letter', NULL, NULL, NULL, '"\u0041"'),
          (11, 11, 1, 'json tab', NULL, NULL, NULL, '"\u0009"')"#,
    )
    .await;
    let model = format!(
        r#"
[[entity]]
name = "typed"
table = "public.typed"
primary_key = ["id"]
key = "{prefix}t:{{id}}"
representation = "json"

[[entity]]
name = "plain"
table = "public.plain"
primary_key = ["id"]
key = "{prefix}p:{{id}}"
representation = "json"
version = "version"
"#,
        prefix = env.prefix
    );
    let watched = Watched::load(&env.pool, &model, &|_| None).await.unwrap();
    let mut conn = env.pool.get().await.unwrap();
    let mut from_text = Vec::new();
    for entity in ["typed", "plain"] {
        let rows = watched.source(entity).unwrap();
        let (_, page, _) = rows.page_raw(&mut conn, None, None, 1000).await.unwrap();
        assert!(!page.is_empty(), "{entity}");
        for row in page {
            let key = row.key.unwrap();
            let decoded = render(rows, Some(&rows.decode(&row.doc).unwrap()));
            if let Some(fast) = render_cells(rows, &row.doc) {
                assert_eq!(fast, decoded, "{key}: from {:?}", row.doc);
                from_text.push((entity, key));
            }
        }
    }
    let ids = |of: &str| -> Vec<i64> {
        from_text
            .iter()
            .filter(|(entity, _)| *entity == of)
            .map(|(_, k)| k.rsplit(':').next().unwrap().parse().unwrap())
            .collect()
    };
    let plain = ids("plain");
    assert_eq!(
        plain,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "the rows the cell path takes"
    );
    // Row 41 of `typed` is all NULLs but its id: the only one without a float or a document.
    assert_eq!(ids("typed"), [41]);
}
