//! The backup sweep, in-process against the real services.

mod common;

use std::time::Duration;

use common::*;
use stalewatch_core::{config::Config, lease::Lease};
use stalewatch_testkit::TestEnv;
use stalewatch_worker::{app, sweep::Sweeper};
use tokio_util::sync::CancellationToken;

async fn sweeper(env: &TestEnv, batch: usize) -> Sweeper {
    let config = Config {
        sweep_batch: batch,
        ..env.config()
    };
    let ctx = app::connect(&config).await.unwrap();
    app::sweeper(&ctx, &config)
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

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_resumes_from_its_saved_position() {
    let env = TestEnv::new().await.unwrap();
    let mut items = stale_items(&env, 40).await;
    items.sort_by_key(|i| i.id);
    // As if a worker had finished the first 25 items and then died.
    let mut conn = env.cache.connection();
    let position = serde_json::json!({
        "entity": "item",
        "phase": "rows",
        "cursor": [items[24].id.to_string()],
    });
    redis::cmd("SET")
        .arg(env.keys().sweep_cursor())
        .arg(position.to_string())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let s = sweeper(&env, 10).await;
    let summary = s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert!(summary.complete);
    assert_eq!(summary.items, 15, "only the items after the saved position");
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
    // A finished pass forgets its position, so the next one starts from the beginning.
    let cursor: Option<String> = redis::cmd("GET")
        .arg(env.keys().sweep_cursor())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cursor, None);
    let next = s
        .resume(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.items, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_sweep_starts_while_another_holds_the_lease() {
    let env = TestEnv::new().await.unwrap();
    stale_items(&env, 5).await;
    let s = sweeper(&env, 10).await;
    let conn = env.cache.connection();
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
