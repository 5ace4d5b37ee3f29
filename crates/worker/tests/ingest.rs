//! Dual-write ingestion (`ingest = true`), the real worker against real PostgreSQL and Redis:
//! records appended with XADD land in both stores, a malformed record is dead-lettered while
//! the rest of its batch lands, a replay changes nothing, a batch that keeps failing stays
//! pending and is finally dead-lettered with its error, and a worker killed between the
//! database write and the cache write leaves both stores agreeing once its records are
//! delivered again.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use common::*;
use serde_json::{json, Value};
use stalewatch_testkit::{eventually, Proc, TestEnv};

const SCHEMA: &str = "
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    name    text   NOT NULL CHECK (name <> ''),
    version bigint NOT NULL
);
CREATE TABLE members (
    campaign_id bigint NOT NULL,
    user_id     bigint NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
)";

const ENTITIES: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"
version = "version"
policy = "write_through"
ingest = true

[[entity]]
name = "members"
table = "public.members"
primary_key = ["campaign_id", "user_id"]
key = "${KEY_PREFIX}campaign:{campaign_id}:members"
representation = "set"
member = "{user_id}"
policy = "write_through"
ingest = true
"#;

struct App {
    env: TestEnv,
    entities: EntitiesFile,
}

impl App {
    async fn new() -> App {
        let env = TestEnv::new().await.unwrap();
        let entities = EntitiesFile::write("ingest", ENTITIES);
        sql_script(&env, SCHEMA).await;
        App { env, entities }
    }

    async fn sql(&self, query: &str) {
        sql(&self.env, query).await;
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.env.prefix)
    }

    fn stream(&self, entity: &str) -> String {
        self.key(&format!("ingest:{entity}"))
    }

    /// A worker with the sweep and keyspace notifications off: the ingestion alone writes.
    fn worker(&self, extra: &[(&str, &str)]) -> (Proc, u16) {
        let own = [
            self.entities.var(),
            ("SWEEP_INTERVAL_MS", "0"),
            ("KEYSPACE_NOTIFICATIONS", "off"),
        ];
        worker(&self.env, &[&own[..], extra].concat())
    }

    async fn redis<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        redis_cmd(&self.env, args).await
    }

    /// Appends `records` (each a JSON text) to `entity`'s ingest stream, as an application
    /// would.
    async fn push(&self, entity: &str, records: &[String]) {
        let mut conn = self.env.cache.connection();
        // In one transaction: a consumer blocked on the stream wakes to all of them at once.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for r in records {
            pipe.cmd("XADD")
                .arg(self.stream(entity))
                .arg("*")
                .arg("record")
                .arg(r)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }

    /// Entries of `entity`'s stream read and not acknowledged (0 before the group exists).
    async fn pending(&self, entity: &str) -> i64 {
        let mut conn = self.env.cache.connection();
        let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(self.stream(entity))
            .arg("stalewatch")
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(redis::Value::Array(v)) => match v.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// The dead letters of `entity`: (reason, record) each.
    async fn dead(&self, entity: &str) -> Vec<(String, String)> {
        let range: redis::streams::StreamRangeReply = {
            let mut conn = self.env.cache.connection();
            redis::cmd("XRANGE")
                .arg(self.key(&format!("ingest:{entity}:dead")))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap()
        };
        range
            .ids
            .iter()
            .map(|e| {
                let text = |f: &str| e.get::<String>(f).unwrap_or_default();
                (text("reason"), text("record"))
            })
            .collect()
    }

    /// Each account's document as PostgreSQL renders it (what a refresh writes), by id.
    async fn accounts(&self) -> HashMap<i64, Value> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Doc {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
            #[diesel(sql_type = diesel::sql_types::Text)]
            doc: String,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        diesel::sql_query(
            "SELECT id, jsonb_build_object('id', id, 'name', name, 'version', version)::text \
             AS doc FROM accounts",
        )
        .load::<Doc>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.id, serde_json::from_str(&d.doc).unwrap()))
        .collect()
    }

    /// The cached account documents of `ids` (absent: no key).
    async fn cached(&self, ids: impl IntoIterator<Item = i64>) -> HashMap<i64, Value> {
        let ids: Vec<i64> = ids.into_iter().collect();
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("acct:{id}")))
            .collect();
        let values = self.env.cache.get_many(&keys).await.unwrap();
        ids.into_iter()
            .zip(values)
            .filter_map(|(id, v)| Some((id, serde_json::from_slice(&v?).unwrap())))
            .collect()
    }

    /// Campaign `c`'s members: in PostgreSQL, and in its cached set.
    async fn members(&self, c: i64) -> (BTreeSet<String>, BTreeSet<String>) {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Member {
            #[diesel(sql_type = diesel::sql_types::Text)]
            user_id: String,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        let db = diesel::sql_query(format!(
            "SELECT user_id::text AS user_id FROM members WHERE campaign_id = {c}"
        ))
        .load::<Member>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.user_id)
        .collect();
        let cached = self
            .redis(&["SMEMBERS", &self.key(&format!("campaign:{c}:members"))])
            .await;
        (db, cached)
    }

    /// Waits until every row of `accounts` is cached as PostgreSQL holds it, and nothing is
    /// pending.
    async fn agree(&self, rows: usize) {
        eventually(Duration::from_secs(30), "both stores to agree", || async {
            let db = self.accounts().await;
            if db.len() != rows || self.pending("account").await != 0 {
                return None;
            }
            let cached = self.cached(db.keys().copied()).await;
            (cached == db).then_some(())
        })
        .await
    }
}

fn account(id: i64, name: &str, version: i64) -> String {
    json!({ "id": id, "name": name, "version": version }).to_string()
}

async fn ingested(port: u16, entity: &str) -> f64 {
    metric(
        port,
        "stalewatch_ingest_records_total",
        &[&format!("entity=\"{entity}\"")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn records_pushed_with_xadd_land_in_both_stores_and_a_malformed_one_in_the_dead_letters() {
    let app = App::new().await;
    let (_w, port) = app.worker(&[("INGEST_BATCH", "100")]);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;

    // 300 accounts and 10 campaigns of 20 members, in batches of 100; among the accounts,
    // records that cannot be written, each in a batch of good ones.
    let mut records: Vec<String> = (1..=300)
        .map(|id| account(id, &format!("a{id}"), 1))
        .collect();
    let malformed = [
        (10, "not json".to_string(), "not JSON"),
        (
            120,
            json!({"id": 9001, "name": "x"}).to_string(),
            "\"version\" is missing",
        ),
        (
            150,
            account(9002, "x", 1).replace("\"x\"", "\"\\u0000\""),
            "NUL",
        ),
        (
            210,
            json!({"id": "nine", "name": "x", "version": 1}).to_string(),
            "not an integer",
        ),
        // Well-formed, refused by PostgreSQL (a CHECK constraint): found by halving the batch.
        (250, account(9003, "", 1), "violates check constraint"),
    ];
    for (at, record, _) in malformed.iter().rev() {
        records.insert(*at, record.clone());
    }
    app.push("account", &records).await;
    let members: Vec<String> = (1..=10)
        .flat_map(|c| (1..=20).map(move |u| json!({"campaign_id": c, "user_id": u}).to_string()))
        .collect();
    app.push("members", &members).await;

    app.agree(300).await;
    for c in 1..=10 {
        let (db, cached) = app.members(c).await;
        assert_eq!(db.len(), 20, "campaign {c}");
        assert_eq!(cached, db, "campaign {c}");
    }
    let dead = app.dead("account").await;
    assert_eq!(dead.len(), malformed.len(), "{dead:#?}");
    for (_, record, reason) in &malformed {
        assert!(
            dead.iter()
                .any(|(r, original)| original == record && r.contains(reason)),
            "{record} dead-lettered for {reason:?}: {dead:#?}"
        );
    }
    assert!(app.dead("members").await.is_empty());
    assert_eq!(ingested(port, "account").await, 300.0);
    assert_eq!(ingested(port, "members").await, 200.0);
    assert_eq!(
        metric(
            port,
            "stalewatch_ingest_dead_total",
            &["entity=\"account\""]
        )
        .await,
        malformed.len() as f64
    );
    assert!(
        metric(
            port,
            "stalewatch_ingest_batches_total",
            &["entity=\"account\"", "outcome=\"written\""]
        )
        .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_records_changes_nothing_and_an_older_record_never_overwrites_a_newer_row() {
    let app = App::new().await;
    let (_w, port) = app.worker(&[]);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    let current: Vec<String> = (1..=50)
        .map(|id| account(id, &format!("v2-{id}"), 2))
        .collect();
    // Two records of one row in one batch: the newer one wins, whatever the order.
    let mut first = current.clone();
    first.push(account(7, "v1-7", 1));
    app.push("account", &first).await;
    let members: Vec<String> = (1..=5)
        .map(|u| json!({"campaign_id": 1, "user_id": u}).to_string())
        .collect();
    app.push("members", &members).await;
    app.agree(50).await;
    eventually(Duration::from_secs(30), "the members", || async {
        (ingested(port, "members").await == 5.0).then_some(())
    })
    .await;
    let db = app.accounts().await;
    let cached = app.cached(1..=50).await;
    assert_eq!(db[&7]["name"], "v2-7");

    // The same records again, and older versions of some rows.
    let mut replay = current.clone();
    replay.extend((1..=50).step_by(3).map(|id| account(id, "older", 1)));
    app.push("account", &replay).await;
    app.push("members", &members).await;
    let total = (first.len() + replay.len()) as f64;
    eventually(
        Duration::from_secs(30),
        "the replay acknowledged",
        || async {
            (ingested(port, "account").await == total && ingested(port, "members").await == 10.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(app.accounts().await, db, "the table changed");
    assert_eq!(app.cached(1..=50).await, cached, "the cache changed");
    let (db_members, cached_members) = app.members(1).await;
    assert_eq!(db_members.len(), 5);
    assert_eq!(cached_members, db_members);
    assert!(app.dead("account").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_batch_stays_pending_is_retried_and_after_five_deliveries_is_dead_lettered() {
    let app = App::new().await;
    let (_w, port) = app.worker(&[("INGEST_CLAIM_IDLE_MS", "300")]);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;

    // The table is away for a while: the batch fails, stays pending, and lands once it is back.
    app.sql("ALTER TABLE accounts RENAME TO accounts_away")
        .await;
    app.push("account", &[account(1, "a", 1), account(2, "b", 1)])
        .await;
    eventually(Duration::from_secs(30), "a failed attempt", || async {
        (metric(
            port,
            "stalewatch_ingest_batches_total",
            &["outcome=\"failed\""],
        )
        .await
            >= 2.0)
            .then_some(())
    })
    .await;
    assert_eq!(app.pending("account").await, 2);
    assert!(app.accounts_missing().await);
    app.sql("ALTER TABLE accounts_away RENAME TO accounts")
        .await;
    app.agree(2).await;
    assert!(app.dead("account").await.is_empty());

    // Away for good: after five deliveries the record is dead-lettered with the last error,
    // and the group goes on.
    app.sql("ALTER TABLE accounts RENAME TO accounts_away")
        .await;
    app.push("account", &[account(3, "c", 1)]).await;
    let dead = eventually(Duration::from_secs(90), "the dead letter", || async {
        let dead = app.dead("account").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (reason, record) = &dead[0];
    assert_eq!(record, &account(3, "c", 1));
    assert!(
        reason.contains("delivered 5 times") && reason.contains("does not exist"),
        "{reason}"
    );
    assert_eq!(app.pending("account").await, 0);
    assert!(
        metric(
            port,
            "stalewatch_ingest_reclaimed_total",
            &["entity=\"account\""]
        )
        .await
            >= 4.0
    );
}

impl App {
    /// True while the accounts table is renamed away.
    async fn accounts_missing(&self) -> bool {
        use diesel_async::RunQueryDsl;
        let mut conn = self.env.pool.get().await.unwrap();
        diesel::sql_query("SELECT 1 FROM accounts")
            .execute(&mut conn)
            .await
            .is_err()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_between_the_database_and_the_cache_write_is_redelivered_and_both_agree() {
    let app = App::new().await;
    let hooks = TempDir::new("ingest-hooks");
    let gate = hooks.path().join("ingest-between-stores");
    let reached = hooks.path().join("ingest-between-stores.reached");
    std::fs::write(&gate, "").unwrap();
    let dir = hooks.path().display().to_string();
    let settings = [
        ("STALEWATCH_TEST_HOOKS", dir.as_str()),
        ("INGEST_CLAIM_IDLE_MS", "500"),
    ];
    let (mut first, port) = app.worker(&settings);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;

    let records: Vec<String> = (1..=50)
        .map(|id| account(id, &format!("a{id}"), 1))
        .collect();
    app.push("account", &records).await;
    eventually(
        Duration::from_secs(30),
        "the worker held between its two writes",
        || async { reached.exists().then_some(()) },
    )
    .await;
    // The database has the rows, the cache none of them: the crash window.
    assert_eq!(app.accounts().await.len(), 50);
    assert!(app.cached(1..=50).await.is_empty());
    first.kill9();
    std::fs::remove_file(&gate).unwrap();
    assert_eq!(
        app.pending("account").await,
        50,
        "left pending by the dead consumer"
    );
    assert!(app.cached(1..=50).await.is_empty());

    let (_second, port) = app.worker(&settings);
    app.agree(50).await;
    assert!(
        metric(
            port,
            "stalewatch_ingest_reclaimed_total",
            &["entity=\"account\""]
        )
        .await
            >= 50.0
    );
    assert_eq!(ingested(port, "account").await, 50.0);
}

// The watermark drift check: an ingesting entity's cache falling behind its table is an
// incident of the whole entity, `cache_behind`, keyed by the watermark's own key.

impl App {
    fn watermark(&self) -> String {
        self.key("watermark:account")
    }

    /// The newest incident of the entity's watermark key: (state, kind, resolution, diff).
    async fn behind(&self) -> Option<(String, String, Option<String>, String)> {
        self.newest_behind()
            .await
            .map(|i| (i.state, i.kind, i.resolution, i.diff))
    }

    async fn newest_behind(&self) -> Option<stalewatch_core::db::incidents::IncidentRow> {
        incidents_of(&self.env, &self.watermark())
            .await
            .into_iter()
            .next()
    }

    /// The id of the newest incident of the watermark key (0: none): later waits look at
    /// newer ones only.
    async fn last_behind(&self) -> i64 {
        self.newest_behind().await.map_or(0, |i| i.id)
    }

    /// Waits until a `cache_behind` incident newer than `after` is in one of `states`; its
    /// diff.
    async fn until_behind(&self, after: i64, states: &[&str], what: &str) -> String {
        eventually(Duration::from_secs(30), what, || async {
            self.newest_behind()
                .await
                .filter(|i| {
                    i.id > after && i.kind == "cache_behind" && states.contains(&i.state.as_str())
                })
                .map(|i| i.diff)
        })
        .await
    }

    /// Deletes every cached account.
    async fn flush_accounts(&self) {
        flush_keys(&self.env, &self.key("acct:*")).await;
    }

    async fn rebuild(&self) {
        let out = run_rebuild(&self.env, &self.entities, "account", &[]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Ingests 100 accounts (version = id) and waits until both stores and the watermark
    /// have them, and no `cache_behind` is open.
    async fn ingest_accounts(&self) {
        let records: Vec<String> = (1..=100).map(|id| account(id, "a", id)).collect();
        self.push("account", &records).await;
        self.agree(100).await;
        eventually(Duration::from_secs(30), "the watermark at 100", || async {
            let w: Option<String> = self.redis(&["GET", &self.watermark()]).await;
            (w.as_deref() == Some("100")).then_some(())
        })
        .await;
        eventually(Duration::from_secs(30), "no open cache_behind", || async {
            let open = self.behind().await.is_some_and(|(s, _, _, _)| {
                ["detected", "confirmed", "persistent"].contains(&s.as_str())
            });
            (!open).then_some(())
        })
        .await;
    }
}

const CHECKED: [(&str, &str); 2] = [("WATERMARK_CHECK_MS", "100"), ("GRACE_PERIOD_MS", "500")];

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_cache_raises_cache_behind_and_a_rebuild_resolves_it_with_cause_repair() {
    let app = App::new().await;
    let (_w, port) = app.worker(&CHECKED);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    app.ingest_accounts().await;
    assert!(
        app.behind()
            .await
            .is_none_or(|(state, _, _, _)| state == "transient"),
        "{:?}",
        app.behind().await
    );

    // The keys flushed, the watermark kept (as when it lives in another Redis): the newest
    // row's key is missing.
    let before = app.last_behind().await;
    app.flush_accounts().await;
    let diff = app
        .until_behind(
            before,
            &["confirmed", "persistent"],
            "cache_behind confirmed",
        )
        .await;
    assert!(
        diff.contains(&format!("{} is missing_in_cache", app.key("acct:100"))),
        "{diff}"
    );
    assert!(
        metric(
            port,
            "stalewatch_checks_total",
            &[
                "entity=\"account\"",
                "source=\"watermark\"",
                "verdict=\"cache_behind\""
            ]
        )
        .await
            >= 1.0
    );
    app.rebuild().await;
    app.until_behind(before, &["resolved"], "cache_behind resolved")
        .await;
    assert_eq!(app.behind().await.unwrap().2.as_deref(), Some("repair"));
    app.agree(100).await;

    // Keys and watermark flushed, as FLUSHALL does to a Redis holding both: no watermark.
    let before = app.last_behind().await;
    app.flush_accounts().await;
    let _: u64 = app.redis(&["DEL", &app.watermark()]).await;
    let diff = app
        .until_behind(
            before,
            &["confirmed", "persistent"],
            "cache_behind confirmed again",
        )
        .await;
    assert!(diff.contains("no watermark"), "{diff}");
    assert_eq!(
        metric(port, "stalewatch_watermark_lag", &["entity=\"account\""]).await,
        -1.0
    );
    app.rebuild().await;
    app.until_behind(before, &["resolved"], "cache_behind resolved again")
        .await;
    assert_eq!(app.behind().await.unwrap().2.as_deref(), Some("repair"));
    let w: Option<String> = app.redis(&["GET", &app.watermark()]).await;
    assert_eq!(w.as_deref(), Some("100"), "the rebuild set the watermark");
    app.agree(100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watermark_trailing_the_table_is_behind_until_ingestion_catches_up() {
    let app = App::new().await;
    let (_w, port) = app.worker(&CHECKED);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    app.ingest_accounts().await;
    // A newer row written straight to PostgreSQL, not through the stream: the cache is behind.
    let before = app.last_behind().await;
    app.sql("INSERT INTO accounts VALUES (101, 'sql', 101)")
        .await;
    let diff = app
        .until_behind(
            before,
            &["confirmed", "persistent"],
            "cache_behind confirmed",
        )
        .await;
    assert!(diff.contains("watermark 100 is 1 behind"), "{diff}");
    // The same row through the stream: both stores, the watermark moves, the incident closes.
    app.push("account", &[account(101, "sql", 101)]).await;
    app.until_behind(before, &["resolved"], "cache_behind resolved")
        .await;
    assert_eq!(app.behind().await.unwrap().2.as_deref(), Some("write"));
    app.agree(101).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_watermark_rebuild_on_a_confirmed_cache_behind_rebuilds_the_entity_by_itself() {
    let app = App::new().await;
    let mut settings = CHECKED.to_vec();
    settings.push(("WATERMARK_REBUILD", "on"));
    let (_w, port) = app.worker(&settings);
    let (_api, api) = api(&app.env, &[app.entities.var()]);
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    wait_http(&format!("{api}/healthz")).await;
    app.ingest_accounts().await;
    let before = app.last_behind().await;
    app.flush_accounts().await;
    let _: u64 = app.redis(&["DEL", &app.watermark()]).await;
    app.until_behind(
        before,
        &["resolved"],
        "cache_behind resolved by the rebuild",
    )
    .await;
    let (_, kind, resolution, _) = app.behind().await.unwrap();
    assert_eq!(
        (kind.as_str(), resolution.as_deref()),
        ("cache_behind", Some("repair"))
    );
    app.agree(100).await;
    // The API lists it as an incident of the entity, under the watermark's key.
    let listed: Value = reqwest::get(format!("{api}/inconsistencies?entity=account"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let found = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "cache_behind")
        .unwrap_or_else(|| panic!("{listed:#}"));
    assert_eq!(found["key"], app.watermark().as_str());
    assert_eq!(found["entity"], "account");
    assert_eq!(found["resolution"], "repair");
}
