//! The watched cache as a Redis Cluster (CACHE_REDIS_CLUSTER=true): a cluster of three
//! primaries started by the test, an application of 10,000 users whose keys spread over every
//! slot, faults on keys of every node, and a failover of one primary in the middle of a sweep.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use common::*;
use diesel_async::RunQueryDsl;
use stalewatch_core::{
    cache::Keyed,
    config::Config,
    shards::Round,
    slots::{self, Node, Topology},
};
use stalewatch_testkit::{eventually, Proc, RedisCluster, TestEnv};
use stalewatch_worker::app;

const USERS: i64 = 10_000;
/// Campaigns 1-30, users 1-10 each.
const CAMPAIGNS: i64 = 30;

const SCHEMA: &str = "
CREATE TABLE users (
    id      bigint PRIMARY KEY,
    email   text   NOT NULL,
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE members (
    campaign_id bigint NOT NULL,
    user_id     bigint NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
)";

/// A JSON document per user, a hash per user under a hash tag (`{{` and `}}` are literal
/// braces: `app:{userh:42}`), and a set per campaign.
const ENTITIES: &str = r#"
[[entity]]
name = "user"
table = "public.users"
primary_key = ["id"]
key = "app:user:{id}"
representation = "json"
version = "version"

[[entity]]
name = "user_hash"
table = "public.users"
primary_key = ["id"]
key = "app:{{userh:{id}}}"
representation = "hash"
columns = ["email"]

[[entity]]
name = "members"
table = "public.members"
primary_key = ["campaign_id", "user_id"]
key = "app:campaign:{campaign_id}:members"
representation = "set"
member = "{user_id}"
"#;

fn user_key(id: i64) -> String {
    format!("app:user:{id}")
}

fn hash_key(id: i64) -> String {
    format!("app:{{userh:{id}}}")
}

fn campaign_key(c: i64) -> String {
    format!("app:campaign:{c}:members")
}

struct App {
    cluster: RedisCluster,
    env: TestEnv,
    entities: EntitiesFile,
}

#[derive(diesel::QueryableByName)]
struct Doc {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    doc: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    email: String,
}

impl App {
    async fn start(replicas: usize) -> App {
        let cluster = RedisCluster::start(3, replicas).await.unwrap();
        let env = TestEnv::with_cache_cluster(&cluster.seeds()).await.unwrap();
        sql_script(&env, SCHEMA).await;
        let entities = EntitiesFile::write("entities", ENTITIES);
        App {
            cluster,
            env,
            entities,
        }
    }

    async fn sql(&self, query: &str) {
        sql(&self.env, query).await;
    }

    /// Users 1-10,000 and the campaigns' members, every key cached as the application would:
    /// one pipeline per primary for each 5,000 keys.
    async fn seed(&self) {
        self.sql(&format!(
            "INSERT INTO users (id, email) SELECT i, 'u' || i || '@example.com' \
             FROM generate_series(1, {USERS}) AS i"
        ))
        .await;
        self.sql(&format!(
            "INSERT INTO members SELECT c, u FROM generate_series(1, {CAMPAIGNS}) AS c, \
             generate_series(1, 10) AS u"
        ))
        .await;
        let docs = self.docs("true").await;
        let mut groups = Vec::new();
        for d in &docs {
            groups.push(set(&user_key(d.id), &d.doc));
            groups.push(Keyed::one(
                hash_key(d.id),
                redis::cmd("HSET")
                    .arg(hash_key(d.id))
                    .arg("email")
                    .arg(&d.email)
                    .clone(),
            ));
        }
        for c in 1..=CAMPAIGNS {
            groups.push(Keyed::one(
                campaign_key(c),
                redis::cmd("SADD")
                    .arg(campaign_key(c))
                    .arg((1..=10).collect::<Vec<i64>>())
                    .clone(),
            ));
        }
        self.write(groups).await;
    }

    async fn write(&self, groups: Vec<Keyed>) {
        let conn = self.env.cache.connection();
        for chunk in groups.chunks(5000) {
            for reply in conn.grouped(chunk).await.unwrap().into_iter().flatten() {
                assert!(!matches!(reply, redis::Value::ServerError(_)), "{reply:?}");
            }
        }
    }

    /// The users `filter` (SQL) selects, each with its JSON document as PostgreSQL renders it.
    async fn docs(&self, filter: &str) -> Vec<Doc> {
        let mut conn = self.env.pool.get().await.unwrap();
        diesel::sql_query(format!(
            "SELECT id, json_build_object('id', id, 'email', email, 'version', version)::text \
             AS doc, email FROM users WHERE {filter} ORDER BY id"
        ))
        .load(&mut conn)
        .await
        .unwrap()
    }

    async fn get(&self, key: &str) -> Option<String> {
        redis_cmd(&self.env, &["GET", key]).await
    }

    fn config(&self) -> Config {
        Config {
            entities: Some(self.entities.path().to_path_buf()),
            ..self.env.config()
        }
    }

    fn vars<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut vars = vec![self.entities.var()];
        vars.extend_from_slice(extra);
        vars
    }
}

fn set(key: &str, value: &str) -> Keyed {
    Keyed::one(key, redis::cmd("SET").arg(key).arg(value).clone())
}

/// For each primary, the first `n` of `candidates` whose key (`key_of`) it serves.
fn per_node(
    topology: &Topology,
    n: usize,
    candidates: impl IntoIterator<Item = i64>,
    key_of: impl Fn(i64) -> String,
) -> BTreeMap<Node, Vec<i64>> {
    let mut out: BTreeMap<Node, Vec<i64>> = topology
        .primaries()
        .into_iter()
        .map(|(_, node)| (node, Vec::new()))
        .collect();
    for id in candidates {
        let node = topology.owner(slots::slot(key_of(id).as_bytes())).unwrap();
        let picked = out.get_mut(node).unwrap();
        if picked.len() < n {
            picked.push(id);
        }
        if out.values().all(|v| v.len() == n) {
            break;
        }
    }
    assert!(out.values().all(|v| v.len() == n), "{out:?}");
    out
}

fn start(app: &App, extra: &[(&str, &str)]) -> (Proc, u16) {
    worker(&app.env, &app.vars(extra))
}

async fn latest_state(env: &TestEnv, key: &str) -> Option<(String, Option<String>)> {
    latest(env, key).await.map(|r| (r.state, r.resolution))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_cache_is_swept_watched_refreshed_repaired_and_rebuilt_on_every_node() {
    let app = App::start(0).await;
    app.seed().await;
    let topology = app.cluster.topology().await.unwrap();
    assert_eq!(topology.primaries().len(), 3);
    // The users' keys spread over the slots, and every primary serves a fair share of them.
    let mut slots_used = BTreeSet::new();
    let mut per_primary: BTreeMap<&Node, usize> = BTreeMap::new();
    for id in 1..=USERS {
        let slot = slots::slot(user_key(id).as_bytes());
        slots_used.insert(slot);
        *per_primary
            .entry(topology.owner(slot).unwrap())
            .or_default() += 1;
    }
    assert!(slots_used.len() > 6_000, "{}", slots_used.len());
    assert!(per_primary.values().all(|&n| n > 3_000), "{per_primary:?}");

    // The sweep checks every row and every key, on every node: all consistent.
    let config = Config {
        sweep_batch: 1000,
        grace_period: Duration::from_millis(3000),
        ..app.config()
    };
    let ctx = app::connect(&config).await.unwrap();
    let sweeper = app::sweeper(&ctx, &config);
    let clean = sweeper.once().await.unwrap();
    assert!(clean.complete, "{clean:?}");
    let rows = 2 * USERS as u64 + CAMPAIGNS as u64;
    assert_eq!(clean.items, rows, "{clean:?}");
    assert_eq!(clean.verdicts.get("match"), Some(&rows), "{clean:?}");
    assert_eq!(clean.keys_scanned, rows, "{clean:?}");
    assert!(all_incidents(&app.env).await.is_empty());

    // The worker (no sweep of its own: what it sees, it sees by keyspace notifications) and
    // the API, both on the cluster.
    let (w, metrics_port) = start(
        &app,
        &[
            ("SWEEP_INTERVAL_MS", "0"),
            ("GRACE_PERIOD_MS", "3000"),
            ("REPAIR_POLICY", "confirmed"),
        ],
    );
    let (_a, api_url) = api(&app.env, &app.vars(&[]));
    wait_http(&format!("{api_url}/healthz")).await;
    eventually(
        Duration::from_secs(30),
        "a subscription on every primary",
        || async {
            w.output()
                .lines()
                .any(|l| l.contains("watching keyspace notifications") && l.contains("\"nodes\":3"))
                .then_some(())
        },
    )
    .await;

    // Faults on every node: rows moved on in SQL (the JSON stale, the hash's email wrong), a
    // set missing a member, an orphan key.
    let stale = per_node(&topology, 2, 1..=USERS, user_key);
    let stale_ids: Vec<i64> = stale.values().flatten().copied().collect();
    let id_list = stale_ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    app.sql(&format!(
        "UPDATE users SET email = 'moved' || id || '@example.com', version = version + 1 \
         WHERE id IN ({id_list})"
    ))
    .await;
    let campaigns = per_node(&topology, 1, 1..=CAMPAIGNS, campaign_key);
    for c in campaigns.values().flatten() {
        app.sql(&format!("INSERT INTO members VALUES ({c}, 11)"))
            .await;
    }
    let orphans = per_node(&topology, 1, USERS + 1..=USERS * 3, user_key);
    app.write(
        orphans
            .values()
            .flatten()
            .map(|id| {
                set(
                    &user_key(*id),
                    &format!("{{\"id\":{id},\"email\":\"gone\",\"version\":1}}"),
                )
            })
            .collect(),
    )
    .await;

    let found = sweeper.once().await.unwrap();
    assert_eq!(found.items, rows, "{found:?}");
    assert_eq!(found.keys_scanned, rows + 3, "{found:?}");
    assert_eq!(found.verdicts.get("stale"), Some(&6), "{found:?}");
    // Six hashes (their email) and three sets.
    assert_eq!(found.verdicts.get("value_mismatch"), Some(&9), "{found:?}");
    assert_eq!(found.verdicts.get("orphan_in_cache"), Some(&3), "{found:?}");

    // A refresh through the API writes each node's key right away (its incident still
    // Detected: it closes as transient); the rest are confirmed and repaired by the worker.
    let refreshed: Vec<i64> = stale.values().map(|ids| ids[0]).collect();
    let client = reqwest::Client::new();
    for id in &refreshed {
        let incident = incidents_of(&app.env, &user_key(*id)).await.remove(0);
        let reply = client
            .post(format!("{api_url}/inconsistencies/{}/refresh", incident.id))
            .send()
            .await
            .unwrap();
        let status = reply.status();
        let body: serde_json::Value = reply.json().await.unwrap();
        assert!(status.is_success(), "{status}: {body}");
        assert!(
            matches!(body["state"].as_str(), Some("transient" | "resolved")),
            "{body}"
        );
    }
    let mut repaired: Vec<String> = stale_ids
        .iter()
        .filter(|id| !refreshed.contains(id))
        .map(|id| user_key(*id))
        .collect();
    repaired.extend(stale_ids.iter().map(|id| hash_key(*id)));
    repaired.extend(campaigns.values().flatten().map(|c| campaign_key(*c)));
    repaired.extend(orphans.values().flatten().map(|id| user_key(*id)));
    for key in &repaired {
        let (_, resolution) = eventually(
            Duration::from_secs(60),
            &format!("{key} repaired"),
            || async {
                latest_state(&app.env, key)
                    .await
                    .filter(|(state, _)| state == "resolved")
            },
        )
        .await;
        assert_eq!(resolution.as_deref(), Some("repair"), "{key}");
    }
    // The cache now says what the table says, on every node.
    for d in app.docs(&format!("id IN ({id_list})")).await {
        let cached = app.get(&user_key(d.id)).await.unwrap();
        let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(json(&cached), json(&d.doc), "user {}", d.id);
        let email: Option<String> = redis::cmd("HGET")
            .arg(hash_key(d.id))
            .arg("email")
            .query_async(&mut app.env.cache.connection())
            .await
            .unwrap();
        assert_eq!(email, Some(d.email));
    }
    for id in orphans.values().flatten() {
        assert_eq!(app.get(&user_key(*id)).await, None, "orphan {id} deleted");
    }
    for c in campaigns.values().flatten() {
        let members: BTreeSet<i64> = redis::cmd("SMEMBERS")
            .arg(campaign_key(*c))
            .query_async(&mut app.env.cache.connection())
            .await
            .unwrap();
        assert_eq!(members, (1..=11).collect(), "campaign {c}");
    }

    // Another client writes a wrong document on a key of each node: each is seen by that
    // node's keyspace notifications (the worker does not sweep).
    let watched = per_node(&topology, 1, 1000..=USERS, user_key);
    let docs = app
        .docs(&format!(
            "id IN ({})",
            watched
                .values()
                .flatten()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    app.write(
        docs.iter()
            .map(|d| set(&user_key(d.id), &d.doc.replace("@example", "@wrong")))
            .collect(),
    )
    .await;
    for d in &docs {
        eventually(
            Duration::from_secs(15),
            &format!("{} seen by its node's notification", user_key(d.id)),
            || async { latest_state(&app.env, &user_key(d.id)).await },
        )
        .await;
    }
    let notified = metric(metrics_port, "stalewatch_notifications_total", &[]).await;
    assert!(notified >= 3.0, "{notified}");

    // What a pattern invalidation does: SCAN MATCH over every primary, then UNLINK the keys
    // found, wherever they are.
    let mut found = Vec::new();
    let mut at = slots::ScanAt::default();
    loop {
        let (keys, next) = app
            .env
            .cache
            .scan(&at, "app:campaign:*:members", 7)
            .await
            .unwrap();
        found.extend(keys);
        match next {
            Some(next) => at = next,
            None => break,
        }
    }
    found.sort();
    let mut all: Vec<String> = (1..=CAMPAIGNS).map(campaign_key).collect();
    all.sort();
    assert_eq!(found, all, "every campaign's key, each once");
    assert_eq!(
        app.env.cache.unlink_many(&found).await.unwrap(),
        CAMPAIGNS as u64
    );
    for c in 1..=CAMPAIGNS {
        let exists: bool = redis::cmd("EXISTS")
            .arg(campaign_key(c))
            .query_async(&mut app.env.cache.connection())
            .await
            .unwrap();
        assert!(!exists, "campaign {c}");
    }

    // A rebuild writes every key back, one pipeline per primary a page: the sets just deleted,
    // and every user's hash (each replaced in a MULTI on its own key, on its own node).
    for (entity, keys) in [("members", CAMPAIGNS), ("user_hash", USERS)] {
        let status = rebuild_through_api(&client, &api_url, entity, Duration::from_secs(60)).await;
        assert_eq!(status["state"], "done", "{status}");
        assert_eq!(status["summary"]["keys"], keys, "{status}");
        assert_eq!(status["summary"]["written"], keys, "{status}");
    }
    for c in 1..=CAMPAIGNS {
        let members: BTreeSet<i64> = redis::cmd("SMEMBERS")
            .arg(campaign_key(c))
            .query_async(&mut app.env.cache.connection())
            .await
            .unwrap();
        let expected: BTreeSet<i64> = if campaigns.values().flatten().any(|x| *x == c) {
            (1..=11).collect()
        } else {
            (1..=10).collect()
        };
        assert_eq!(members, expected, "campaign {c} rebuilt");
    }
    let email: String = redis::cmd("HGET")
        .arg(hash_key(USERS))
        .arg("email")
        .query_async(&mut app.env.cache.connection())
        .await
        .unwrap();
    assert_eq!(email, format!("u{USERS}@example.com"));
}

/// The shard walk's record of the round in progress, from stalewatch's own Redis.
async fn round_now(env: &TestEnv) -> Option<Round> {
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.keys().sweep_round())
        .query_async(&mut env.own.clone())
        .await
        .ok()?;
    (!fields.is_empty())
        .then(|| Round::parse(&fields).ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_during_a_sweep_misses_nothing_and_reports_nothing_twice() {
    let mut app = App::start(1).await;
    app.seed().await;
    let topology = app.cluster.topology().await.unwrap();
    // Faults on every node: stale rows (their JSON and their hash), and orphans.
    let stale = per_node(&topology, 3, 1..=USERS, user_key);
    let stale_ids: Vec<i64> = stale.values().flatten().copied().collect();
    let id_list = stale_ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    app.sql(&format!(
        "UPDATE users SET email = 'moved' || id || '@example.com', version = version + 1 \
         WHERE id IN ({id_list})"
    ))
    .await;
    let orphans = per_node(&topology, 2, USERS + 1..=USERS * 3, user_key);
    app.write(
        orphans
            .values()
            .flatten()
            .map(|id| set(&user_key(*id), &format!("{{\"id\":{id},\"version\":1}}")))
            .collect(),
    )
    .await;
    let mut expected: BTreeSet<String> = stale_ids.iter().map(|id| user_key(*id)).collect();
    expected.extend(stale_ids.iter().map(|id| hash_key(*id)));
    expected.extend(orphans.values().flatten().map(|id| user_key(*id)));
    // A failover loses nothing written before it.
    app.cluster.replicate().await.unwrap();

    // Small pages, so the round is long enough to fail a primary over in its middle; a short
    // shard lease, so a shard whose page failed with the primary is taken again soon.
    let (w, metrics_port) = start(
        &app,
        &[
            ("SWEEP_INTERVAL_MS", "60000"),
            ("SWEEP_BATCH", "50"),
            ("SWEEP_SHARDS", "4"),
            ("SWEEP_LEASE_MS", "3000"),
        ],
    );
    let env = &app.env;
    let round = eventually(Duration::from_secs(30), "the round under way", || async {
        round_now(env).await.filter(|r| r.rows() > 0)
    })
    .await;
    // Rows of the JSON and hash entities, and keys of the set entity (its walk is by key).
    let total = (2 * USERS + CAMPAIGNS) as u64;
    assert!(
        round.rows() < total / 2,
        "too late for a failover: {round:?}"
    );

    // The primary serving user 1's key dies; its replica takes over.
    let victim = topology.owner(slots::slot(user_key(1).as_bytes())).unwrap();
    let primary = app.cluster.index(victim.port).unwrap();
    let replica = app
        .cluster
        .nodes
        .iter()
        .position(|n| n.replica_of == Some(primary))
        .unwrap();
    app.cluster.kill(primary);
    app.cluster.take_over(replica).await.unwrap();
    let promoted = app.cluster.nodes[replica].port;

    // The round completes, every row counted once, the killed primary's share included.
    let env = &app.env;
    let last = eventually(Duration::from_secs(90), "the round to complete", || async {
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(env.keys().sweep_last_round())
            .query_async(&mut env.own.clone())
            .await
            .ok()?;
        Round::parse(&fields).ok().filter(|r| r.id == round.id)
    })
    .await;
    assert_eq!(last.rows(), total, "{last:?}");

    // Every fault found, once; nothing else.
    let incidents = all_incidents(env).await;
    let mut by_key: BTreeMap<&str, usize> = BTreeMap::new();
    for i in &incidents {
        *by_key.entry(i.cache_key.as_str()).or_default() += 1;
    }
    let found: BTreeSet<String> = by_key.keys().map(|k| k.to_string()).collect();
    assert_eq!(found, expected, "missed or extra");
    assert!(
        by_key.values().all(|&n| n == 1),
        "a key reported twice: {by_key:?}"
    );

    // The notifications followed the failover: the gap is counted, the new primary watched.
    eventually(
        Duration::from_secs(30),
        "the subscriptions renewed",
        || async {
            (w.output()
                .matches("watching keyspace notifications")
                .count()
                >= 2)
                .then_some(())
        },
    )
    .await;
    let gaps = metric(metrics_port, "stalewatch_notify_gaps_total", &[]).await;
    assert!(gaps >= 1.0, "{gaps}");
    let after = app.cluster.topology().await.unwrap();
    let on_promoted = (1..=USERS)
        .find(|id| {
            !stale_ids.contains(id)
                && after
                    .owner(slots::slot(user_key(*id).as_bytes()))
                    .map(|n| n.port)
                    == Some(promoted)
        })
        .unwrap();
    let doc = app.docs(&format!("id = {on_promoted}")).await.remove(0);
    app.write(vec![set(
        &user_key(on_promoted),
        &doc.doc.replace("@example", "@wrong"),
    )])
    .await;
    // The sweep rests for a minute: only the promoted node's notification can tell.
    eventually(
        Duration::from_secs(15),
        "a write on the promoted primary seen",
        || async { latest_state(env, &user_key(on_promoted)).await },
    )
    .await;
}
