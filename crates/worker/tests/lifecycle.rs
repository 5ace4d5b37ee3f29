//! The whole system through HTTP: the API and the worker as real processes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use stalewatch_testkit::{eventually, TestEnv};

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

async fn incident_for(client: &reqwest::Client, api: &str, key: &str) -> Vec<Value> {
    let body: Value = client
        .get(format!("{api}/inconsistencies"))
        .query(&[("key", key)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_divergence_is_detected_confirmed_persistent_then_resolved() {
    let env = TestEnv::new().await.unwrap();
    let grace_ms = 1500;
    let settings = [
        ("FAILURE_MODE", "delay"),
        ("FAILURE_DELAY_MS", "300"),
        ("GRACE_PERIOD_MS", "1500"),
        ("SWEEP_INTERVAL_MS", "300"),
        ("POST_WRITE_CHECK_MS", "500"),
    ];
    let (worker, worker_port) = worker(&env, &settings);
    let (api, url) = api(&env, &settings);
    wait_http(&format!("{url}/healthz")).await;
    wait_http(&format!("http://127.0.0.1:{worker_port}/healthz")).await;
    let client = reqwest::Client::new();

    let created: Value = client
        .post(format!("{url}/items"))
        .json(&json!({ "name": "lamp", "value": { "color": "red" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let key = env.keys().item(&id.parse().unwrap());

    // Cache-aside: a miss fills the cache, the next read hits it.
    env.cache.delete(&key).await.unwrap();
    let miss = client
        .get(format!("{url}/items/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(miss.headers()["x-cache"], "miss");
    let hit = client
        .get(format!("{url}/items/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(hit.headers()["x-cache"], "hit");
    assert_eq!(hit.json::<Value>().await.unwrap()["source"], "cache");

    let put = client
        .put(format!("{url}/items/{id}"))
        .json(&json!({ "value": { "color": "blue" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);

    // Watch the incident go through its states; remember each one seen, per incident. On a
    // busy machine a check can also land between the PUT's commit and its own cache write:
    // that write in flight is Detected, then closed as Transient by the next check that sees
    // the two agree. The stale overwrite 300 ms later is the incident that goes on.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, String)>::new()));
    let persistent = eventually(Duration::from_secs(30), "a persistent incident", || {
        let (client, url, key, seen) = (client.clone(), url.clone(), key.clone(), seen.clone());
        async move {
            let rows = incident_for(&client, &url, &key).await;
            let mut seen = seen.lock().unwrap();
            let mut found = None;
            for row in rows {
                let (id, state) = (row["id"].as_i64()?, row["state"].as_str()?.to_string());
                let last = seen.iter().rev().find(|(i, _)| *i == id).map(|(_, s)| s);
                if last != Some(&state) {
                    seen.push((id, state.clone()));
                }
                if state == "persistent" {
                    found = Some(row);
                }
            }
            found
        }
    })
    .await;
    let pid = persistent["id"].as_i64().unwrap();
    // Whatever the polling caught, it came in lifecycle order.
    let order = ["detected", "confirmed", "persistent"];
    let seen = seen.lock().unwrap().clone();
    let states: Vec<&str> = seen
        .iter()
        .filter(|(id, _)| *id == pid)
        .map(|(_, s)| s.as_str())
        .collect();
    let ranks: Vec<usize> = states
        .iter()
        .map(|s| {
            order
                .iter()
                .position(|o| o == s)
                .unwrap_or_else(|| panic!("only open states before refresh, seen: {seen:?}"))
        })
        .collect();
    assert!(
        ranks.windows(2).all(|w| w[0] < w[1]),
        "states seen: {seen:?}"
    );
    assert_eq!(
        states.first().copied(),
        Some("detected"),
        "detection is observable"
    );
    let rows = incident_for(&client, &url, &key).await;
    for row in rows.iter().filter(|r| r["id"] != pid) {
        assert_eq!(
            row["state"], "transient",
            "one open record for the key: {rows:?}"
        );
    }
    let records = rows.len();
    let first_seen =
        chrono::DateTime::parse_from_rfc3339(persistent["first_seen_at"].as_str().unwrap())
            .unwrap();
    let confirmed =
        chrono::DateTime::parse_from_rfc3339(persistent["confirmed_at"].as_str().unwrap()).unwrap();
    assert!(
        (confirmed - first_seen).num_milliseconds() >= grace_ms,
        "confirmed {confirmed} only {} ms after detection",
        (confirmed - first_seen).num_milliseconds()
    );
    assert_eq!(persistent["kind"], "stale");

    // More sweeps: observations grow, still one record, still persistent.
    let before = persistent["observations"].as_i64().unwrap();
    eventually(Duration::from_secs(15), "observations to grow", || {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        async move {
            let rows = incident_for(&client, &url, &key).await;
            let row = rows.iter().find(|r| r["id"] == pid)?;
            (rows.len() == records
                && row["state"] == "persistent"
                && row["observations"].as_i64()? > before + 1)
                .then_some(())
        }
    })
    .await;

    let active: Value = get_json(&client, format!("{url}/items/inconsistencies/active")).await;
    assert_eq!(active["count"], 1);

    let refreshed: Value = client
        .post(format!("{url}/items/{id}/refresh"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refreshed["incident"]["state"], "resolved");
    assert_eq!(refreshed["incident"]["resolution"], "refresh");
    let active: Value = get_json(&client, format!("{url}/items/inconsistencies/active")).await;
    assert_eq!(active["count"], 0, "{active}");
    // Transient closures are not incidents to this list: the write in flight is not in it.
    let all: Value = get_json(&client, format!("{url}/items/inconsistencies/all")).await;
    assert_eq!(all["count"], 1, "{all}");
    assert_eq!(all["data"][0]["id"], pid);
    assert_eq!(all["data"][0]["state"], "resolved");

    // Logs: one line per transition, none per poll. The worker made detected, confirmed and
    // persistent; the API the resolution. (A write in flight adds its detection only: its
    // transient close is not worth an info line.)
    let worker_lines: Vec<String> = worker
        .output()
        .lines()
        .filter(|l| l.contains(&key) && l.contains(&format!("\"incident\":{pid},")))
        .map(String::from)
        .collect();
    assert_eq!(
        worker_lines.len(),
        3,
        "worker log lines about the key: {worker_lines:#?}"
    );
    assert!(worker_lines
        .iter()
        .all(|l| l.contains("incident transition")));
    let api_transitions = api
        .output()
        .lines()
        .filter(|l| l.contains(&key) && l.contains("incident transition"))
        .count();
    assert_eq!(api_transitions, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_without_a_fault_never_confirm_an_incident() {
    let env = TestEnv::new().await.unwrap();
    let settings = [
        ("FAILURE_MODE", "off"),
        ("GRACE_PERIOD_MS", "1000"),
        ("SWEEP_INTERVAL_MS", "200"),
        ("POST_WRITE_CHECK_MS", "300"),
    ];
    let (_worker, worker_port) = worker(&env, &settings);
    let (_api, url) = api(&env, &settings);
    wait_http(&format!("{url}/healthz")).await;
    wait_http(&format!("http://127.0.0.1:{worker_port}/healthz")).await;
    let client = reqwest::Client::new();

    let mut ids = Vec::new();
    for i in 0..5 {
        let item: Value = client
            .post(format!("{url}/items"))
            .json(&json!({ "name": format!("busy-{i}"), "value": 0 }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(item["id"].as_str().unwrap().to_string());
    }
    // Concurrent writers on the same few items, while checks and sweeps compare them.
    let writers = (0..20).map(|w| {
        let (client, url, ids) = (client.clone(), url.clone(), ids.clone());
        tokio::spawn(async move {
            for n in 0..25 {
                let id = &ids[(w + n) % ids.len()];
                let r = client
                    .put(format!("{url}/items/{id}"))
                    .json(&json!({ "value": n }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    });
    for w in writers {
        w.await.unwrap();
    }
    // Every post-write check has run, and a confirmation for anything detected has had time.
    drained::<stalewatch_core::jobs::CheckJob>(&env, Duration::from_secs(30)).await;
    drained::<stalewatch_core::jobs::ConfirmJob>(&env, Duration::from_secs(30)).await;
    let checks = metric(
        worker_port,
        "stalewatch_checks_total",
        &["source=\"write_check\""],
    )
    .await;
    assert!(checks >= 5.0, "the writes were checked ({checks})");
    let rows = all_incidents(&env).await;
    let confirmed: Vec<_> = rows.iter().filter(|r| r.confirmed_at.is_some()).collect();
    assert!(
        confirmed.is_empty(),
        "confirmed without a fault: {confirmed:#?}"
    );
    assert!(rows
        .iter()
        .all(|r| r.state == "transient" || r.state == "detected"));
}
