//! Crashes, restarts and load against the real worker process and the real queue.
//!
//! These tests count observations and jobs exactly, so the workers run without keyspace
//! notifications: the stale values the tests write would each add a check of their own.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use stalewatch_core::{
    incident::Source,
    jobs::{CheckJob, ConfirmJob, Job},
    keys::Keys,
    queue,
};
use stalewatch_testkit::{eventually, free_port, TestEnv};
use uuid::Uuid;

fn check(keys: &Keys, ids: Vec<Uuid>) -> CheckJob {
    CheckJob::for_items(keys, &ids, Source::WriteCheck)
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_confirmations_survive_a_sigkilled_worker_and_run_once() {
    let env = TestEnv::new().await.unwrap();
    // A long grace period so the kill lands inside it; no sweep, so only the confirm jobs
    // can confirm.
    let settings = [
        ("GRACE_PERIOD_MS", "4000"),
        ("SWEEP_INTERVAL_MS", "0"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
    ];
    let (mut first, _) = worker(&env, &settings);
    let items = stale_items(&env, 50).await;
    let keys: Vec<String> = items.iter().map(|i| env.keys().item(&i.id)).collect();
    push_checks(
        &env,
        vec![check(env.keys(), items.iter().map(|i| i.id).collect())],
    )
    .await;

    eventually(Duration::from_secs(20), "50 detected incidents", || {
        let env = &env;
        async move {
            let rows = all_incidents(env).await;
            (rows.len() == 50 && rows.iter().all(|r| r.state == "detected")).then_some(())
        }
    })
    .await;
    let due = all_incidents(&env)
        .await
        .iter()
        .map(|r| r.confirm_due_at)
        .max()
        .unwrap();
    first.kill9();
    assert!(
        chrono::Utc::now() < due,
        "the kill landed inside the grace period"
    );

    let (mut second, _) = worker(&env, &settings);
    eventually(Duration::from_secs(30), "50 confirmed incidents", || {
        let env = &env;
        async move {
            let rows = all_incidents(env).await;
            (rows.len() == 50 && rows.iter().all(|r| r.state != "detected")).then_some(())
        }
    })
    .await;
    drained::<ConfirmJob>(&env, Duration::from_secs(10)).await;
    let rows = all_incidents(&env).await;
    let by_key: HashMap<&str, usize> = rows.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.cache_key.as_str()).or_default() += 1;
        m
    });
    for key in &keys {
        assert_eq!(by_key.get(key.as_str()), Some(&1), "one incident for {key}");
    }
    for r in &rows {
        assert_eq!(r.state, "confirmed", "confirmed once, not again: {r:?}");
        assert_eq!(r.observations, 2, "detection plus one confirmation: {r:?}");
        assert!(
            r.confirmed_at.unwrap() >= r.confirm_due_at,
            "never before the grace ends"
        );
    }

    // SIGTERM: in-flight work finishes and the process exits 0.
    let status = second.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_a_queue_without_duplicates_or_double_counting() {
    let env = TestEnv::new().await.unwrap();
    let settings = [
        ("GRACE_PERIOD_MS", "600000"),
        ("SWEEP_INTERVAL_MS", "0"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
    ];
    let (_a, port_a) = worker(&env, &settings);
    let (_b, port_b) = worker(&env, &settings);
    let stale = stale_items(&env, 300).await;
    // 90 jobs of 10 keys: every stale key appears in exactly three jobs, spread apart so the
    // two workers race on the same keys.
    let mut ids: Vec<Uuid> = Vec::new();
    for round in 0..3 {
        let mut r: Vec<Uuid> = stale.iter().map(|i| i.id).collect();
        r.rotate_left(round * 97);
        ids.extend(r);
    }
    let mut jobs: Vec<CheckJob> = ids
        .chunks(10)
        .map(|c| check(env.keys(), c.to_vec()))
        .collect();
    // Plus a few thousand checks of keys that exist nowhere (a match, nothing to record).
    jobs.extend((0..2000).map(|_| check(env.keys(), vec![Uuid::now_v7()])));
    let total = jobs.len() as f64;
    push_checks(&env, jobs).await;

    drained::<CheckJob>(&env, Duration::from_secs(120)).await;
    let done = eventually(
        Duration::from_secs(30),
        "every check job acknowledged",
        || async {
            let a = metric(
                port_a,
                "stalewatch_jobs_total",
                &["job=\"check\"", "outcome=\"ok\""],
            )
            .await;
            let b = metric(
                port_b,
                "stalewatch_jobs_total",
                &["job=\"check\"", "outcome=\"ok\""],
            )
            .await;
            (a + b >= total).then_some((a, b))
        },
    )
    .await;
    assert_eq!(done.0 + done.1, total, "each job ran exactly once");
    assert!(
        done.0 > 0.0 && done.1 > 0.0,
        "both workers took jobs: {done:?}"
    );

    let rows = all_incidents(&env).await;
    assert_eq!(
        rows.len(),
        stale.len(),
        "one incident per stale key, no duplicates"
    );
    for r in &rows {
        assert_eq!(r.state, "detected");
        assert_eq!(r.observations, 3, "three checks counted once each: {r:?}");
    }
    let opened = metric(
        port_a,
        "stalewatch_incident_transitions_total",
        &["from=\"none\""],
    )
    .await
        + metric(
            port_b,
            "stalewatch_incident_transitions_total",
            &["from=\"none\""],
        )
        .await;
    assert_eq!(
        opened,
        stale.len() as f64,
        "each incident opened by exactly one worker"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_of_20000_due_checks_drains_and_finished_jobs_are_deleted() {
    let env = TestEnv::new().await.unwrap();
    // Pushed while no worker runs: 20,000 jobs due at once, more than apalis-redis's own
    // fetch can promote in one go.
    let jobs: Vec<CheckJob> = (0..20_000)
        .map(|_| check(env.keys(), vec![Uuid::now_v7()]))
        .collect();
    push_checks(&env, jobs).await;
    let (_w, port) = worker(
        &env,
        &[
            ("SWEEP_INTERVAL_MS", "0"),
            ("KEYSPACE_NOTIFICATIONS", "off"),
        ],
    );
    drained::<CheckJob>(&env, Duration::from_secs(180)).await;
    eventually(Duration::from_secs(60), "20,000 jobs processed", || async {
        let ok = metric(
            port,
            "stalewatch_jobs_total",
            &["job=\"check\"", "outcome=\"ok\""],
        )
        .await;
        (ok >= 20_000.0).then_some(())
    })
    .await;
    // Finished jobs don't pile up in Redis.
    let conn = queue::connect(&env.redis_url).await.unwrap();
    let config = queue::config::<CheckJob>(env.keys(), 1);
    eventually(
        Duration::from_secs(30),
        "finished jobs to be deleted",
        || {
            let (mut conn, config) = (conn.clone(), config.clone());
            async move {
                let done: u64 = redis::cmd("SCARD")
                    .arg(config.done_jobs_set())
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let data: u64 = redis::cmd("HLEN")
                    .arg(config.job_data_hash())
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (done == 0 && data == 0).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_recovers_by_itself_when_redis_restarts() {
    // A Redis of this test's own, so restarting it disturbs nobody else.
    let port = free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut redis = stalewatch_testkit::redis_server(port).await;
    let private = TestEnv::with_redis(&redis_url).await.unwrap();
    let (_w, metrics_port) = worker(
        &private,
        &[
            ("SWEEP_INTERVAL_MS", "0"),
            ("KEYSPACE_NOTIFICATIONS", "off"),
            ("GRACE_PERIOD_MS", "600000"),
        ],
    );

    let first = stale_items(&private, 1).await;
    push_checks(&private, vec![check(private.keys(), vec![first[0].id])]).await;
    eventually(Duration::from_secs(20), "the first check", || async {
        (all_incidents(&private).await.len() == 1).then_some(())
    })
    .await;

    let restarts_before = metric(
        metrics_port,
        "stalewatch_worker_restarts_total",
        &["queue=\"check\""],
    )
    .await;
    redis.kill9();
    redis = stalewatch_testkit::redis_server(port).await;
    // The test's own connection notices the restart on its first command, then reconnects.
    eventually(
        Duration::from_secs(10),
        "the test's connection to reconnect",
        || async { private.cache.ping().await.ok() },
    )
    .await;

    let second = stale_items(&private, 1).await;
    push_checks(&private, vec![check(private.keys(), vec![second[0].id])]).await;
    eventually(
        Duration::from_secs(60),
        "a check after the restart",
        || async { (all_incidents(&private).await.len() == 2).then_some(()) },
    )
    .await;
    // The process lived, and it is the supervisor that brought the dead apalis worker back:
    // the second check could only run on a restarted one, and the restart is counted first.
    let restarts_after = metric(
        metrics_port,
        "stalewatch_worker_restarts_total",
        &["queue=\"check\""],
    )
    .await;
    assert!(
        restarts_after > restarts_before,
        "the supervisor restarted the check worker: {restarts_before} -> {restarts_after}"
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_in_flight_on_a_killed_worker_is_run_again_by_another() {
    use stalewatch_core::jobs::ConfirmTarget;
    let env = TestEnv::new().await.unwrap();
    // Neither the sweep nor the confirmation backstop: only the job under test may confirm.
    let settings = [
        ("GRACE_PERIOD_MS", "3000"),
        ("SWEEP_INTERVAL_MS", "0"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
        ("CONFIRM_BACKSTOP_MS", "3600000"),
    ];
    let item = stale_items(&env, 1).await.remove(0);
    let config = stalewatch_core::config::Config {
        grace_period: Duration::from_secs(3),
        ..env.config()
    };
    let mut conn = queue::connect(&env.redis_url).await.unwrap();
    let checker = env.checker(&config).await.unwrap();
    let detected = checker
        .check_items(&[item.id], Source::Sweep, None)
        .await
        .unwrap();
    let incident = detected.recorded[0].incident.clone().expect("detected");
    // The check scheduled its own confirmation; drop it, so the one below is the only one.
    let confirm_queue = queue::config::<ConfirmJob>(env.keys(), 1);
    redis::cmd("DEL")
        .arg(confirm_queue.scheduled_jobs_set())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // Due in 4 s but runnable now: the handler holds it in flight, waiting for the due time.
    let job = ConfirmJob {
        entity: stalewatch_core::keys::ITEM_ENTITY.into(),
        targets: vec![ConfirmTarget {
            incident_id: incident.id,
            key: env.keys().item(&item.id),
        }],
        due_at: chrono::Utc::now() + chrono::Duration::seconds(4),
    };
    let (mut first, _) = worker(&env, &settings);
    queue::push(&mut conn, env.keys(), vec![(job, None)])
        .await
        .unwrap();
    let config = queue::config::<ConfirmJob>(env.keys(), 1);
    eventually(
        Duration::from_secs(20),
        "the confirm job to be taken",
        || {
            let (mut conn, config) = (conn.clone(), config.clone());
            async move {
                let d = queue::depth(&mut conn, &config).await.ok()?;
                (d.pending == 0 && d.scheduled == 0).then_some(())
            }
        },
    )
    .await;
    first.kill9();
    let (_second, _) = worker(&env, &settings);
    let row = eventually(
        Duration::from_secs(60),
        "the orphaned job to run again",
        || {
            let env = &env;
            async move {
                let rows = all_incidents(env).await;
                rows.into_iter().find(|r| r.state == "confirmed")
            }
        },
    )
    .await;
    assert_eq!(row.id, incident.id);
    assert_eq!(row.observations, 2, "confirmed once");
}

/// Names registered in `queue`'s worker set, and the metadata hashes left under it.
async fn registrations(env: &TestEnv, queue: &str) -> (Vec<String>, Vec<String>) {
    let ns = env.keys().queue(queue);
    let mut conn = env.cache.connection();
    let names: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{ns}:workers"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let hashes: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:workers:metadata:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    (names, hashes)
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_that_stop_or_die_leave_no_registration_behind() {
    let env = TestEnv::new().await.unwrap();
    let settings = [
        ("SWEEP_INTERVAL_MS", "0"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
    ];
    let registered = |n: usize| {
        let env = &env;
        move || async move {
            let mut all = Vec::new();
            for queue in [CheckJob::QUEUE, ConfirmJob::QUEUE] {
                let (names, hashes) = registrations(env, queue).await;
                if names.len() != n || hashes.len() != n {
                    return None;
                }
                all.extend(names);
            }
            Some(all)
        }
    };

    // A clean stop removes what apalis-redis registered.
    let (mut first, _) = worker(&env, &settings);
    eventually(
        Duration::from_secs(30),
        "the workers registered",
        registered(1),
    )
    .await;
    let status = first.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    for queue in [CheckJob::QUEUE, ConfirmJob::QUEUE] {
        assert_eq!(
            registrations(&env, queue).await,
            (vec![], vec![]),
            "{queue} after a clean stop"
        );
    }

    // A killed worker cannot: its registration stays until upkeep finds it gone for an hour.
    let (mut killed, _) = worker(&env, &settings);
    let dead = eventually(
        Duration::from_secs(30),
        "the workers registered",
        registered(1),
    )
    .await;
    killed.kill9();
    let mut conn = env.cache.connection();
    for queue in [CheckJob::QUEUE, ConfirmJob::QUEUE] {
        let (names, _) = registrations(&env, queue).await;
        assert_eq!(
            names.len(),
            1,
            "{queue}: the killed worker's registration stays"
        );
        // An hour without a heartbeat, without waiting an hour: its last beat moved back.
        let _: () = redis::cmd("ZADD")
            .arg(format!("{}:workers", env.keys().queue(queue)))
            .arg("XX")
            .arg(0)
            .arg(&names[0])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (_survivor, _) = worker(&env, &settings);
    let alive = eventually(
        Duration::from_secs(30),
        "the dead worker forgotten, the live one registered",
        || {
            let (registered, dead) = (registered(1), &dead);
            async move {
                registered()
                    .await
                    .filter(|names| names.iter().all(|name| !dead.contains(name)))
            }
        },
    )
    .await;
    assert_eq!(alive.len(), 2, "one worker per queue: {alive:?}");
}
