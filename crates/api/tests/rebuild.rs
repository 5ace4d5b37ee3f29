//! `POST /entities/{name}/rebuild` and its progress, on the real API binary: admin token
//! required, the rebuild runs to the end and every key is back, and a rebuild running
//! elsewhere (the lock held) is refused with 409 naming its holder.

use std::time::Duration;

use serde_json::Value;
use stalewatch_core::db::items;
use stalewatch_testkit::{bin_path, eventually, free_port, Proc, TestEnv, ADMIN_TOKEN};

fn api(env: &TestEnv) -> (Proc, String) {
    let port = free_port();
    let mut vars = env.env_vars();
    vars.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    vars.push(("LOG_FORMAT".into(), "json".into()));
    vars.push(("REBUILD_BATCH".into(), "50".into()));
    (
        Proc::spawn(&bin_path("stalewatch-api"), &[], &vars),
        format!("http://127.0.0.1:{port}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_starts_a_rebuild_and_follows_it_to_the_end() {
    let env = TestEnv::new().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..300 {
        let item = items::create(
            &env.pool,
            &format!("item-{i}"),
            &serde_json::json!({ "i": i }),
        )
        .await
        .unwrap();
        ids.push(item.id);
    }
    let (_api, url) = api(&env);
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the API to answer", || {
        let req = client.get(format!("{url}/readyz")).send();
        async move {
            req.await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;
    let route = format!("{url}/entities/item/rebuild");

    let r = client.post(&route).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token: {}", r.text().await.unwrap());
    let r = client
        .post(format!("{url}/entities/nothing/rebuild"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Held elsewhere: refused, naming the holder.
    let lock = env.keys().rebuild_lock("item");
    let mut conn = env.cache.connection();
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("stalewatch-worker pid 1 on elsewhere #x")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = client
        .post(&route)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("pid 1 on elsewhere"), "{body}");
    let status: Value = client
        .get(&route)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "elsewhere", "{status}");
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();

    let r = client
        .post(&route)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    assert_eq!(started["state"], "running", "{started}");
    let done: Value = eventually(Duration::from_secs(30), "the rebuild to end", || {
        let req = client.get(&route).send();
        async move {
            let status: Value = req.await.ok()?.json().await.ok()?;
            (status["state"] != "running").then_some(status)
        }
    })
    .await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["summary"]["keys"], 300, "{done}");
    for id in &ids {
        let cached = env.cache.get(&env.keys().item(id)).await.unwrap();
        assert!(cached.is_some(), "item {id} not rebuilt");
    }
}
