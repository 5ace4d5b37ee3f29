//! The sharded sweep with real worker processes: three workers share a round, one is
//! SIGKILLed in the middle of a shard, and the survivors take its shard over and finish the
//! round with every row counted exactly once.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::RunQueryDsl;
use redis::aio::ConnectionManager;
use stalewatch_core::shards::{Part, Round};
use stalewatch_testkit::{eventually, wait_port, TestEnv};

const ROWS: i64 = 9000;
/// The killed-worker test's rows: enough that each shard is long next to the test's polling.
const KILL_ROWS: i64 = 36_000;

async fn read(conn: &mut ConnectionManager, key: &str) -> Option<Round> {
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    (!fields.is_empty()).then(|| Round::parse(&fields).unwrap())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows of the items table in the range (after, until], counted by PostgreSQL.
async fn rows_between(env: &TestEnv, after: Option<&str>, until: Option<&str>) -> i64 {
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(
        "SELECT count(*) AS n FROM items \
         WHERE ($1::uuid IS NULL OR id > $1::uuid) AND ($2::uuid IS NULL OR id <= $2::uuid)",
    )
    .bind::<Nullable<Text>, _>(after)
    .bind::<Nullable<Text>, _>(until)
    .get_result::<Count>(&mut conn)
    .await
    .unwrap()
    .n
}

/// `n` items with no cached copy: a miss is fine under cache_aside, so each comparison is
/// cheap and a round's length is its pages' count.
async fn insert_items(env: &TestEnv, n: i64) {
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(format!(
        "INSERT INTO items (id, name, value) \
         SELECT gen_random_uuid(), 'item-' || g, '{{}}'::jsonb FROM generate_series(1, {n}) g"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_worker_sweeps_as_many_shards_at_once_as_its_concurrency() {
    let env = TestEnv::new().await.unwrap();
    insert_items(&env, ROWS).await;
    let settings = [
        ("SWEEP_BATCH", "10"),
        ("SWEEP_SHARDS", "6"),
        ("SWEEP_CONCURRENCY", "2"),
        ("SWEEP_INTERVAL_MS", "600000"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
    ];
    let (w, _) = worker(&env, &settings);
    let conn = env.own.clone();
    let round_key = env.keys().sweep_round();
    // A shard this worker started and has not finished is one it is sweeping: alone, and
    // never losing a lease, it leaves none part-way. Two of them at one moment are two
    // walks under way together (with one shard at a time this never happens).
    // The deadline includes the worker's start-up, slow on a machine busy with other tests.
    let during = eventually(
        Duration::from_secs(60),
        "two shards part-way at once",
        || {
            let (mut conn, round_key) = (conn.clone(), &round_key);
            async move {
                let round = read(&mut conn, round_key).await?;
                let under_way = round
                    .progress
                    .iter()
                    .filter(|s| s.by.is_some() && !s.done && s.items > 0)
                    .count();
                (under_way >= 2).then_some(round)
            }
        },
    )
    .await;
    let last_key = env.keys().sweep_last_round();
    let last = eventually(Duration::from_secs(60), "the round to complete", || {
        let (mut conn, last_key) = (conn.clone(), &last_key);
        async move {
            read(&mut conn, last_key)
                .await
                .filter(|r| r.id == during.id)
        }
    })
    .await;
    let swept: u64 = last
        .progress
        .iter()
        .zip(&last.shards)
        .filter(|(_, shard)| matches!(shard.part, Part::Rows { .. }))
        .map(|(p, _)| p.items)
        .sum();
    assert_eq!(
        swept as i64,
        ROWS,
        "every row once: {last:?}\n{}",
        w.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_shard_is_taken_over_and_every_row_is_swept_once_in_the_round() {
    let env = TestEnv::new().await.unwrap();
    insert_items(&env, KILL_ROWS).await;
    // Small pages so the round lasts seconds; more shards than the three workers sweep at
    // once (two each), so some start part-way through the round; a short lease so the killed
    // worker's shard is free soon; a long rest so no second round replaces the record
    // asserted on.
    let settings = [
        ("SWEEP_BATCH", "10"),
        ("SWEEP_SHARDS", "12"),
        ("SWEEP_LEASE_MS", "1500"),
        ("SWEEP_INTERVAL_MS", "600000"),
        ("KEYSPACE_NOTIFICATIONS", "off"),
    ];
    // No round starts until all three are up (the deployment "rests" meanwhile), so all
    // three take part from the round's first pages however slowly each one starts.
    let mut conn = env.own.clone();
    redis::cmd("SET")
        .arg(env.keys().sweep_rest())
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let mut workers: Vec<_> = (0..3).map(|_| worker(&env, &settings)).collect();
    for (_, port) in &workers {
        wait_port(*port).await;
    }
    redis::cmd("DEL")
        .arg(env.keys().sweep_rest())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let pids: Vec<String> = workers
        .iter()
        .map(|(p, _)| format!("{}-", p.child.id()))
        .collect();
    let round_key = env.keys().sweep_round();

    // Wait until all three workers have recorded pages in the round, and one of them is
    // part-way through a row shard: that one is killed.
    let (round_id, victim, shard) = eventually(
        Duration::from_secs(30),
        "three workers sweeping one round",
        || {
            let (mut conn, round_key, pids) = (conn.clone(), &round_key, &pids);
            async move {
                let round = read(&mut conn, round_key).await?;
                let by_worker = |p: &str| {
                    round
                        .progress
                        .iter()
                        .any(|s| s.by.as_deref().is_some_and(|b| b.starts_with(p)))
                };
                if !pids.iter().all(|p| by_worker(p)) {
                    return None;
                }
                round.progress.iter().enumerate().find_map(|(i, s)| {
                    let rows = matches!(round.shards[i].part, Part::Rows { .. });
                    let by = s.by.as_deref()?;
                    let w = pids.iter().position(|p| by.starts_with(p))?;
                    // In the first third of a shard of about 3,000 rows: long
                    // enough to be seen between two polls of a busy test, and the
                    // kill lands well before its end.
                    (rows && !s.done && s.items > 0 && s.items < 1000).then_some((round.id, w, i))
                })
            }
        },
    )
    .await;
    workers[victim].0.kill9();
    let at_kill = read(&mut conn, &round_key)
        .await
        .expect("the round goes on");
    assert_eq!(at_kill.id, round_id);
    let killed = &at_kill.progress[shard];
    assert!(
        !killed.done && killed.by.as_deref().unwrap().starts_with(&pids[victim]),
        "the kill landed in the middle of shard {shard}: {killed:?}"
    );
    let total = rows_between(&env, None, None).await;
    assert!(
        (killed.items as i64) < total,
        "the killed worker had swept part of its shard"
    );

    // The survivors finish the round, the killed worker's shard included.
    let last_key = env.keys().sweep_last_round();
    let last = eventually(Duration::from_secs(60), "the round to complete", || {
        let (mut conn, last_key) = (conn.clone(), &last_key);
        async move { read(&mut conn, last_key).await.filter(|r| r.id == round_id) }
    })
    .await;
    assert_eq!(last.done(), last.shards.len(), "every shard done: {last:?}");
    assert!(last.ended_ms.is_some_and(|end| end >= last.started_ms));
    let finisher = last.progress[shard].by.as_deref().unwrap();
    assert!(
        !finisher.starts_with(&pids[victim]) && pids.iter().any(|p| finisher.starts_with(p)),
        "a survivor took shard {shard} over: {finisher}"
    );

    // Exactly once: each row shard counted exactly the rows in its range, which together
    // are the table.
    let mut sum = 0;
    for (i, s) in last.shards.iter().enumerate() {
        let Part::Rows { after, until } = &s.part else {
            continue;
        };
        let text = |v: &Option<Vec<String>>| v.as_ref().map(|v| v[0].clone());
        let expected = rows_between(&env, text(after).as_deref(), text(until).as_deref()).await;
        assert_eq!(
            last.progress[i].items as i64, expected,
            "shard {i} ({after:?}, {until:?}] counted each of its rows once"
        );
        sum += expected;
    }
    assert_eq!(sum, KILL_ROWS, "the shards cover the table");
    assert_eq!(last.rows() as i64, KILL_ROWS);

    // The survivors' metrics say the same: one round completed, KILL_ROWS rows in it.
    let ports: Vec<u16> = (0..3)
        .filter(|&w| w != victim)
        .map(|w| workers[w].1)
        .collect();
    eventually(Duration::from_secs(10), "round metrics", || {
        let ports = &ports;
        async move {
            let mut rounds = 0.0;
            for &port in ports {
                if metric(port, "stalewatch_sweep_last_round_items", &[]).await != KILL_ROWS as f64
                {
                    return None;
                }
                rounds += metric(port, "stalewatch_sweep_rounds_total", &[]).await;
            }
            (rounds == 1.0).then_some(())
        }
    })
    .await;
}
