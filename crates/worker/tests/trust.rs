//! What lets people trust stalewatch's word: one bad row stops nothing, a confirmation is
//! never lost with its queue, orphans are found, the sweep's rest is the deployment's, storage
//! stays bounded, a backlog drains without burning retries, and REPAIR_POLICY repairs.

mod common;

use std::time::Duration;

use common::*;
use stalewatch_core::{
    compare::Kind,
    config::Config,
    db::items::Item,
    incident::Source,
    jobs::{CheckJob, ConfirmJob},
    keys::Keys,
    queue,
};
use stalewatch_testkit::{eventually, scaled, TestEnv};
use stalewatch_worker::{app, handlers::Ctx, sweep::Sweeper};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The backlog of `a_backlog_drains_with_no_failed_attempt_on_a_small_pool`: this many check
/// jobs of `BACKLOG_IDS` ids each (about 75 MB of payloads in Redis). On a 2-core machine the
/// push takes about 3 s and the drain, one job at a time with a pool of 4, about 13 s.
const BACKLOG_JOBS: usize = 2_000;
const BACKLOG_IDS: usize = 1_000;

fn check(keys: &Keys, ids: Vec<Uuid>) -> CheckJob {
    CheckJob::for_items(keys, &ids, Source::WriteCheck)
}

/// A worker context and sweeper of this test's data, sweeping `batch` rows at a time.
async fn sweeper(env: &TestEnv, batch: usize) -> (Ctx, Sweeper) {
    let config = Config {
        sweep_batch: batch,
        ..env.config()
    };
    let ctx = app::connect(&config).await.unwrap();
    let sweeper = app::sweeper(&ctx, &config);
    (ctx, sweeper)
}

/// Creates `n` items whose cached copy is exactly what the API would write.
async fn consistent_items(env: &TestEnv, n: usize) -> Vec<Item> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(cached_item(env, &format!("ok-{i}"), serde_json::json!({ "i": i })).await);
    }
    out
}

/// The version field of the JSON document cached under `key`.
async fn cached_version(env: &TestEnv, key: &str) -> Option<i64> {
    let bytes = env.cache.get(key).await.unwrap()?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    doc["version"].as_i64()
}

/// Every Redis key whose name starts with `prefix` (SCAN, so the shared server is not
/// blocked).
async fn keys_starting_with(env: &TestEnv, prefix: &str) -> Vec<String> {
    let mut conn = env.own.clone();
    let mut found = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        found.extend(keys);
        if next == 0 {
            found.sort();
            found.dedup();
            return found;
        }
        cursor = next;
    }
}

async fn wait_metrics(port: u16) {
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_parser_refuses_is_an_undecodable_incident_and_the_sweep_moves_on() {
    let env = TestEnv::new().await.unwrap();
    // In id order (v7 ids are ordered by creation within a process): 8 consistent, 4 stale,
    // the bad row, 8 consistent, 6 stale. With batches of 10 the bad row is in the middle of
    // the second page, and stale rows follow it on that page and the next.
    let mut consistent = consistent_items(&env, 8).await;
    let stale_before = stale_items(&env, 4).await;
    let bad = Uuid::now_v7();
    // 200 levels of nesting: PostgreSQL accepts it, serde_json refuses past 128.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    sql(
        &env,
        &format!("INSERT INTO items (id, name, value) VALUES ('{bad}', 'deep', '{deep}'::jsonb)"),
    )
    .await;
    consistent.extend(consistent_items(&env, 8).await);
    let stale_after = stale_items(&env, 6).await;

    let mut ids: Vec<Uuid> = consistent
        .iter()
        .chain(&stale_before)
        .chain(&stale_after)
        .map(|i| i.id)
        .chain([bad])
        .collect();
    ids.sort();
    let at = ids.iter().position(|id| *id == bad).unwrap();
    assert_eq!(
        at, 12,
        "the bad row sits mid-table, inside the second batch"
    );
    assert!(stale_after.iter().all(|i| i.id > bad));

    let (ctx, sweeper) = sweeper(&env, 10).await;
    let summary = sweeper
        .once()
        .await
        .expect("the pass is not stopped by one row");
    assert!(summary.complete, "{summary:?}");
    assert_eq!(summary.items, 27, "every row is counted, the bad one too");
    assert_eq!(summary.verdicts.get("undecodable"), Some(&1), "{summary:?}");
    assert_eq!(summary.verdicts.get("stale"), Some(&10), "{summary:?}");
    assert_eq!(summary.verdicts.get("match"), Some(&16), "{summary:?}");

    let bad_key = env.keys().item(&bad);
    let rows = incidents_of(&env, &bad_key).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].kind, "undecodable");
    assert_eq!(rows[0].state, "detected");
    assert!(
        rows[0].diff.contains("cannot be decoded"),
        "the diff says why: {:?}",
        rows[0].diff
    );
    for item in stale_before.iter().chain(&stale_after) {
        let rows = incidents_of(&env, &env.keys().item(&item.id)).await;
        assert_eq!(rows.len(), 1, "{}: {rows:?}", item.id);
        assert_eq!(rows[0].kind, "stale");
    }
    for item in &consistent {
        assert!(incidents_of(&env, &env.keys().item(&item.id))
            .await
            .is_empty());
    }
    assert_eq!(all_incidents(&env).await.len(), 11);

    // A check job holding the bad id among good ones is not failed by it either.
    let fresh = stale_items(&env, 3).await;
    let mut job_ids = vec![fresh[0].id, bad];
    job_ids.extend(fresh[1..].iter().map(|i| i.id));
    let outcome = ctx
        .checker
        .check_items(&job_ids, Source::WriteCheck, None)
        .await
        .expect("a check of a batch with a bad row succeeds");
    assert_eq!(outcome.verdicts.get(&Kind::Undecodable), Some(&1));
    assert_eq!(outcome.verdicts.get(&Kind::Stale), Some(&3));
    for item in &fresh {
        let key = env.keys().item(&item.id);
        assert!(
            outcome
                .recorded
                .iter()
                .any(|r| r.cache_key == key && r.incident.is_some()),
            "{key} recorded: {:?}",
            outcome.recorded
        );
        let rows = incidents_of(&env, &key).await;
        assert_eq!(rows.len(), 1, "{key}: {rows:?}");
        assert_eq!(
            (rows[0].kind.as_str(), rows[0].state.as_str()),
            ("stale", "detected")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_ids_in_one_check_invent_no_orphan() {
    let env = TestEnv::new().await.unwrap();
    let item = consistent_items(&env, 1).await.remove(0);
    let (ctx, _) = sweeper(&env, 10).await;
    let outcome = ctx
        .checker
        .check_items(&[item.id, item.id], Source::WriteCheck, None)
        .await
        .unwrap();
    assert_eq!(
        outcome.verdicts.get(&Kind::OrphanInCache),
        None,
        "{outcome:?}"
    );
    assert_eq!(
        outcome.verdicts.get(&Kind::Match),
        Some(&1),
        "observed once"
    );
    assert!(all_incidents(&env).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_backstop_confirms_when_the_confirm_queue_is_lost() {
    let env = TestEnv::new().await.unwrap();
    // A grace of 4 s, not 1 s: apalis runs a job up to a second before its due time (whole
    // seconds, rounded down) and the handler then holds it in flight until due, where deleting
    // the queue cannot stop it. With 4 s the job cannot be fetched for 3 s after detection,
    // ample time to lose the queue first (asserted below), so only the backstop can confirm.
    // Scaled: on a loaded machine detecting and losing the queue took longer than 3 s.
    let grace = scaled(Duration::from_secs(4)).as_millis().to_string();
    let (_w, port) = worker(
        &env,
        &[
            ("SWEEP_INTERVAL_MS", "0"),
            ("GRACE_PERIOD_MS", &grace),
            ("CONFIRM_BACKSTOP_MS", "500"),
            // The test counts observations: the stale value it writes must not add a check
            // of its own through a keyspace notification.
            ("KEYSPACE_NOTIFICATIONS", "off"),
        ],
    );
    let item = stale_items(&env, 1).await.remove(0);
    let key = env.keys().item(&item.id);
    push_checks(&env, vec![check(env.keys(), vec![item.id])]).await;
    let detected = eventually(Duration::from_secs(20), "the incident detected", || {
        let (env, key) = (&env, &key);
        async move {
            incidents_of(env, key)
                .await
                .into_iter()
                .find(|r| r.state == "detected")
        }
    })
    .await;

    // The incident is committed before its confirmation is pushed: wait for the push, or
    // the queue lost below could be written again by it.
    let config = queue::config::<ConfirmJob>(env.keys(), 1);
    eventually(
        Duration::from_secs(20),
        "the confirmation scheduled",
        || {
            let config = &config;
            let env = &env;
            async move {
                let depth = queue::depth(&mut env.own.clone(), config).await.unwrap();
                (depth.scheduled == 1).then_some(())
            }
        },
    )
    .await;

    // Lose the confirm queue: every key of it, whatever apalis keeps there.
    let confirm_queue = env.keys().queue("confirm");
    let lost = keys_starting_with(&env, &confirm_queue).await;
    assert!(!lost.is_empty(), "the confirmation was scheduled");
    let mut conn = env.own.clone();
    redis::cmd("UNLINK")
        .arg(&lost)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(
        chrono::Utc::now() + chrono::Duration::seconds(1) < detected.confirm_due_at,
        "the queue was lost before its confirm job could be fetched"
    );
    let depth = queue::depth(&mut env.own.clone(), &config).await.unwrap();
    assert_eq!((depth.pending, depth.scheduled), (0, 0));

    let confirmed = eventually(
        Duration::from_secs(30),
        "the incident confirmed by the backstop",
        || {
            let (env, key) = (&env, &key);
            async move {
                incidents_of(env, key)
                    .await
                    .into_iter()
                    .find(|r| r.state == "confirmed")
            }
        },
    )
    .await;
    assert_eq!(confirmed.id, detected.id);
    assert_eq!(confirmed.observations, 2, "detection plus one confirmation");
    assert!(confirmed.confirmed_at.unwrap() >= confirmed.confirm_due_at);
    assert!(
        metric(
            port,
            "stalewatch_jobs_total",
            &["job=\"confirm_backstop\"", "outcome=\"overdue\""]
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(
            port,
            "stalewatch_jobs_total",
            &["job=\"confirm\"", "outcome=\"ok\""]
        )
        .await,
        0.0,
        "no confirm job ran: the backstop confirmed it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_whose_row_was_deleted_in_sql_is_reported_as_an_orphan() {
    let env = TestEnv::new().await.unwrap();
    let items = consistent_items(&env, 25).await;
    let gone = &items[13];
    assert_eq!(
        sql(&env, &format!("DELETE FROM items WHERE id = '{}'", gone.id)).await,
        1
    );
    let gone_key = env.keys().item(&gone.id);
    assert!(
        env.cache.get(&gone_key).await.unwrap().is_some(),
        "the key stays"
    );

    let (_, sweeper) = sweeper(&env, 10).await;
    let summary = sweeper.once().await.unwrap();
    assert!(summary.complete, "{summary:?}");
    assert_eq!(summary.items, 24);
    assert!(summary.keys_scanned >= 25, "{summary:?}");
    assert_eq!(
        summary.verdicts.get("orphan_in_cache"),
        Some(&1),
        "{summary:?}"
    );

    let rows = all_incidents(&env).await;
    assert_eq!(rows.len(), 1, "only the orphan: {rows:?}");
    assert_eq!(rows[0].cache_key, gone_key);
    assert_eq!(rows[0].kind, "orphan_in_cache");
    assert_eq!(rows[0].state, "detected");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_rests_for_the_whole_deployment() {
    let env = TestEnv::new().await.unwrap();
    stale_items(&env, 5).await;
    let (_, first) = sweeper(&env, 10).await;
    let (_, second) = sweeper(&env, 10).await;
    let interval = Duration::from_secs(30);
    let token = CancellationToken::new();

    let done = first
        .resume(interval, &token)
        .await
        .unwrap()
        .expect("nobody rests or sweeps yet");
    assert!(done.complete);
    assert_eq!(done.items, 5);

    let mut conn = env.own.clone();
    let lease_held: bool = redis::cmd("EXISTS")
        .arg(env.keys().sweep_lease())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!lease_held, "the first sweeper released the lease");
    let rest_ms: i64 = redis::cmd("PTTL")
        .arg(env.keys().sweep_rest())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        rest_ms > 0 && rest_ms <= 30_000,
        "the rest expires after the interval: PTTL {rest_ms}"
    );
    assert!(
        second.resume(interval, &token).await.unwrap().is_none(),
        "another worker rests too, though the lease is free"
    );

    redis::cmd("DEL")
        .arg(env.keys().sweep_rest())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let next = second
        .resume(interval, &token)
        .await
        .unwrap()
        .expect("the rest is over");
    assert!(next.complete);
    assert_eq!(next.items, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_incidents_older_than_the_retention_are_deleted() {
    let env = TestEnv::new().await.unwrap();
    // Times relative to PostgreSQL's clock, which retention also reads. The CHECK
    // constraint: resolved_at is set exactly for resolved and transient incidents.
    let insert = |key: &str, state: &str, resolution: Option<&str>, closed: Option<&str>| {
        let ago = |age: &str| format!("now() - interval '{age}'");
        let resolved_at = closed.map(ago).unwrap_or_else(|| "NULL".into());
        let last_seen_at = closed.map(ago).unwrap_or_else(|| "now()".into());
        let confirmed_at = if state == "transient" {
            "NULL".to_string()
        } else {
            ago("70 hours")
        };
        let resolution = resolution.map_or("NULL".to_string(), |r| format!("'{r}'"));
        format!(
            "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, diff, \
             first_seen_at, confirm_due_at, confirmed_at, last_seen_at, resolved_at, \
             resolution, observations) VALUES ('{key}', 'item', '{key}', '{state}', 'stale', \
             'version 2 -> 1', now() - interval '3 days', now() - interval '3 days', \
             {confirmed_at}, {last_seen_at}, {resolved_at}, {resolution}, 2)"
        )
    };
    // Four closed long ago (two of them on the same key), one closed recently, one open.
    for (key, state, resolution, closed) in [
        ("old-a", "resolved", Some("refresh"), "2 days"),
        ("old-a", "resolved", Some("write"), "30 hours"),
        ("old-b", "resolved", Some("natural"), "90 minutes"),
        ("old-c", "transient", None, "1 day"),
        ("recent", "resolved", Some("write"), "10 minutes"),
    ] {
        sql(&env, &insert(key, state, resolution, Some(closed))).await;
    }
    sql(&env, &insert("open", "persistent", None, None)).await;
    assert_eq!(all_incidents(&env).await.len(), 6);

    let (_w, port) = worker(
        &env,
        &[("SWEEP_INTERVAL_MS", "0"), ("INCIDENT_RETENTION", "1h")],
    );
    let left = eventually(
        Duration::from_secs(30),
        "the old closed incidents deleted",
        || {
            let env = &env;
            async move {
                let rows = all_incidents(env).await;
                (rows.len() == 2).then_some(rows)
            }
        },
    )
    .await;
    let mut keys: Vec<&str> = left.iter().map(|r| r.cache_key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["open", "recent"]);
    let open = left.iter().find(|r| r.cache_key == "open").unwrap();
    assert_eq!(
        open.state, "persistent",
        "an open incident is never deleted"
    );
    wait_metrics(port).await;
    let deleted = eventually(Duration::from_secs(10), "the deletions counted", || async {
        let n = metric(port, "stalewatch_incidents_deleted_total", &[]).await;
        (n >= 4.0).then_some(n)
    })
    .await;
    assert_eq!(deleted, 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_jobs_are_counted_and_removed_after_their_retention() {
    let env = TestEnv::new().await.unwrap();
    let config = queue::config::<CheckJob>(env.keys(), 1);
    let mut conn = env.own.clone();
    let dead: Vec<String> = (0..3).map(|_| Uuid::now_v7().to_string()).collect();
    for id in &dead {
        let payload = serde_json::to_vec(&check(env.keys(), vec![Uuid::now_v7()])).unwrap();
        redis::pipe()
            .cmd("SADD")
            .arg(config.dead_jobs_set())
            .arg(id)
            .ignore()
            .cmd("HSET")
            .arg(config.job_data_hash())
            .arg(id)
            .arg(payload)
            .ignore()
            .cmd("HSET")
            .arg(format!("{}:{id}", config.job_meta_hash()))
            .arg("attempts")
            .arg(25)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    let (_w, port) = worker(
        &env,
        &[("SWEEP_INTERVAL_MS", "0"), ("DEAD_JOB_RETENTION", "2s")],
    );
    wait_metrics(port).await;
    // Counted when first seen (the upkeep's first round, as the worker starts) ...
    eventually(Duration::from_secs(30), "the dead jobs counted", || async {
        let n = metric(port, "stalewatch_dead_jobs", &["queue=\"check\""]).await;
        (n == 3.0).then_some(())
    })
    .await;
    // ... and removed by a later round, once dead for longer than the retention.
    eventually(Duration::from_secs(60), "the dead jobs removed", || {
        let (mut conn, config, dead) = (conn.clone(), config.clone(), &dead);
        async move {
            let left: u64 = redis::cmd("SCARD")
                .arg(config.dead_jobs_set())
                .query_async(&mut conn)
                .await
                .ok()?;
            let mut data = 0;
            for id in dead {
                let has_data: bool = redis::cmd("HEXISTS")
                    .arg(config.job_data_hash())
                    .arg(id)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let has_meta: bool = redis::cmd("EXISTS")
                    .arg(format!("{}:{id}", config.job_meta_hash()))
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                data += u64::from(has_data) + u64::from(has_meta);
            }
            (left == 0 && data == 0).then_some(())
        }
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the dead-job gauge back to 0",
        || async {
            let n = metric(port, "stalewatch_dead_jobs", &["queue=\"check\""]).await;
            (n == 0.0).then_some(())
        },
    )
    .await;
    let seen: bool = redis::cmd("EXISTS")
        .arg(env.keys().dead_seen("check"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!seen, "nothing of them is left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_drains_with_no_failed_attempt_on_a_small_pool() {
    let env = TestEnv::new().await.unwrap();
    let jobs: Vec<CheckJob> = (0..BACKLOG_JOBS)
        .map(|_| {
            check(
                env.keys(),
                (0..BACKLOG_IDS).map(|_| Uuid::new_v4()).collect(),
            )
        })
        .collect();
    let pushed = std::time::Instant::now();
    push_checks(&env, jobs).await;
    eprintln!("pushed {BACKLOG_JOBS} jobs in {:?}", pushed.elapsed());
    let started = std::time::Instant::now();
    let (_w, port) = worker(
        &env,
        &[("SWEEP_INTERVAL_MS", "0"), ("DATABASE_POOL_SIZE", "4")],
    );
    drained::<CheckJob>(&env, Duration::from_secs(600)).await;
    eprintln!("drained {BACKLOG_JOBS} jobs in {:?}", started.elapsed());
    let ok = eventually(Duration::from_secs(30), "every job counted", || async {
        let ok = metric(
            port,
            "stalewatch_jobs_total",
            &["job=\"check\"", "outcome=\"ok\""],
        )
        .await;
        (ok >= BACKLOG_JOBS as f64).then_some(ok)
    })
    .await;
    assert_eq!(ok, BACKLOG_JOBS as f64, "each job ran once");
    assert_eq!(
        metric(
            port,
            "stalewatch_jobs_total",
            &["job=\"check\"", "outcome=\"error\""]
        )
        .await,
        0.0,
        "no attempt failed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_policy_confirmed_rewrites_a_confirmed_key() {
    let env = TestEnv::new().await.unwrap();
    let (_w, port) = worker(
        &env,
        &[
            ("REPAIR_POLICY", "confirmed"),
            ("GRACE_PERIOD_MS", "1000"),
            ("SWEEP_INTERVAL_MS", "0"),
        ],
    );
    let item = stale_items(&env, 1).await.remove(0);
    let key = env.keys().item(&item.id);
    assert_eq!(cached_version(&env, &key).await, Some(0));
    push_checks(&env, vec![check(env.keys(), vec![item.id])]).await;
    let row = eventually(Duration::from_secs(30), "the incident repaired", || {
        let (env, key) = (&env, &key);
        async move {
            incidents_of(env, key)
                .await
                .into_iter()
                .find(|r| r.state == "resolved")
        }
    })
    .await;
    assert_eq!(row.resolution.as_deref(), Some("repair"), "{row:?}");
    assert!(
        row.confirmed_at.is_some(),
        "repaired once confirmed: {row:?}"
    );
    assert_eq!(incidents_of(&env, &key).await.len(), 1);
    assert_eq!(
        cached_version(&env, &key).await,
        Some(item.version),
        "the cache carries the DB version"
    );
    let cached = env.cache.get(&key).await.unwrap().unwrap();
    let cached: Item = serde_json::from_slice(&cached).unwrap();
    assert_eq!(cached, item, "the key holds the row");
    assert!(metric(port, "stalewatch_repairs_total", &["outcome=\"written\""]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_repair_policy_a_confirmed_key_stays_stale() {
    let env = TestEnv::new().await.unwrap();
    let (_w, port) = worker(
        &env,
        &[("GRACE_PERIOD_MS", "1000"), ("SWEEP_INTERVAL_MS", "0")],
    );
    let item = stale_items(&env, 1).await.remove(0);
    let key = env.keys().item(&item.id);
    push_checks(&env, vec![check(env.keys(), vec![item.id])]).await;
    let row = eventually(Duration::from_secs(30), "the incident confirmed", || {
        let (env, key) = (&env, &key);
        async move {
            incidents_of(env, key)
                .await
                .into_iter()
                .find(|r| r.state != "detected")
        }
    })
    .await;
    assert_eq!(row.state, "confirmed", "{row:?}");
    // A repair would run in the confirming job itself, before it is counted.
    eventually(
        Duration::from_secs(30),
        "the confirm job finished",
        || async {
            let n = metric(
                port,
                "stalewatch_jobs_total",
                &["job=\"confirm\"", "outcome=\"ok\""],
            )
            .await;
            (n >= 1.0).then_some(())
        },
    )
    .await;
    drained::<ConfirmJob>(&env, Duration::from_secs(30)).await;
    assert_eq!(
        cached_version(&env, &key).await,
        Some(0),
        "the cache is left as it was"
    );
    let rows = incidents_of(&env, &key).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "confirmed");
    assert_eq!(rows[0].resolution, None);
    assert_eq!(
        metric(port, "stalewatch_repairs_total", &[]).await,
        0.0,
        "nothing rewritten"
    );
}
