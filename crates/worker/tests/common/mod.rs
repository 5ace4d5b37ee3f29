//! Helpers for the tests that run the real binaries. Each test file compiles this module
//! into its own binary and uses a part of it, hence `dead_code` allowed.
#![allow(dead_code)]

pub mod capture;
mod files;
mod stores;

// Re-exported for `use common::*`; each test binary uses a part of them.
#[allow(unused_imports)]
pub use files::{EntitiesFile, TempDir};
#[allow(unused_imports)]
pub use stores::{flush_keys, redis_cmd, sql, sql_script};

use std::{
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use stalewatch_core::{
    db::{
        incidents::{self, IncidentRow, ListQuery},
        items::{self, Item},
    },
    jobs::{CheckJob, Job},
    queue,
};
use stalewatch_testkit::{bin_path, eventually, free_port, Proc, TestEnv};

pub fn worker(env: &TestEnv, extra: &[(&str, &str)]) -> (Proc, u16) {
    let port = free_port();
    let mut vars = env.env_vars();
    vars.push(("METRICS_ADDR".into(), format!("127.0.0.1:{port}")));
    vars.push(("LOG_FORMAT".into(), "json".into()));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (
        Proc::spawn(&bin_path("stalewatch-worker"), &[], &vars),
        port,
    )
}

/// `stalewatch-worker rebuild --entity <entity>` for `entities`, with `extra` settings after
/// the environment's, ready to run.
pub fn rebuild_command(
    env: &TestEnv,
    entities: &EntitiesFile,
    entity: &str,
    extra: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(bin_path("stalewatch-worker"));
    cmd.args(["rebuild", "--entity", entity])
        .envs(env.env_vars())
        .env("ENTITIES", entities.path())
        .env("LOG_FORMAT", "json")
        .envs(extra.iter().copied());
    cmd
}

/// Runs a rebuild to its end (on a blocking thread: the runtime goes on serving the test).
pub async fn run_rebuild(
    env: &TestEnv,
    entities: &EntitiesFile,
    entity: &str,
    extra: &[(&str, &str)],
) -> Output {
    let mut cmd = rebuild_command(env, entities, entity, extra);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub fn api(env: &TestEnv, extra: &[(&str, &str)]) -> (Proc, String) {
    let port = free_port();
    let mut vars = env.env_vars();
    vars.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    vars.push(("LOG_FORMAT".into(), "json".into()));
    // These tests follow incidents end to end and refresh them as the demo does; the
    // token itself is tested in crates/api/tests.
    vars.push(("ADMIN_TOKEN".into(), "disabled".into()));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (
        Proc::spawn(&bin_path("stalewatch-api"), &[], &vars),
        format!("http://127.0.0.1:{port}"),
    )
}

/// Waits until the worker has subscribed to keyspace notifications `times` times in all
/// (a renewed subscription logs the line again).
pub async fn subscribed(w: &Proc, times: usize) {
    eventually(
        Duration::from_secs(30),
        "the worker to subscribe",
        || async {
            (w.output()
                .matches("watching keyspace notifications")
                .count()
                >= times)
                .then_some(())
        },
    )
    .await;
}

/// Starts a rebuild of `entity` through the API and waits (up to `within`) until it is no
/// longer running; its last status.
pub async fn rebuild_through_api(
    client: &reqwest::Client,
    api_url: &str,
    entity: &str,
    within: Duration,
) -> Value {
    let started = client
        .post(format!("{api_url}/entities/{entity}/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), reqwest::StatusCode::ACCEPTED, "{entity}");
    eventually(within, "the rebuild to end", || {
        let req = client
            .get(format!("{api_url}/entities/{entity}/rebuild"))
            .send();
        async move {
            let status: Value = req.await.ok()?.json().await.ok()?;
            (status["state"] != "running").then_some(status)
        }
    })
    .await
}

pub async fn wait_http(url: &str) {
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), &format!("{url} to answer"), || {
        let req = client.get(url).send();
        async move {
            req.await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await
}

/// One metric's value (summed over the series matching `labels`) from a /metrics page.
pub async fn metric(port: u16, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("metrics endpoint")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every incident of `key`, newest first.
pub async fn incidents_of(env: &TestEnv, key: &str) -> Vec<IncidentRow> {
    let mut conn = env.pool.get().await.unwrap();
    incidents::list(
        &mut conn,
        &ListQuery {
            key: Some(key.to_string()),
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// The newest incident of `key`, if it has any.
pub async fn latest(env: &TestEnv, key: &str) -> Option<IncidentRow> {
    incidents_of(env, key).await.into_iter().next()
}

/// Waits until the newest incident of `key` is confirmed (or, later still, persistent).
pub async fn confirmed(env: &TestEnv, key: &str) -> IncidentRow {
    eventually(
        Duration::from_secs(60),
        &format!("{key} confirmed"),
        || async {
            latest(env, key)
                .await
                .filter(|r| matches!(r.state.as_str(), "confirmed" | "persistent"))
        },
    )
    .await
}

pub async fn all_incidents(env: &TestEnv) -> Vec<IncidentRow> {
    let mut conn = env.pool.get().await.unwrap();
    incidents::list(
        &mut conn,
        &ListQuery {
            limit: 100_000,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Creates `n` items and makes the cache of each hold an older version of it.
pub async fn stale_items(env: &TestEnv, n: usize) -> Vec<Item> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let item = items::create(
            &env.pool,
            &format!("item-{i}"),
            &serde_json::json!({ "i": i }),
        )
        .await
        .unwrap();
        let mut old: Value = serde_json::to_value(&item).unwrap();
        old["version"] = Value::from(0);
        old["name"] = Value::from("an older name");
        env.cache
            .set(
                &env.keys().item(&item.id),
                old.to_string().as_bytes(),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        out.push(item);
    }
    out
}

pub async fn push_checks(env: &TestEnv, jobs: Vec<CheckJob>) {
    let mut conn = queue::connect(&env.redis_url).await.unwrap();
    for chunk in jobs.chunks(1000) {
        let batch = chunk.iter().cloned().map(|j| (j, None)).collect();
        queue::push(&mut conn, env.keys(), batch).await.unwrap();
    }
}

/// Waits until `J`'s queue has nothing pending, scheduled or in flight.
///
/// In-flight jobs count: a job a worker has fetched but not finished has left the pending
/// list, and a test that stopped waiting then would race its result (or miss the job coming
/// back when its worker dies). apalis-redis keeps them in one set per worker,
/// `{inflight_jobs_set}:{worker name}` (`Config::inflight_set_for`), and names the workers
/// only at run time, so the sets are found by SCAN.
pub async fn drained<J: Job>(env: &TestEnv, timeout: Duration) {
    let conn = queue::connect(&env.redis_url).await.unwrap();
    let config = queue::config::<J>(env.keys(), 1);
    let inflight_pattern = format!("{}:*", glob_escape(&config.inflight_jobs_set()));
    eventually(timeout, &format!("the {} queue to drain", J::NAME), || {
        let (mut conn, config) = (conn.clone(), config.clone());
        let inflight_pattern = inflight_pattern.clone();
        async move {
            let d = queue::depth(&mut conn, &config).await.ok()?;
            if d.pending > 0 || d.scheduled > 0 {
                return None;
            }
            let mut cursor: u64 = 0;
            loop {
                let (next, sets): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&inflight_pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                for set in sets {
                    let n: u64 = redis::cmd("SCARD")
                        .arg(&set)
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if n > 0 {
                        return None;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            // Once more: a job retried or handed back from a dead worker leaves its in-flight
            // set for the pending list or the scheduled set, possibly after the first look.
            let d = queue::depth(&mut conn, &config).await.ok()?;
            (d.pending == 0 && d.scheduled == 0).then_some(())
        }
    })
    .await;
}

/// `s` matched literally by a Redis glob pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A consistent item: its row, and its cached copy exactly as the API would write it.
pub async fn cached_item(env: &TestEnv, name: &str, value: Value) -> Item {
    let item = items::create(&env.pool, name, &value).await.unwrap();
    env.cache
        .set(
            &env.keys().item(&item.id),
            &item.to_cache_bytes(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    item
}
