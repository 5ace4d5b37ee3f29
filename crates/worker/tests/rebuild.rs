//! `stalewatch-worker rebuild --entity NAME`, the real binary against real PostgreSQL and
//! Redis: a flushed entity comes back whole, a rebuild racing the application's writes never
//! puts an older version back, two rebuilds of one entity do not run at once, and a set is
//! swapped in whole.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use serde_json::Value;
use stalewatch_core::incident::{Source, State};
use stalewatch_testkit::{eventually, TestEnv};

const SCHEMA: &str = "
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    name    text   NOT NULL,
    version bigint NOT NULL
);
CREATE TABLE members (
    campaign_id bigint NOT NULL,
    user_id     bigint NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
);";

const ENTITIES: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"
version = "version"
policy = "write_through"

[[entity]]
name = "account_hash"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}accth:{id}"
representation = "hash"
columns = ["name", "version"]
policy = "write_through"

[[entity]]
name = "members"
table = "public.members"
primary_key = ["campaign_id", "user_id"]
key = "${KEY_PREFIX}campaign:{campaign_id}:members"
representation = "set"
member = "{user_id}"
policy = "write_through"
"#;

struct App {
    env: TestEnv,
    entities: EntitiesFile,
}

impl App {
    async fn new() -> App {
        let env = TestEnv::new().await.unwrap();
        sql_script(&env, SCHEMA).await;
        let entities = EntitiesFile::write("entities", ENTITIES);
        App { env, entities }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.env.prefix)
    }

    fn command(&self, entity: &str, extra: &[(&str, &str)]) -> Command {
        rebuild_command(&self.env, &self.entities, entity, extra)
    }

    /// Runs a rebuild to its end.
    async fn rebuild(&self, entity: &str, extra: &[(&str, &str)]) -> Output {
        run_rebuild(&self.env, &self.entities, entity, extra).await
    }

    async fn redis<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        redis_cmd(&self.env, args).await
    }

    /// Deletes every key of this test matching `pattern` (after the prefix).
    async fn flush(&self, pattern: &str) {
        flush_keys(&self.env, &self.key(pattern)).await;
    }

    /// Each account's (name, version) in PostgreSQL.
    async fn accounts(&self) -> HashMap<i64, (String, i64)> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Account {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            version: i64,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        diesel::sql_query("SELECT id, name, version FROM accounts")
            .load::<Account>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.id, (a.name, a.version)))
            .collect()
    }

    /// The cached account documents, by id (absent: no key).
    async fn cached_accounts(&self, ids: &[i64]) -> HashMap<i64, Value> {
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("acct:{id}")))
            .collect();
        let mut out = HashMap::new();
        for (ids, keys) in ids.chunks(1000).zip(keys.chunks(1000)) {
            let values = self.env.cache.get_many(keys).await.unwrap();
            for (id, value) in ids.iter().zip(values) {
                if let Some(bytes) = value {
                    out.insert(*id, serde_json::from_slice(&bytes).unwrap());
                }
            }
        }
        out
    }
}

fn succeeded(out: &Output) -> bool {
    out.status.success()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_entity_is_rebuilt_whole_and_its_incidents_resolve_with_cause_repair() {
    let app = App::new().await;
    let env = &app.env;
    sql_script(
        env,
        "INSERT INTO accounts SELECT i, 'name-' || i, 1 FROM generate_series(1, 2500) AS i;
         INSERT INTO members SELECT c, u FROM generate_series(1, 40) AS c, generate_series(1, 25) AS u",
    )
    .await;
    // An incident open on one key before the rebuild: the cache holds an older version.
    let stale = app.key("acct:7");
    let _: () = app
        .redis(&["SET", &stale, r#"{"id":7,"name":"old","version":0}"#])
        .await;
    let mut config = env.config();
    config.entities = Some(app.entities.path().to_path_buf());
    // Confirmed at once (no grace period), so it is a fault to fix, not a write in flight.
    config.grace_period = Duration::ZERO;
    let checker = env.checker(&config).await.unwrap();
    for _ in 0..2 {
        checker
            .check_keys("account", std::slice::from_ref(&stale), Source::Sweep, None)
            .await
            .unwrap();
    }
    let open = incidents_of(env, &stale).await;
    assert_eq!(open[0].state, State::Confirmed.as_str(), "{open:?}");

    // Flushed: nothing of the three entities is left, but the stale key.
    app.flush("acct:1*").await;
    app.flush("accth:*").await;
    app.flush("campaign:*").await;
    for entity in ["account", "account_hash", "members"] {
        let out = app.rebuild(entity, &[("REBUILD_BATCH", "300")]).await;
        assert!(succeeded(&out), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let expected = if entity == "members" { 40 } else { 2500 };
        assert_eq!(summary["keys"], expected, "{}", text(&out));
        assert_eq!(summary["written"], expected, "{}", text(&out));
    }

    let accounts = app.accounts().await;
    let ids: Vec<i64> = accounts.keys().copied().collect();
    let cached = app.cached_accounts(&ids).await;
    for (id, (name, version)) in &accounts {
        let doc = cached
            .get(id)
            .unwrap_or_else(|| panic!("acct:{id} not rebuilt"));
        assert_eq!(doc["name"], Value::from(name.as_str()), "acct:{id}");
        assert_eq!(doc["version"], Value::from(*version), "acct:{id}");
        let hash: HashMap<String, String> = app
            .redis(&["HGETALL", &app.key(&format!("accth:{id}"))])
            .await;
        assert_eq!(hash.get("name"), Some(name), "accth:{id}");
        assert_eq!(
            hash.get("version"),
            Some(&version.to_string()),
            "accth:{id}"
        );
    }
    let everyone: BTreeSet<String> = (1..=25).map(|u| u.to_string()).collect();
    for c in 1..=40 {
        let members: BTreeSet<String> = app
            .redis(&["SMEMBERS", &app.key(&format!("campaign:{c}:members"))])
            .await;
        assert_eq!(members, everyone, "campaign {c}");
    }
    // The lock is released.
    let locks: Vec<String> = app.redis(&["KEYS", &app.key("rebuild:*")]).await;
    assert!(locks.is_empty(), "{locks:?}");

    let after = incidents_of(env, &stale).await;
    let incident = &after[0];
    assert_eq!(incident.state, State::Resolved.as_str(), "{incident:?}");
    assert_eq!(
        incident.resolution.as_deref(),
        Some("repair"),
        "{incident:?}"
    );

    // Again, over a cache that now holds every key: a key found there is not skipped for
    // being there (SET NX would leave it); the compare-and-set rewrites an older one.
    let behind = app.key("acct:2000");
    let _: () = app
        .redis(&["SET", &behind, r#"{"id":2000,"name":"old","version":0}"#])
        .await;
    let out = app.rebuild("account", &[("REBUILD_BATCH", "300")]).await;
    assert!(succeeded(&out), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["written"], 2500, "{}", text(&out));
    let cached = app.cached_accounts(&[2000]).await;
    assert_eq!(cached[&2000]["name"], "name-2000", "{cached:?}");
    assert_eq!(cached[&2000]["version"], 1, "{cached:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_racing_a_thousand_newer_writes_leaves_every_key_at_its_newest_version() {
    let app = Arc::new(App::new().await);
    let rows = 20_000;
    sql_script(
        &app.env,
        &format!(
            "INSERT INTO accounts SELECT i, 'name-' || i, 1 FROM generate_series(1, {rows}) AS i"
        ),
    )
    .await;
    // Small batches and a pause between them: the rebuild runs for seconds, and every page
    // it has read waits a while before its pipeline, which is when a write can race it.
    let child = app
        .command(
            "account",
            &[("REBUILD_BATCH", "200"), ("REBUILD_PAUSE_MS", "30")],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Started: its first page is written.
    eventually(
        Duration::from_secs(30),
        "the rebuild to start writing",
        || {
            let app = app.clone();
            async move {
                let n: Option<String> = app.redis(&["GET", &app.key("acct:1")]).await;
                n.map(|_| ())
            }
        },
    )
    .await;

    // The application: 1,000 distinct accounts, each updated once (the row, then the cache
    // with a plain SET, as a write-through application does), 16 at a time. Each goes just
    // ahead of the rebuild's frontier (the first account whose key it has not written yet:
    // the cache started empty), into the page it has read and not yet written: the race.
    let chosen = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..16u64 {
        let (app, chosen) = (app.clone(), chosen.clone());
        writers.spawn(async move {
            let mut done = 0;
            for n in 0.. {
                let frontier = frontier(&app, rows).await;
                let id = {
                    let mut chosen = chosen.lock().unwrap();
                    if chosen.len() >= 1000 {
                        break;
                    }
                    // Spread over the next two pages, then onwards if taken.
                    let mut id = frontier + ((w * 37 + n * 101) % 400) as i64;
                    while chosen.contains(&id) || id > rows {
                        id = if id > rows { 1 } else { id + 1 };
                    }
                    chosen.insert(id);
                    id
                };
                update(&app, id).await;
                done += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            done
        });
    }
    let mut written = 0;
    while let Some(done) = writers.join_next().await {
        written += done.unwrap();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(succeeded(&out), "{}", text(&out));
    assert_eq!(written, 1000);

    let accounts = app.accounts().await;
    let newer = accounts.values().filter(|(_, v)| *v > 1).count();
    assert_eq!(newer, written, "each write is of a distinct account");
    let ids: Vec<i64> = accounts.keys().copied().collect();
    let cached = app.cached_accounts(&ids).await;
    let mut behind = Vec::new();
    for (id, (_, version)) in &accounts {
        let doc = cached
            .get(id)
            .unwrap_or_else(|| panic!("acct:{id} missing"));
        if doc["version"] != *version {
            behind.push((*id, doc["version"].clone(), *version));
        }
    }
    assert!(
        behind.is_empty(),
        "{} keys behind their row (id, cached, row): {:?}",
        behind.len(),
        &behind[..behind.len().min(10)]
    );
    // The race did happen: the rebuild found newer versions it did not overwrite.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        summary["skipped_newer"].as_u64().unwrap() > 0,
        "no write raced the rebuild: {stdout}"
    );
}

/// The first account whose key is not cached yet (binary search: the rebuild writes in id
/// order; the application's writes ahead of it may blur the edge, which is fine here).
async fn frontier(app: &App, rows: i64) -> i64 {
    let (mut lo, mut hi) = (1, rows + 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let exists: bool = app
            .redis(&["EXISTS", &app.key(&format!("acct:{mid}"))])
            .await;
        if exists {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// One application write: the row's next version, then its cached document.
async fn update(app: &App, id: i64) {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Doc {
        #[diesel(sql_type = diesel::sql_types::Text)]
        doc: String,
    }
    let mut conn = app.env.pool.get().await.unwrap();
    let doc: Doc = diesel::sql_query(format!(
        "UPDATE accounts SET version = version + 1, name = 'new-' || id WHERE id = {id} \
         RETURNING json_build_object('id', id, 'name', name, 'version', version)::text AS doc"
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let _: () = app
        .redis(&["SET", &app.key(&format!("acct:{id}")), &doc.doc])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_rebuilds_started_together_one_runs_and_the_other_names_the_holder() {
    let app = App::new().await;
    sql_script(
        &app.env,
        "INSERT INTO accounts SELECT i, 'name-' || i, 1 FROM generate_series(1, 5000) AS i",
    )
    .await;
    // Long enough (ten pages, 200 ms apart) that the two overlap.
    let settings = [("REBUILD_BATCH", "500"), ("REBUILD_PAUSE_MS", "200")];
    let spawn = || {
        app.command("account", &settings)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let pids = [first.id(), second.id()];
    let outs = tokio::task::spawn_blocking(move || {
        [
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        ]
    })
    .await
    .unwrap();
    let ran: Vec<usize> = (0..2).filter(|&i| succeeded(&outs[i])).collect();
    assert_eq!(
        ran.len(),
        1,
        "one and only one runs:\n{}\n{}",
        text(&outs[0]),
        text(&outs[1])
    );
    let (winner, loser) = (ran[0], 1 - ran[0]);
    assert_eq!(outs[loser].status.code(), Some(1), "{}", text(&outs[loser]));
    let stderr = String::from_utf8_lossy(&outs[loser].stderr);
    assert!(
        stderr.contains("already running") && stderr.contains(&format!("pid {}", pids[winner])),
        "the refusal names the holder: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&outs[winner].stdout);
    assert!(
        stdout.contains("rebuilt 5000 keys"),
        "{}",
        text(&outs[winner])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_is_swapped_in_whole_and_readers_never_see_it_half_built() {
    let app = Arc::new(App::new().await);
    // Campaign 1: 5,000 members in PostgreSQL; its cached set holds three others.
    sql_script(
        &app.env,
        "INSERT INTO members SELECT 1, u FROM generate_series(1, 5000) AS u;
         INSERT INTO members SELECT c, 1 FROM generate_series(2, 3000) AS c",
    )
    .await;
    let key = app.key("campaign:1:members");
    let _: u64 = app.redis(&["SADD", &key, "old-a", "old-b", "old-c"]).await;

    // A reader sees either the old set or the whole new one.
    let running = Arc::new(AtomicBool::new(true));
    let reader = {
        let (app, running, key) = (app.clone(), running.clone(), key.clone());
        tokio::spawn(async move {
            let mut sizes = BTreeSet::new();
            while running.load(Ordering::Relaxed) {
                let n: u64 = app.redis(&["SCARD", &key]).await;
                sizes.insert(n);
            }
            sizes
        })
    };
    let out = app.rebuild("members", &[("REBUILD_BATCH", "100")]).await;
    running.store(false, Ordering::Relaxed);
    assert!(succeeded(&out), "{}", text(&out));
    let sizes = reader.await.unwrap();
    assert!(
        sizes.iter().all(|n| *n == 3 || *n == 5000),
        "a reader saw a set of sizes {sizes:?}"
    );
    let members: BTreeSet<String> = app.redis(&["SMEMBERS", &key]).await;
    let expected: BTreeSet<String> = (1..=5000).map(|u| u.to_string()).collect();
    assert_eq!(
        members, expected,
        "the old members are gone, every new one is in"
    );
    let ttl: i64 = app.redis(&["TTL", &key]).await;
    assert_eq!(ttl, -1, "no expiry for an entity without a ttl");
}
