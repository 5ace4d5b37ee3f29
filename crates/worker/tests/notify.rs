//! Cache-side detection through keyspace notifications: a stale value written by another
//! Redis client is found without the sweep and without any write through stalewatch.

mod common;

use std::time::Duration;

use common::*;
use stalewatch_core::db::items;
use stalewatch_testkit::{eventually, free_port, redis_server, TestEnv};

/// Another client puts back an older copy of the item.
async fn write_stale(env: &TestEnv, item: &items::Item) {
    let mut stale = serde_json::to_value(item).unwrap();
    stale["version"] = 0.into();
    stale["name"] = "an older name".into();
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg(env.keys().item(&item.id))
        .arg(stale.to_string())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_write_by_another_client_is_detected_without_the_sweep() {
    let env = TestEnv::new().await.unwrap();
    let item = cached_item(&env, "watched", serde_json::json!({ "n": 1 })).await;
    // No sweep, and nothing goes through the API: only the notification can tell.
    let (w, port) = worker(&env, &[("SWEEP_INTERVAL_MS", "0")]);
    subscribed(&w, 1).await;
    write_stale(&env, &item).await;
    let key = env.keys().item(&item.id);
    let row = eventually(
        Duration::from_secs(10),
        "the stale write detected",
        || async { incidents_of(&env, &key).await.into_iter().next() },
    )
    .await;
    assert_eq!(row.kind, "stale");
    let by_notification = metric(
        port,
        "stalewatch_checks_total",
        &["source=\"notification\"", "verdict=\"stale\""],
    )
    .await;
    assert!(by_notification >= 1.0, "{by_notification}");
}

/// Pub/sub drops a subscriber without a trace; the worker counts the gap, subscribes again,
/// and the next stale write is seen.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_subscription_is_counted_and_renewed() {
    let port = free_port();
    let _redis = redis_server(port).await;
    let env = TestEnv::with_redis(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let (w, metrics_port) = worker(&env, &[("SWEEP_INTERVAL_MS", "0")]);
    subscribed(&w, 1).await;
    let mut admin = env.cache.connection();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async::<i64>(&mut admin)
        .await
        .unwrap();
    subscribed(&w, 2).await;
    let gaps = metric(metrics_port, "stalewatch_notify_gaps_total", &[]).await;
    assert!(gaps >= 1.0, "the gap is counted: {gaps}");

    let item = cached_item(&env, "watched", serde_json::json!({ "n": 1 })).await;
    write_stale(&env, &item).await;
    let key = env.keys().item(&item.id);
    eventually(
        Duration::from_secs(10),
        "the stale write detected",
        || async { incidents_of(&env, &key).await.into_iter().next() },
    )
    .await;
}
