//! The HTTP API in-process (actix test service) against the real PostgreSQL and Redis, each test
//! in its own database and key prefix (see stalewatch-testkit).
//!
//! No worker runs here: the post-write checks the API enqueues stay in their Redis queue, so
//! incidents only move when a test runs a check itself. That keeps every assertion about
//! incident state deterministic.

use std::{collections::BTreeSet, rc::Rc, time::Duration};

use actix_web::{
    http::{header, StatusCode},
    test::{self, TestRequest},
    web::Bytes,
    App,
};
use chrono::{DateTime, Utc};
use futures::future::{join_all, LocalBoxFuture};
use serde_json::{json, Value};
use stalewatch_api::{state::AppState, BODY_LIMIT};
use stalewatch_core::{
    config::{Config, FailureMode},
    incident::{Source, State},
};
use stalewatch_testkit::{eventually, TestEnv};
use uuid::Uuid;

/// The oversized bodies below are 1 MiB; they only test the limit while it is smaller.
const OVERSIZED: usize = 1 << 20;
const _: () = assert!(BODY_LIMIT < OVERSIZED);

// ---- harness ------------------------------------------------------------------------------

/// One response, read to the end.
struct Reply {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} response is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn expect(&self, status: StatusCode, what: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{what}: body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }
}

/// The app under test. The actix test service has an unnameable request type, so it hides
/// behind a closure; `Rc` lets many calls run concurrently on the test's single thread.
struct Api {
    state: AppState,
    call: Box<dyn Fn(TestRequest) -> LocalBoxFuture<'static, Reply>>,
}

impl Api {
    async fn start(config: Config) -> Api {
        let state = AppState::connect(config).await.expect("AppState::connect");
        let app = Rc::new(
            test::init_service(App::new().configure(stalewatch_api::configure(state.clone())))
                .await,
        );
        let call = Box::new(move |req: TestRequest| -> LocalBoxFuture<'static, Reply> {
            let app = Rc::clone(&app);
            Box::pin(async move {
                let resp = test::call_service(&*app, req.to_request()).await;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = test::read_body(resp).await;
                // Client input must never reach a 500, whatever the test expects otherwise.
                assert_ne!(
                    status,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500: {:?}",
                    String::from_utf8_lossy(&body)
                );
                Reply {
                    status,
                    headers,
                    body,
                }
            })
        });
        Api { state, call }
    }

    fn send(&self, req: TestRequest) -> LocalBoxFuture<'static, Reply> {
        (self.call)(req)
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(TestRequest::get().uri(uri)).await
    }

    async fn post(&self, uri: &str) -> Reply {
        self.send(TestRequest::post().uri(uri)).await
    }

    async fn delete(&self, uri: &str) -> Reply {
        self.send(TestRequest::delete().uri(uri)).await
    }

    async fn post_json(&self, uri: &str, body: &Value) -> Reply {
        self.send(TestRequest::post().uri(uri).set_json(body)).await
    }

    async fn put_json(&self, uri: &str, body: &Value) -> Reply {
        self.send(TestRequest::put().uri(uri).set_json(body)).await
    }

    /// Creates an item and returns its JSON.
    async fn create(&self, name: &str, value: Value) -> Value {
        self.post_json("/items", &json!({ "name": name, "value": value }))
            .await
            .expect(StatusCode::CREATED, "POST /items")
    }
}

/// A request with a raw body sent as JSON, for bodies `set_json` cannot make (malformed, huge).
fn raw_json(req: TestRequest, body: impl Into<Bytes>) -> TestRequest {
    req.insert_header(header::ContentType::json())
        .set_payload(body)
}

fn id_of(item: &Value) -> Uuid {
    item["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no UUID id in {item}"))
}

/// Asserts the documented error shape `{"error":{"code","message"}}` and the status.
async fn expect_error(api: &Api, what: &str, req: TestRequest, status: StatusCode, code: &str) {
    let reply = api.send(req).await;
    let body = reply.expect(status, what);
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: no message in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "{what}: only `error` at the top level: {body}"
    );
}

/// Reads the cached document under `key` straight from Redis.
async fn cached(env: &TestEnv, key: &str) -> Option<Value> {
    let bytes = env.cache.get(key).await.expect("redis GET")?;
    Some(serde_json::from_slice(&bytes).expect("cached value is JSON"))
}

async fn cached_version(env: &TestEnv, key: &str) -> Option<i64> {
    cached(env, key).await.and_then(|v| v["version"].as_i64())
}

/// The incidents recorded for `key`, newest first, as the API lists them.
async fn incidents_for(api: &Api, key: &str) -> Vec<Value> {
    let body = api
        .get(&format!("/inconsistencies?key={key}"))
        .await
        .expect(StatusCode::OK, "GET /inconsistencies?key=");
    body["data"].as_array().expect("data is a list").clone()
}

fn listed(body: &Value, incident: i64) -> bool {
    body["data"]
        .as_array()
        .expect("data is a list")
        .iter()
        .any(|i| i["id"] == incident)
}

/// A config with no grace period, so two mismatching checks in a row confirm an incident.
fn no_grace(env: &TestEnv) -> Config {
    Config {
        grace_period: Duration::ZERO,
        ..env.config()
    }
}

/// Creates an item whose cached copy is stale and drives its incident to Confirmed with two
/// sweep checks. Returns the item id, its cache key and the incident id.
async fn confirmed_incident(env: &TestEnv, api: &Api) -> (Uuid, String, i64) {
    let item = api.create("fresh", json!({ "n": 1 })).await;
    let id = id_of(&item);
    let key = env.keys().item(&id);
    // The same document an older writer would have cached: lower version, other content.
    let mut stale = item.clone();
    stale["version"] = json!(0);
    stale["name"] = json!("stale");
    env.cache
        .set(
            &key,
            &serde_json::to_vec(&stale).unwrap(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();

    let mut states = Vec::new();
    let mut incident = None;
    for _ in 0..2 {
        let outcome = api
            .state
            .checker
            .check_ids(&[id], Source::Sweep, None)
            .await
            .expect("check");
        let row = outcome.recorded[0]
            .incident
            .clone()
            .expect("a mismatch stores the incident");
        states.push(row.state.clone());
        incident = Some(row.id);
    }
    assert_eq!(states, ["detected", "confirmed"]);
    let incident = incident.unwrap();

    let rows = incidents_for(api, &key).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], incident);
    assert_eq!(rows[0]["state"], "confirmed");
    assert_eq!(rows[0]["kind"], "stale");
    (id, key, incident)
}

// ---- tests --------------------------------------------------------------------------------

#[actix_web::test]
async fn bad_input_gets_json_errors_and_the_server_keeps_serving() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let existing = id_of(&api.create("existing", json!(1)).await);
    let item_uri = format!("/items/{existing}");

    use StatusCode as S;
    let (bad, invalid) = ("bad_request", "invalid");

    // Bodies, on both routes that take one.
    for (what, uri, make) in [
        (
            "POST /items",
            "/items".to_string(),
            TestRequest::post as fn() -> TestRequest,
        ),
        ("PUT /items/{id}", item_uri.clone(), TestRequest::put),
    ] {
        let req = || make().uri(&uri);
        let cases: [(&str, TestRequest, S, &str); 6] = [
            (
                "malformed JSON",
                raw_json(req(), r#"{"name": "x", "#),
                S::BAD_REQUEST,
                bad,
            ),
            (
                "wrong types",
                req().set_json(json!({ "name": 5, "value": 1 })),
                S::UNPROCESSABLE_ENTITY,
                invalid,
            ),
            (
                "unknown field",
                req().set_json(json!({ "name": "x", "value": 1, "colour": "red" })),
                S::UNPROCESSABLE_ENTITY,
                invalid,
            ),
            (
                "empty name",
                req().set_json(json!({ "name": "  ", "value": 1 })),
                S::UNPROCESSABLE_ENTITY,
                invalid,
            ),
            (
                "no Content-Type",
                req().set_payload(r#"{"name":"x","value":1}"#),
                S::BAD_REQUEST,
                bad,
            ),
            (
                // 1 MiB of valid JSON: only its size is wrong.
                "body over BODY_LIMIT",
                raw_json(
                    req(),
                    serde_json::to_vec(&json!({ "name": "x", "value": "a".repeat(OVERSIZED) }))
                        .unwrap(),
                ),
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            ),
        ];
        for (case, req, status, code) in cases {
            expect_error(&api, &format!("{what}: {case}"), req, status, code).await;
        }
    }
    expect_error(
        &api,
        "POST /items: missing field",
        TestRequest::post()
            .uri("/items")
            .set_json(json!({ "name": "x" })),
        S::UNPROCESSABLE_ENTITY,
        invalid,
    )
    .await;
    expect_error(
        &api,
        "PUT /items/{id}: neither name nor value",
        TestRequest::put().uri(&item_uri).set_json(json!({})),
        S::UNPROCESSABLE_ENTITY,
        invalid,
    )
    .await;

    // Ids: every route with one, a non-UUID (400) and an unknown UUID (404). The PUT body is
    // valid so only the id can be wrong.
    let unknown = Uuid::now_v7().to_string();
    for (id, status, code) in [
        ("not-a-uuid", S::BAD_REQUEST, bad),
        (unknown.as_str(), S::NOT_FOUND, "not_found"),
    ] {
        let routes = [
            (
                "GET /items/{id}",
                TestRequest::get().uri(&format!("/items/{id}")),
            ),
            (
                "PUT /items/{id}",
                TestRequest::put()
                    .uri(&format!("/items/{id}"))
                    .set_json(json!({ "name": "y" })),
            ),
            (
                "DELETE /items/{id}",
                TestRequest::delete().uri(&format!("/items/{id}")),
            ),
            (
                "POST /items/{id}/refresh",
                TestRequest::post().uri(&format!("/items/{id}/refresh")),
            ),
            (
                "POST /items/debug/refresh/{id}",
                TestRequest::post().uri(&format!("/items/debug/refresh/{id}")),
            ),
        ];
        for (what, req) in routes {
            expect_error(&api, &format!("{what} with id {id}"), req, status, code).await;
        }
    }

    // Incidents and unknown routes.
    for (uri, status, code) in [
        ("/inconsistencies?limit=0", S::BAD_REQUEST, bad),
        ("/inconsistencies?limit=501", S::BAD_REQUEST, bad),
        ("/inconsistencies?limit=abc", S::BAD_REQUEST, bad),
        ("/inconsistencies?state=bogus", S::BAD_REQUEST, bad),
        ("/inconsistencies?colour=red", S::BAD_REQUEST, bad),
        ("/inconsistencies/abc", S::BAD_REQUEST, bad),
        ("/inconsistencies/999999", S::NOT_FOUND, "not_found"),
        ("/no/such/route", S::NOT_FOUND, "not_found"),
    ] {
        expect_error(
            &api,
            &format!("GET {uri}"),
            TestRequest::get().uri(uri),
            status,
            code,
        )
        .await;
    }
    expect_error(
        &api,
        "PATCH /items/{id}: no such method on the route",
        TestRequest::patch()
            .uri(&item_uri)
            .set_json(json!({ "name": "z" })),
        S::NOT_FOUND,
        "not_found",
    )
    .await;

    // None of that hurt: the item is untouched and a normal create + get still works.
    let body = api.get(&item_uri).await.expect(S::OK, "GET existing");
    assert_eq!(body["data"]["version"], 1);
    assert_eq!(body["data"]["name"], "existing");
    let created = api.create("after the storm", json!({ "ok": true })).await;
    let body = api
        .get(&format!("/items/{}", id_of(&created)))
        .await
        .expect(S::OK, "GET new item");
    assert_eq!(body["data"], created);
}

#[actix_web::test]
async fn create_returns_201_with_a_v7_id_and_version_1() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let value = json!({ "colour": "red", "sizes": [1, 2, 3], "nested": { "ok": true } });
    let before = Utc::now();
    let item = api.create("widget", value.clone()).await;

    let id = id_of(&item);
    assert_eq!(id.get_version_num(), 7, "ids are UUID v7: {id}");
    assert_eq!(item["name"], "widget");
    assert_eq!(item["value"], value);
    assert_eq!(item["version"], 1);
    let time = |field: &str| -> DateTime<Utc> {
        serde_json::from_value(item[field].clone())
            .unwrap_or_else(|e| panic!("{field} is not a timestamp ({e}): {item}"))
    };
    let (created, updated) = (time("created_at"), time("updated_at"));
    assert_eq!(created, updated, "a new item was never updated");
    // PostgreSQL keeps microseconds; allow for the truncation and for clock reading order.
    assert!(
        created >= before - chrono::Duration::seconds(1),
        "{created} vs {before}"
    );
    assert!(created <= Utc::now() + chrono::Duration::seconds(1));
    assert_eq!(
        item.as_object().unwrap().len(),
        6,
        "exactly id, name, value, version, created_at, updated_at: {item}"
    );
}

#[actix_web::test]
async fn cache_aside_read_misses_once_then_hits_and_fills_redis_with_a_ttl() {
    let env = TestEnv::new().await.unwrap();
    let config = env.config();
    let ttl = config.cache_ttl.as_secs() as i64;
    let api = Api::start(config).await;
    let item = api.create("cached", json!([1, 2])).await;
    let id = id_of(&item);
    let key = env.keys().item(&id);
    // The create wrote the cache; start from an empty key to see the fill.
    env.cache.delete(&key).await.unwrap();

    let uri = format!("/items/{id}");
    let first = api.get(&uri).await;
    let body = first.expect(StatusCode::OK, "first GET");
    assert_eq!(first.header("X-Cache"), Some("miss"));
    assert_eq!(body, json!({ "source": "db", "data": item }));

    let second = api.get(&uri).await;
    let body = second.expect(StatusCode::OK, "second GET");
    assert_eq!(second.header("X-Cache"), Some("hit"));
    assert_eq!(body, json!({ "source": "cache", "data": item }));

    assert_eq!(cached(&env, &key).await, Some(item));
    let remaining: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut env.cache.connection())
        .await
        .unwrap();
    assert!(
        (1..=ttl).contains(&remaining),
        "TTL of the filled key is {remaining}, configured {ttl}"
    );
}

#[actix_web::test]
async fn concurrent_puts_raise_the_version_by_exactly_n() {
    const N: i64 = 50;
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let id = id_of(&api.create("counter", json!(0)).await);
    let uri = format!("/items/{id}");

    // All N requests are in flight at once on the one service; the row lock must queue them.
    let puts =
        (0..N).map(|i| api.send(TestRequest::put().uri(&uri).set_json(json!({ "value": i }))));
    let replies = join_all(puts).await;
    let versions: BTreeSet<i64> = replies
        .iter()
        .map(|r| {
            r.expect(StatusCode::OK, "concurrent PUT")["version"]
                .as_i64()
                .unwrap()
        })
        .collect();
    // Each write saw its own version: none lost, none doubled.
    assert_eq!(versions, (2..=N + 1).collect::<BTreeSet<_>>());

    env.cache.delete(&env.keys().item(&id)).await.unwrap();
    let reply = api.get(&uri).await;
    let body = reply.expect(StatusCode::OK, "GET after the PUTs");
    assert_eq!(
        reply.header("X-Cache"),
        Some("miss"),
        "read from PostgreSQL"
    );
    assert_eq!(body["data"]["version"], N + 1);
}

#[actix_web::test]
async fn delete_removes_the_row_and_the_redis_key() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let id = id_of(&api.create("doomed", json!(null)).await);
    let key = env.keys().item(&id);
    assert!(cached(&env, &key).await.is_some(), "create cached the item");

    let uri = format!("/items/{id}");
    let body = api.delete(&uri).await.expect(StatusCode::OK, "DELETE");
    assert_eq!(body, json!({ "deleted": true, "id": id }));

    assert_eq!(cached(&env, &key).await, None, "the key is gone");
    expect_error(
        &api,
        "GET after DELETE",
        TestRequest::get().uri(&uri),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert!(
        stalewatch_core::db::items::get(&env.pool, id)
            .await
            .unwrap()
            .is_none(),
        "the row is gone"
    );
    // The 404 read must not have cached anything either.
    assert_eq!(cached(&env, &key).await, None);
}

#[actix_web::test]
async fn failure_mode_delay_puts_the_old_value_back() {
    let env = TestEnv::new().await.unwrap();
    let delay = Duration::from_millis(300);
    let api = Api::start(Config {
        failure_mode: FailureMode::Delay,
        failure_delay: delay,
        ..env.config()
    })
    .await;
    let id = id_of(&api.create("v1", json!(1)).await);
    let key = env.keys().item(&id);

    let body = api
        .put_json(&format!("/items/{id}"), &json!({ "name": "v2" }))
        .await
        .expect(StatusCode::OK, "PUT");
    assert_eq!(body["version"], 2);

    // The injected slow writer lands after the delay with what it read before the update.
    let (env_ref, key_ref) = (&env, &key);
    let reverted = eventually(
        delay * 20,
        "the cache to revert to version 1",
        || async move { cached(env_ref, key_ref).await.filter(|v| v["version"] == 1) },
    )
    .await;
    assert_eq!(reverted["name"], "v1");
    // PostgreSQL still has the update: a real divergence for the tracker to find.
    let row = stalewatch_core::db::items::get(&env.pool, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.version, row.name.as_str()), (2, "v2"));
}

#[actix_web::test]
async fn refresh_cancels_a_pending_delayed_overwrite() {
    let env = TestEnv::new().await.unwrap();
    // Longer than the other delay test: the refresh must land inside the window even on a
    // slow, busy machine, or the test would not be exercising cancellation at all.
    let delay = Duration::from_millis(1000);
    let api = Api::start(Config {
        failure_mode: FailureMode::Delay,
        failure_delay: delay,
        ..env.config()
    })
    .await;
    let id = id_of(&api.create("v1", json!(1)).await);
    let key = env.keys().item(&id);

    let started = std::time::Instant::now();
    api.put_json(&format!("/items/{id}"), &json!({ "name": "v2" }))
        .await
        .expect(StatusCode::OK, "PUT");
    let body = api
        .post(&format!("/items/{id}/refresh"))
        .await
        .expect(StatusCode::OK, "refresh");
    assert!(
        started.elapsed() < delay,
        "refresh came {:?} after the PUT, not inside the {delay:?} window; test inconclusive",
        started.elapsed()
    );
    assert_eq!(body["refreshed"], true);
    assert_eq!(body["data"]["version"], 2);

    // Here the bounded wait is the assertion: for three times the delay the overwrite that
    // was cancelled must never land.
    let deadline = tokio::time::Instant::now() + delay * 3;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            cached_version(&env, &key).await,
            Some(2),
            "the cancelled overwrite reverted the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cached(&env, &key).await.unwrap()["name"], "v2");
}

#[actix_web::test]
async fn refresh_resolves_a_confirmed_incident_with_cause_refresh() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(no_grace(&env)).await;
    let (id, key, incident) = confirmed_incident(&env, &api).await;

    let active = api
        .get("/items/inconsistencies/active")
        .await
        .expect(StatusCode::OK, "active before");
    assert!(listed(&active, incident), "confirmed is active: {active}");

    let body = api
        .post(&format!("/items/{id}/refresh"))
        .await
        .expect(StatusCode::OK, "refresh");
    assert_eq!(body["incident"]["id"], incident);
    assert_eq!(body["incident"]["state"], "resolved");
    assert_eq!(body["incident"]["resolution"], "refresh");
    assert_eq!(cached_version(&env, &key).await, Some(1), "cache rewritten");

    let one = api
        .get(&format!("/inconsistencies/{incident}"))
        .await
        .expect(StatusCode::OK, "GET incident");
    assert_eq!(one["state"], "resolved");
    assert_eq!(one["resolution"], "refresh");
    assert!(one["resolved_at"].is_string(), "{one}");
    let resolved = incidents_for(&api, &key).await;
    assert_eq!(resolved.len(), 1, "no new incident: {resolved:?}");
    assert_eq!(resolved[0]["state"], "resolved");

    let active = api
        .get("/items/inconsistencies/active")
        .await
        .expect(StatusCode::OK, "active after");
    assert!(
        !listed(&active, incident),
        "resolved is not active: {active}"
    );
    let all = api
        .get("/items/inconsistencies/all")
        .await
        .expect(StatusCode::OK, "all after");
    assert!(listed(&all, incident), "resolved stays in all: {all}");
}

#[actix_web::test]
async fn health_readiness_metrics_and_stats_answer() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    // Make one cache request so the counter has a series to show.
    let id = id_of(&api.create("metered", json!(1)).await);
    api.get(&format!("/items/{id}"))
        .await
        .expect(StatusCode::OK, "GET");

    let health = api.get("/healthz").await.expect(StatusCode::OK, "healthz");
    assert_eq!(health["status"], "ok");

    let ready = api.get("/readyz").await.expect(StatusCode::OK, "readyz");
    assert_eq!(ready, json!({ "postgres": "ok", "redis": "ok" }));

    let metrics = api.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        metrics.header("content-type")
    );
    let text = String::from_utf8(metrics.body.to_vec()).expect("metrics are UTF-8");
    assert!(
        text.contains("# TYPE stalewatch_cache_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains("stalewatch_cache_requests_total{result=\"hit\"} 1"),
        "{text}"
    );

    let stats = api.get("/stats").await.expect(StatusCode::OK, "stats");
    let stats = stats.as_object().expect("stats is a JSON object");
    assert!(
        stats.contains_key("stalewatch_cache_requests_total"),
        "{stats:?}"
    );
}

#[actix_web::test]
async fn an_expired_key_resolves_its_incident_under_cache_aside() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(no_grace(&env)).await;
    let (id, key, incident) = confirmed_incident(&env, &api).await;

    // The key expiring is what a TTL does; under cache-aside a missing key matches.
    env.cache.delete(&key).await.unwrap();
    let outcome = api
        .state
        .checker
        .check_ids(&[id], Source::Sweep, None)
        .await
        .unwrap();
    let recorded = &outcome.recorded[0];
    assert_eq!(recorded.transition.map(|t| t.to), Some(State::Resolved));
    let row = recorded
        .incident
        .as_ref()
        .expect("the resolution is stored");
    assert_eq!(row.id, incident);
    assert_eq!(row.state, "resolved");

    let one = api
        .get(&format!("/inconsistencies/{incident}"))
        .await
        .expect(StatusCode::OK, "GET incident");
    assert_eq!(one["state"], "resolved");
    // A sweep knows of no fix: the key simply went away.
    assert_eq!(one["resolution"], "natural");
    let active = api
        .get("/items/inconsistencies/active")
        .await
        .expect(StatusCode::OK, "active");
    assert!(!listed(&active, incident), "{active}");
}

// ---- outages --------------------------------------------------------------------------------

#[actix_web::test]
async fn put_with_value_null_sets_json_null() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let item = api.create("nullable", json!({ "a": 1 })).await;
    let id = item["id"].as_str().unwrap();
    let updated = api
        .put_json(&format!("/items/{id}"), &json!({ "value": null }))
        .await
        .expect(StatusCode::OK, "PUT value null");
    assert_eq!(updated["value"], Value::Null);
    assert_eq!(updated["version"], 2);
}

#[actix_web::test]
async fn with_redis_down_reads_fall_back_and_writes_still_commit() {
    // A Redis of this test's own, so stopping it disturbs nobody.
    let port = stalewatch_testkit::free_port();
    let mut redis = stalewatch_testkit::redis_server(port).await;
    let env = TestEnv::with_redis(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let api = Api::start(env.config()).await;
    let item = api.create("survivor", json!(1)).await;
    let id = item["id"].as_str().unwrap().to_string();

    redis.kill9();
    let read = api.get(&format!("/items/{id}")).await;
    let body = read.expect(StatusCode::OK, "GET with Redis down");
    assert_eq!(read.header("x-cache"), Some("bypass"));
    assert_eq!(body["source"], "db");
    let put = api
        .put_json(&format!("/items/{id}"), &json!({ "value": 2 }))
        .await
        .expect(StatusCode::OK, "PUT with Redis down");
    assert_eq!(put["version"], 2);
    let row = stalewatch_core::db::items::get(&env.pool, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.version, row.value),
        (2, json!(2)),
        "the write committed"
    );
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["postgres"], "ok");
    let metrics = String::from_utf8_lossy(&api.get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("stalewatch_cache_requests_total{result=\"error\"}"),
        "cache errors are counted"
    );
}

#[actix_web::test]
async fn with_postgres_down_the_api_answers_503_in_json() {
    let env = TestEnv::new().await.unwrap();
    let closed = stalewatch_testkit::free_port();
    let config = Config {
        database_url: format!("postgres://postgres@127.0.0.1:{closed}/nowhere"),
        ..env.config()
    };
    let api = Api::start(config).await;
    let created = api
        .post_json("/items", &json!({ "name": "x", "value": 1 }))
        .await;
    assert_eq!(created.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(created.json()["error"]["code"], "unavailable");
    let read = api.get(&format!("/items/{}", Uuid::now_v7())).await;
    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        api.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
}

#[actix_web::test]
async fn a_key_that_reappears_after_delete_is_an_orphan() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let item = api.create("gone", json!(1)).await;
    let id = id_of(&item);
    let key = env.keys().item(&id);
    api.delete(&format!("/items/{id}"))
        .await
        .expect(StatusCode::OK, "DELETE");
    // A slow writer puts the item back after the delete.
    env.cache
        .set(
            &key,
            &serde_json::to_vec(&item).unwrap(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let outcome = api
        .state
        .checker
        .check_ids(&[id], Source::WriteCheck, None)
        .await
        .unwrap();
    let row = outcome.recorded[0]
        .incident
        .clone()
        .expect("an incident opens");
    assert_eq!(
        (row.state.as_str(), row.kind.as_str()),
        ("detected", "orphan_in_cache")
    );
    assert_eq!(row.cache_version, Some(1));
    assert_eq!(row.db_version, None);
}
