//! Shard ranges against the real PostgreSQL: the ranges planned from a sample, walked page by
//! page as the sweep walks them, cover every key once, for a composite primary key and for a
//! set entity (whose pages group rows by its key columns).

use std::collections::HashMap;

use diesel_async::RunQueryDsl;
use stalewatch_core::{
    rows::Rows,
    shards::{self, Part},
    watch::Watched,
};
use stalewatch_testkit::TestEnv;

const SCHEMA: &str = "
CREATE TABLE memberships (
    team_id  bigint NOT NULL,
    user_id  text   NOT NULL,
    role     text   NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
INSERT INTO memberships
    SELECT t, 'u' || u, 'member' FROM generate_series(1, 37) t, generate_series(1, 11) u;
";

const ENTITIES: &str = r#"
[[entity]]
name = "membership"
table = "public.memberships"
primary_key = ["team_id", "user_id"]
key = "t:{team_id}:u:{user_id}"
representation = "json"

[[entity]]
name = "team"
table = "public.memberships"
primary_key = ["team_id", "user_id"]
key = "team:{team_id}:members"
representation = "set"
member = "{user_id}"
"#;

/// Every key of `rows`, walking each planned range in pages of `limit`, and how often each
/// was seen.
async fn walk(
    env: &TestEnv,
    rows: &Rows,
    shard_count: usize,
    limit: i64,
) -> HashMap<String, usize> {
    let mut conn = env.pool.get().await.unwrap();
    let sample = rows
        .sample(&mut conn, shards::sample_size(shard_count))
        .await
        .unwrap();
    let bounds = shards::boundaries(&sample, shard_count);
    assert_eq!(bounds.len(), shard_count - 1, "distinct bounds: {bounds:?}");
    let mut seen = HashMap::new();
    for shard in shards::entity_shards(&rows.entity.name, bounds) {
        let Part::Rows { after, until } = shard.part else {
            continue;
        };
        let mut cursor = after;
        loop {
            let (_, page, last) = rows
                .page(&mut conn, cursor.as_deref(), until.as_deref(), limit)
                .await
                .unwrap();
            for row in &page {
                *seen.entry(row.key.clone().unwrap()).or_default() += 1;
            }
            if page.len() < limit as usize {
                break;
            }
            cursor = last;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn planned_ranges_cover_every_key_once_for_composite_keys_and_sets() {
    let env = TestEnv::new().await.unwrap();
    {
        let mut conn = env.pool.get().await.unwrap();
        for statement in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
            diesel::sql_query(statement)
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    let watched = Watched::load(&env.pool, ENTITIES, &|_| None).await.unwrap();

    let members = watched.source("membership").unwrap();
    let seen = walk(&env, members, 4, 10).await;
    assert_eq!(seen.len(), 37 * 11, "every membership");
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");

    // A set's walk columns are its key's (team_id): a range bound never splits a team.
    let teams = watched.source("team").unwrap();
    let seen = walk(&env, teams, 3, 4).await;
    assert_eq!(seen.len(), 37, "every team");
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");
}
