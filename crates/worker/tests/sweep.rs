//! The backup sweep, in-process against the real services.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use stalewatch_core::{
    config::Config,
    lease::Lease,
    shards::{self, Round},
};
use stalewatch_testkit::{scaled, TestEnv};
use stalewatch_worker::{app, sweep::Sweeper};
use tokio_util::sync::CancellationToken;

async fn sweeper(env: &TestEnv, batch: usize) -> Sweeper {
    sweeper_for(&Config {
        sweep_batch: batch,
        ..env.config()
    })
    .await
}

async fn sweeper_for(config: &Config) -> Sweeper {
    let ctx = app::connect(config).await.unwrap();
    app::sweeper(&ctx, config)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_sweep_compares_every_item_and_opens_an_incident_per_stale_key() {
    let env = TestEnv::new().await.unwrap();
    let stale = stale_items(&env, 30).await;
    // Consistent items: rows whose cached copy is exactly what the API would write.
    for i in 0..220 {
        cached_item(&env, &format!("ok-{i}"), serde_json::json!(i)).await;
    }
    let summary = sweeper(&env, 100).await.once().await.unwrap();
    assert!(summary.complete);
    assert_eq!(summary.items, 250, "every item, across three batches");
    assert_eq!(summary.verdicts.get("stale"), Some(&30));
    assert_eq!(summary.verdicts.get("match"), Some(&220));
    let rows = all_incidents(&env).await;
    assert_eq!(rows.len(), stale.len());
    assert!(rows
        .iter()
        .all(|r| r.state == "detected" && r.kind == "stale"));
}

/// `sweep --once` walks the rows in SWEEP_CONCURRENCY ranges at once: pages that end on a
/// range's bound, and ranges of a page or less, still count every row exactly once. (Pages
/// are not tiny: the key-side pass SCANs the shared Redis, every test's keys, a page a time.)
#[tokio::test(flavor = "multi_thread")]
async fn a_full_sweep_in_several_ranges_at_once_counts_every_row_once() {
    let env = TestEnv::new().await.unwrap();
    let stale = stale_items(&env, 17).await;
    for i in 0..83 {
        cached_item(&env, &format!("ok-{i}"), serde_json::json!(i)).await;
    }
    for (concurrency, batch) in [(3, 20), (5, 7), (8, 50)] {
        let summary = sweeper_for(&Config {
            sweep_batch: batch,
            sweep_concurrency: concurrency,
            ..env.config()
        })
        .await
        .once()
        .await
        .unwrap();
        let case = format!("{concurrency} ranges, pages of {batch}: {summary:?}");
        assert!(summary.complete, "{case}");
        assert_eq!(summary.items, 100, "{case}");
        assert_eq!(summary.verdicts.get("stale"), Some(&17), "{case}");
        assert_eq!(summary.verdicts.get("match"), Some(&83), "{case}");
    }
    // The first pass opened one incident per stale key; the others observed them again.
    let rows = all_incidents(&env).await;
    assert_eq!(rows.len(), stale.len());
    assert!(rows.iter().all(|r| r.observations == 3), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_resumes_a_shard_from_its_recorded_position() {
    let env = TestEnv::new().await.unwrap();
    let mut items = stale_items(&env, 40).await;
    items.sort_by_key(|i| i.id);
    // As if a worker had recorded the first 25 items of a one-range round and then died
    // (its shard lease expired).
    let mut conn = env.own.clone();
    let plan = shards::entity_shards("item", vec![]);
    let mut fields = Round::fields(1, chrono::Utc::now().timestamp_millis(), &plan);
    fields.extend([
        (
            shards::at_field(0),
            serde_json::json!({ "cursor": [items[24].id.to_string()] }).to_string(),
        ),
        (shards::items_field(0), "25".to_string()),
        (shards::by_field(0), "a-dead-worker".to_string()),
    ]);
    redis::cmd("HSET")
        .arg(env.keys().sweep_round())
        .arg(fields)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let s = sweeper(&env, 10).await;
    let summary = s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert!(summary.complete, "this worker completed the round");
    assert_eq!(
        summary.items, 15,
        "only the items after the recorded position"
    );
    let swept: Vec<String> = all_incidents(&env)
        .await
        .into_iter()
        .map(|r| r.cache_key)
        .collect();
    for (n, item) in items.iter().enumerate() {
        assert_eq!(
            swept.contains(&env.keys().item(&item.id)),
            n >= 25,
            "item {n}"
        );
    }
    // The round's count is both workers' together, each row once.
    let last: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.keys().sweep_last_round())
        .query_async(&mut conn)
        .await
        .unwrap();
    let last = Round::parse(&last).unwrap();
    assert_eq!((last.id, last.rows()), (1, 40));
    // A completed round is no longer in progress, so the next one starts from the beginning.
    let current: bool = redis::cmd("EXISTS")
        .arg(env.keys().sweep_round())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!current);
    let next = s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.items, 40);
    assert!(next.complete);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_held_by_another_worker_is_left_alone_and_the_round_waits_for_it() {
    let env = TestEnv::new().await.unwrap();
    stale_items(&env, 30).await;
    let config = Config {
        sweep_batch: 10,
        sweep_shards: 3,
        ..env.config()
    };
    let ctx = app::connect(&config).await.unwrap();
    let first = app::sweeper(&ctx, &config);
    // Another worker holds the first range's shard (as if it were sweeping it).
    let mut conn = env.own.clone();
    let planned = {
        // Start the round with a sweeper that stops at once.
        let stopped = CancellationToken::new();
        stopped.cancel();
        first.resume(Duration::ZERO, &stopped).await.unwrap();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(env.keys().sweep_round())
            .query_async(&mut conn)
            .await
            .unwrap();
        Round::parse(&fields).unwrap()
    };
    assert_eq!(
        planned.shards.len(),
        4,
        "three ranges and the keys: {planned:?}"
    );
    // Held for as long as the test may take on a busy machine: a lease that ran out under it
    // would hand the shard to `first` and fail the test for the wrong reason.
    let held = Lease::try_acquire(
        &conn,
        &env.keys().sweep_shard_lease(planned.id, 0),
        scaled(Duration::from_secs(60)),
    )
    .await
    .unwrap()
    .expect("the shard is free");
    let summary = first
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert!(!summary.complete, "the held shard is not done");
    assert_eq!(summary.shards, 3);
    assert!(summary.items > 0 && summary.items < 30, "{summary:?}");
    assert!(
        first
            .resume(Duration::ZERO, &CancellationToken::new())
            .await
            .unwrap()
            .is_none(),
        "nothing left to take"
    );
    held.release().await.unwrap();
    let rest = first
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert!(rest.complete);
    assert_eq!(
        summary.items + rest.items,
        30,
        "each item once in the round"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_sweep_starts_while_another_holds_the_lease() {
    let env = TestEnv::new().await.unwrap();
    stale_items(&env, 5).await;
    let s = sweeper(&env, 10).await;
    let conn = env.own.clone();
    let held = Lease::try_acquire(&conn, &env.keys().sweep_lease(), Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lease is free");
    assert!(s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .is_none());
    assert!(all_incidents(&env).await.is_empty(), "nothing was swept");
    assert!(held.release().await.unwrap());
    let summary = s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .expect("lease free again");
    assert_eq!(summary.items, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_round_record_is_replaced_by_a_new_round() {
    let env = TestEnv::new().await.unwrap();
    stale_items(&env, 5).await;
    let mut conn = env.own.clone();
    redis::cmd("HSET")
        .arg(env.keys().sweep_round())
        .arg("id")
        .arg("not a number")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let summary = sweeper(&env, 10)
        .await
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .expect("a new round");
    assert!(summary.complete);
    assert_eq!(summary.items, 5);
}
