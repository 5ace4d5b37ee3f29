//! The HTTP API in-process (actix test service) against the real PostgreSQL and Redis, each test
//! in its own database and key prefix (see stalewatch-testkit).
//!
//! No worker runs here: the post-write checks the API enqueues stay in their Redis queue, so
//! incidents only move when a test runs a check itself. That keeps every assertion about
//! incident state deterministic.

use std::{collections::BTreeSet, rc::Rc, time::Duration};

use actix_web::ResponseError;
use actix_web::{
    http::{header, StatusCode},
    test::{self, TestRequest},
    web::Bytes,
    App,
};
use chrono::{DateTime, Utc};
use diesel_async::RunQueryDsl;
use futures::future::{join_all, LocalBoxFuture};
use serde_json::{json, Value};
use stalewatch_api::{error::ApiError, state::AppState, BODY_LIMIT};
use stalewatch_core::{
    config::{AdminToken, Config, FailureMode, ReadAccess},
    db::DbError,
    incident::{Source, State},
};
use stalewatch_testkit::{eventually, TestEnv, ADMIN_TOKEN};
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
                Reply {
                    status,
                    headers,
                    body,
                }
            })
        });
        Api { state, call }
    }

    /// Sends a request; client input must never reach a 500, whatever the test expects.
    fn send(&self, req: TestRequest) -> LocalBoxFuture<'static, Reply> {
        let reply = (self.call)(req);
        Box::pin(async move {
            let reply = reply.await;
            assert_ne!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "500: {:?}",
                String::from_utf8_lossy(&reply.body)
            );
            reply
        })
    }

    /// Sends a request that may answer 500: data in PostgreSQL that no request can fix.
    async fn send_allowing_500(&self, req: TestRequest) -> Reply {
        (self.call)(req).await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(TestRequest::get().uri(uri)).await
    }

    /// A POST to a mutating route (a refresh), with the admin token.
    async fn post(&self, uri: &str) -> Reply {
        self.send(admin(TestRequest::post().uri(uri))).await
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

/// The request with the test's admin token (`Authorization: Bearer ...`).
fn admin(req: TestRequest) -> TestRequest {
    req.insert_header((header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}")))
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
    // With the token, which an open read ignores: helpers work under READ_ACCESS=token too.
    let body = api
        .send(admin(
            TestRequest::get().uri(&format!("/inconsistencies?key={key}")),
        ))
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
            .checker()
            .await
            .unwrap()
            .check_items(&[id], Source::Sweep, None)
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
    // Found by schemathesis: serde's structs also read an array of the fields in order, and
    // a null name read as no name.
    for (what, req) in [
        (
            "PUT /items/{id}: an array of the fields",
            TestRequest::put()
                .uri(&item_uri)
                .set_json(json!([null, null])),
        ),
        (
            "POST /items: an array of the fields",
            TestRequest::post().uri("/items").set_json(json!(["x", 1])),
        ),
        (
            "PUT /items/{id}: a null name",
            TestRequest::put()
                .uri(&item_uri)
                .set_json(json!({ "name": null, "value": 1 })),
        ),
    ] {
        expect_error(&api, what, req, S::UNPROCESSABLE_ENTITY, invalid).await;
    }

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
                admin(TestRequest::post().uri(&format!("/items/{id}/refresh"))),
            ),
            (
                "POST /items/debug/refresh/{id}",
                admin(TestRequest::post().uri(&format!("/items/debug/refresh/{id}"))),
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
        ("/items/inconsistencies/all?limit=0", S::BAD_REQUEST, bad),
        ("/items/inconsistencies/all?limit=501", S::BAD_REQUEST, bad),
        ("/items/inconsistencies/all?after=abc", S::BAD_REQUEST, bad),
        (
            "/items/inconsistencies/all?state=resolved",
            S::BAD_REQUEST,
            bad,
        ),
        (
            "/items/inconsistencies/active?limit=-1",
            S::BAD_REQUEST,
            bad,
        ),
        ("/items/inconsistencies/active?key=x", S::BAD_REQUEST, bad),
        // PostgreSQL text cannot hold NUL: refused here, not by the query (found by schemathesis).
        ("/inconsistencies?entity=a%00b", S::BAD_REQUEST, bad),
        ("/inconsistencies?key=%00", S::BAD_REQUEST, bad),
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
        "PATCH /items/{id}: no such method on the route (Allow: DELETE, GET, PUT)",
        TestRequest::patch()
            .uri(&item_uri)
            .set_json(json!({ "name": "z" })),
        S::METHOD_NOT_ALLOWED,
        "method_not_allowed",
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
    assert_eq!(
        ready,
        json!({ "postgres": "ok", "redis": "ok", "cache": "ok" })
    );

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
    assert_eq!(
        stats["api_cache"],
        json!({ "hit": 1, "miss": 0, "error": 0, "hit_ratio": 1.0 }),
        "{stats}"
    );
}

/// /stats reads the deployment from the shared stores: what the workers recorded, not the
/// API process's counters.
#[actix_web::test]
async fn stats_summarise_the_deployment_from_the_shared_stores() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(no_grace(&env)).await;
    let empty = api.get("/stats").await.expect(StatusCode::OK, "stats");
    assert_eq!(
        empty["open"],
        json!({ "total": 0, "by_state": {}, "by_entity": {} })
    );
    assert_eq!(
        empty["time_to_confirm"],
        json!({ "incidents": 0, "p50_ms": null, "p99_ms": null })
    );
    assert_eq!(
        empty["sweep"],
        json!({ "current_round": null, "last_round": null })
    );
    assert_eq!(empty["api_cache"]["hit_ratio"], Value::Null);

    // Two confirmed incidents; one is refreshed (resolved), one stays open.
    let (_, _, open) = confirmed_incident(&env, &api).await;
    let (_, _, fixed) = confirmed_incident(&env, &api).await;
    api.post(&format!("/inconsistencies/{fixed}/refresh"))
        .await
        .expect(StatusCode::OK, "refresh");
    // A completed sweep round, as a worker leaves it.
    let mut fields = stalewatch_core::shards::Round::fields(7, 1_700_000_000_000, &[]);
    fields.push(("ended_ms".into(), "1700000005000".into()));
    let mut hset = redis::cmd("HSET");
    hset.arg(env.keys().sweep_last_round());
    for (field, value) in &fields {
        hset.arg(field).arg(value);
    }
    let _: () = hset
        .query_async(&mut api.state.queue_conn.clone())
        .await
        .unwrap();

    let stats = api.get("/stats").await.expect(StatusCode::OK, "stats");
    assert_eq!(
        stats["open"],
        json!({
            "total": 1,
            "by_state": { "confirmed": 1 },
            "by_entity": { "item": { "confirmed": 1 } },
        }),
        "incident {open} open: {stats}"
    );
    assert_eq!(
        stats["closed"]["last_hour"],
        json!({ "resolved": 1 }),
        "{stats}"
    );
    assert_eq!(
        stats["closed"]["last_day"],
        json!({ "resolved": 1 }),
        "{stats}"
    );
    let ttc = &stats["time_to_confirm"];
    assert_eq!(ttc["incidents"], 2, "{stats}");
    let (p50, p99) = (
        ttc["p50_ms"].as_f64().unwrap(),
        ttc["p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 <= p50 && p50 <= p99, "{stats}");
    // The creates asked for checks, and no worker runs here to take them.
    let check = &stats["queues"]["check"];
    assert!(
        check["pending"].as_u64().unwrap() + check["scheduled"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    for queue in ["confirm", "slo"] {
        assert!(
            stats["queues"][queue]["pending"].is_u64(),
            "{queue}: {stats}"
        );
    }
    assert_eq!(
        stats["sweep"]["last_round"],
        json!({
            "id": 7,
            "started_at": "2023-11-14T22:13:20Z",
            "ended_at": "2023-11-14T22:13:25Z",
            "shards": 0,
            "shards_done": 0,
            "rows": 0,
        }),
        "{stats}"
    );
    assert_eq!(stats["sweep"]["current_round"], Value::Null);
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
        .checker()
        .await
        .unwrap()
        .check_items(&[id], Source::Sweep, None)
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

/// PostgreSQL's numeric prints a jsonb number's every digit: the largest floats come back as
/// 309 of them, which must read back as the same number, not as an undecodable row (a 500 found
/// by schemathesis).
#[actix_web::test]
async fn the_largest_floats_are_stored_and_read_back() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let value = json!([1.7976931348623155e308, f64::MAX, -2.5e300, 5e-324]);
    let item = api.create("huge", value.clone()).await;
    assert_eq!(item["value"], value, "as RETURNING read it");
    let id = item["id"].as_str().unwrap();
    let key = env.keys().item(&id.parse().unwrap());
    env.cache.delete(&key).await.unwrap();
    let read = api
        .get(&format!("/items/{id}"))
        .await
        .expect(StatusCode::OK, "GET from PostgreSQL");
    assert_eq!(read["source"], "db");
    assert_eq!(read["data"]["value"], value);
}

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
        .checker()
        .await
        .unwrap()
        .check_items(&[id], Source::WriteCheck, None)
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

// ---- refusals: validation first, then PostgreSQL's own --------------------------------------

/// Runs SQL straight on the test's database.
async fn sql(env: &TestEnv, query: &str) -> Result<usize, DbError> {
    let mut conn = env.pool.get().await.expect("a connection");
    Ok(diesel::sql_query(query).execute(&mut conn).await?)
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
}

/// The ids a query returns, in its order.
async fn sql_ids(env: &TestEnv, query: &str) -> Vec<i64> {
    let mut conn = env.pool.get().await.expect("a connection");
    let rows: Vec<Id> = diesel::sql_query(query)
        .load(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    rows.into_iter().map(|r| r.id).collect()
}

/// Bodies, valid for both POST and PUT, holding a NUL where PostgreSQL cannot store one.
fn nul_bodies() -> [(&'static str, Value, &'static str); 4] {
    [
        (
            "NUL in name",
            json!({ "name": "a\u{0}b", "value": 1 }),
            "name",
        ),
        (
            "NUL in a nested value string",
            json!({ "name": "x", "value": { "a": [1, { "b": "c\u{0}d" }] } }),
            "/a/1/b",
        ),
        (
            "NUL in a nested object key",
            json!({ "name": "x", "value": { "a": [{ "k\u{0}": 1 }] } }),
            "an object key",
        ),
        (
            "NUL as the whole value",
            json!({ "name": "x", "value": "\u{0}" }),
            "the top level",
        ),
    ]
}

#[actix_web::test]
async fn nul_characters_are_refused_with_422_before_postgresql() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let item = api.create("kept", json!({ "a": 1 })).await;
    let uri = format!("/items/{}", id_of(&item));
    // The same requests with PostgreSQL unreachable: still 422, so it was never asked.
    let closed = stalewatch_testkit::free_port();
    let offline = Api::start(Config {
        database_url: format!("postgres://postgres@127.0.0.1:{closed}/nowhere"),
        ..env.config()
    })
    .await;

    for (what, body, mentions) in nul_bodies() {
        let value_only = body.get("value").filter(|_| mentions != "name").cloned();
        for (api, online) in [(&api, "online"), (&offline, "offline")] {
            let mut requests = vec![
                ("POST", TestRequest::post().uri("/items").set_json(&body)),
                ("PUT", TestRequest::put().uri(&uri).set_json(&body)),
            ];
            if let Some(value) = &value_only {
                let only = json!({ "value": value });
                requests.push((
                    "PUT value only",
                    TestRequest::put().uri(&uri).set_json(only),
                ));
            }
            for (method, req) in requests {
                let what = format!("{method}, PostgreSQL {online}: {what}");
                let reply = api.send(req).await;
                let body = reply.expect(StatusCode::UNPROCESSABLE_ENTITY, &what);
                assert_eq!(body["error"]["code"], "invalid", "{what}: {body}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("NUL") && message.contains(mentions),
                    "{what}: the message says what and where: {message:?}"
                );
            }
        }
    }

    // Nothing was written.
    let rows = sql_ids(&env, "SELECT count(*) AS id FROM items").await;
    assert_eq!(rows, [1]);
    let body = api.get(&uri).await.expect(StatusCode::OK, "GET");
    assert_eq!(body["data"], item);
}

/// Status and body of the response an error of the store becomes.
fn respond(e: DbError) -> (StatusCode, Value) {
    let e = ApiError::from(e);
    (e.status_code(), e.body())
}

#[actix_web::test]
async fn postgresql_refusals_are_4xx_or_a_500_with_an_id_never_503() {
    use stalewatch_core::db::items::{self, ItemChanges};
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let id = id_of(&api.create("kept", json!(1)).await);
    let pool = &env.pool;
    let deep = Uuid::now_v7();
    sql(
        &env,
        &format!(
            "INSERT INTO items (id, name, value) \
             VALUES ('{deep}', 'deep', (repeat('[', 300) || repeat(']', 300))::jsonb)"
        ),
    )
    .await
    .expect("PostgreSQL stores jsonb deeper than serde_json reads");

    use StatusCode as S;
    // What validation stops, sent past it; and what no request can cause.
    let cases: Vec<(&str, DbError, S, &str)> = vec![
        (
            "NUL in text",
            items::create(pool, "a\u{0}b", &json!(1)).await.unwrap_err(),
            S::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "NUL in a jsonb string",
            items::create(pool, "x", &json!({ "a": ["\u{0}"] }))
                .await
                .unwrap_err(),
            S::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "NUL in a jsonb key",
            items::update(
                pool,
                id,
                ItemChanges {
                    value: Some(json!({ "\u{0}": 1 })),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
            S::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "duplicate primary key",
            sql(
                &env,
                &format!("INSERT INTO items (id, name, value) VALUES ('{id}', 'dup', '1')"),
            )
            .await
            .unwrap_err(),
            S::CONFLICT,
            "conflict",
        ),
        (
            "CHECK constraint",
            sql(
                &env,
                &format!("UPDATE items SET version = 0 WHERE id = '{id}'"),
            )
            .await
            .unwrap_err(),
            S::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "NOT NULL constraint",
            sql(
                &env,
                &format!(
                    "INSERT INTO items (id, name, value) VALUES ('{}', NULL, '1')",
                    Uuid::now_v7()
                ),
            )
            .await
            .unwrap_err(),
            S::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "a row this service cannot decode",
            items::get(pool, deep).await.unwrap_err(),
            S::INTERNAL_SERVER_ERROR,
            "undecodable_row",
        ),
        (
            "a query of ours that is wrong",
            sql(&env, "SELECT no_such_column FROM items")
                .await
                .unwrap_err(),
            S::INTERNAL_SERVER_ERROR,
            "internal",
        ),
    ];
    for (what, db, status, code) in cases {
        let detail = db.to_string();
        let (got, body) = respond(db);
        assert_ne!(got, S::SERVICE_UNAVAILABLE, "{what} ({detail}): {body}");
        assert_eq!(got, status, "{what} ({detail}): {body}");
        assert_eq!(body["error"]["code"], code, "{what} ({detail}): {body}");
        let message = body["error"]["message"].as_str().unwrap();
        match code {
            "internal" => {
                let error_id = body["error"]["error_id"].as_str().expect("an error_id");
                assert!(error_id.parse::<Uuid>().is_ok(), "{body}");
                assert!(
                    !message.contains("no_such_column"),
                    "no SQL shown: {message}"
                );
            }
            "undecodable_row" => {
                assert!(message.contains(&format!("item {deep}")), "{message}");
                assert!(message.contains("recursion limit"), "says why: {message}");
            }
            _ => assert!(body["error"].get("error_id").is_none(), "{body}"),
        }
    }
    // The refusals left the item as it was.
    let row = items::get(pool, id).await.unwrap().unwrap();
    assert_eq!((row.version, row.value), (1, json!(1)));
}

// ---- incidents: readable snapshots, true totals, pages --------------------------------------

#[actix_web::test]
async fn incident_snapshots_are_json_documents_or_their_text() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(no_grace(&env)).await;
    let (id, key, incident) = confirmed_incident(&env, &api).await;
    let row = stalewatch_core::db::items::get(&env.pool, id)
        .await
        .unwrap()
        .unwrap();

    let one = api
        .get(&format!("/inconsistencies/{incident}"))
        .await
        .expect(StatusCode::OK, "GET incident");
    let listed_all = api
        .get("/items/inconsistencies/all")
        .await
        .expect(StatusCode::OK, "all");
    // The same view everywhere, but for the duration of an open incident, which grows.
    let without_duration = |mut v: Value| {
        v.as_object_mut().unwrap().remove("duration_ms");
        v
    };
    assert_eq!(
        without_duration(listed_all["data"][0].clone()),
        without_duration(one.clone())
    );
    assert_eq!(one["key"], key);
    assert!(one.get("cache_key").is_none(), "{one}");
    assert_eq!(one.as_object().unwrap().len(), 19, "{one}");
    // The row as PostgreSQL renders it: the same values, timestamps spelled `+00:00`.
    let expected = serde_json::to_value(&row).unwrap();
    for field in ["id", "name", "value", "version"] {
        assert_eq!(one["db_value"][field], expected[field], "{field}");
    }
    let instant = |v: &Value| DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!(instant(&one["db_value"]["updated_at"]), row.updated_at);
    assert_eq!(one["cache_value"]["name"], "stale");
    assert_eq!(one["cache_value"]["version"], 0);
    assert!(one["diff"].is_string(), "{one}");

    // Snapshots that are not JSON: undecodable cache bytes, a document cut at the cap.
    let cut = format!("{{\"value\": \"{}", "x".repeat(3000));
    let cut = &cut[..stalewatch_core::db::incidents::SNAPSHOT_CAP];
    let raw = sql_ids(
        &env,
        &format!(
            "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, db_value, \
             cache_value, diff, first_seen_at, confirm_due_at, last_seen_at) \
             VALUES ('raw', 'item', 'raw', 'detected', 'undecodable', '{cut}', 'not json', \
             'cached bytes are not JSON', now(), now(), now()) RETURNING id"
        ),
    )
    .await[0];
    let one = api
        .get(&format!("/inconsistencies/{raw}"))
        .await
        .expect(StatusCode::OK, "GET raw incident");
    assert_eq!(one["db_value"], cut);
    assert_eq!(one["cache_value"], "not json");
}

/// Inserts `n` incidents straight into PostgreSQL, the i-th in state
/// `[confirmed, persistent, resolved, detected, transient][i % 5]`, each on a key of its own
/// and with the columns each state requires.
async fn insert_incidents(env: &TestEnv, n: i64) {
    sql(
        env,
        &format!(
            "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, db_version, \
             cache_version, db_value, cache_value, diff, first_seen_at, confirm_due_at, \
             confirmed_at, last_seen_at, resolved_at, resolution) \
             SELECT 'bulk:' || i, 'item', i::text, s, 'stale', 2, 1, \
                    '{{\"n\": ' || i || '}}', 'garbage', 'version: 1 -> 2', \
                    now(), now(), \
                    CASE WHEN s IN ('confirmed', 'persistent', 'resolved') THEN now() END, \
                    now(), \
                    CASE WHEN s IN ('resolved', 'transient') THEN now() END, \
                    CASE WHEN s = 'resolved' THEN 'repair' END \
             FROM generate_series(0, {n} - 1) AS i, \
                  LATERAL (SELECT (ARRAY['confirmed', 'persistent', 'resolved', 'detected', \
                                         'transient'])[1 + i % 5] AS s) AS states"
        ),
    )
    .await
    .expect("insert incidents");
}

/// Follows `next` from the first page of `uri` to the last. Returns every page's body.
async fn pages(api: &Api, uri: &str) -> Vec<Value> {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let mut pages: Vec<Value> = Vec::new();
    let mut next = Value::Null;
    loop {
        let page_uri = match next.as_i64() {
            Some(after) => format!("{uri}{sep}after={after}"),
            None => uri.to_string(),
        };
        let page = api.get(&page_uri).await.expect(StatusCode::OK, &page_uri);
        next = page["next"].clone();
        pages.push(page);
        if next.is_null() {
            return pages;
        }
        assert!(pages.len() < 100, "{uri}: no end to the pages");
    }
}

/// The ids of `pages`, in order, checking each page's `next` is its last id.
fn ids_of(pages: &[Value]) -> Vec<i64> {
    let mut ids = Vec::new();
    for page in pages {
        let data = page["data"].as_array().expect("data is a list");
        if !page["next"].is_null() {
            assert_eq!(
                page["next"],
                data.last().unwrap()["id"],
                "next is the last id"
            );
        }
        ids.extend(data.iter().map(|i| i["id"].as_i64().unwrap()));
    }
    ids
}

#[actix_web::test]
async fn the_prototype_listings_count_everything_and_paginate() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    // 200 of each state: 600 confirmed ever, more than the largest page.
    insert_incidents(&env, 1000).await;
    let expect = |states: &str| {
        format!("SELECT id FROM inconsistencies WHERE state IN ({states}) ORDER BY id DESC")
    };
    let confirmed = sql_ids(&env, &expect("'confirmed', 'persistent', 'resolved'")).await;
    let active = sql_ids(&env, &expect("'confirmed', 'persistent'")).await;
    assert_eq!((confirmed.len(), active.len()), (600, 400));

    // All confirmed, in the largest pages: 500, then the other 100 and no next.
    let all = pages(&api, "/items/inconsistencies/all?limit=500").await;
    let sizes: Vec<usize> = all
        .iter()
        .map(|p| p["data"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [500, 100]);
    assert!(
        all.iter().all(|p| p["count"] == 600),
        "count is the total on every page"
    );
    assert_eq!(
        ids_of(&all),
        confirmed,
        "every confirmed incident once, newest first"
    );
    for incident in all.iter().flat_map(|p| p["data"].as_array().unwrap()) {
        assert!(incident["confirmed_at"].is_string(), "{incident}");
        assert!(incident["db_value"].is_object(), "{incident}");
        assert_eq!(incident["cache_value"], "garbage");
    }

    // Active, in default pages of 50: 400 is exactly 8 pages, so the 8th has no next.
    let pages_active = pages(&api, "/items/inconsistencies/active").await;
    let sizes: Vec<usize> = pages_active
        .iter()
        .map(|p| p["data"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [50; 8]);
    assert!(pages_active.iter().all(|p| p["count"] == 400));
    assert_eq!(ids_of(&pages_active), active);

    // A page past the end is empty and still counts everything.
    let last = *active.last().unwrap();
    let past = api
        .get(&format!("/items/inconsistencies/active?after={last}"))
        .await
        .expect(StatusCode::OK, "past the end");
    assert_eq!(past, json!({ "count": 400, "data": [], "next": null }));

    // /inconsistencies pages the same way, here by a state it alone lists.
    let detected = pages(&api, "/inconsistencies?state=detected&limit=200").await;
    assert_eq!(
        detected.len(),
        1,
        "exactly one full page, no empty one after it"
    );
    assert_eq!(
        ids_of(&detected),
        sql_ids(&env, &expect("'detected'")).await
    );
}

/// jsonb nested deeper than serde_json's recursion limit, written straight in SQL (PostgreSQL
/// accepts it): GET answers a JSON error that names the item and says why, and the worker's
/// check of the same key reports it as undecodable instead of failing.
#[actix_web::test]
async fn an_unreadable_row_answers_a_json_error_that_names_it() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let id = Uuid::now_v7();
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    sql(
        &env,
        &format!("INSERT INTO items (id, name, value) VALUES ('{id}', 'deep', '{deep}'::jsonb)"),
    )
    .await
    .unwrap();
    let reply = api
        .send_allowing_500(TestRequest::get().uri(&format!("/items/{id}")))
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "undecodable_row", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&id.to_string()), "{message}");
    assert!(message.contains("recursion limit"), "{message}");

    let outcome = api
        .state
        .checker()
        .await
        .unwrap()
        .check_items(&[id], stalewatch_core::incident::Source::Sweep, None)
        .await
        .expect("the check succeeds");
    assert_eq!(
        outcome
            .verdicts
            .get(&stalewatch_core::compare::Kind::Undecodable),
        Some(&1)
    );
}

/// A refresh racing a write, in a forced order: the refresh reads the row at version 1;
/// before its cache write lands, a writer commits version 2 and caches it; then the refresh's
/// write arrives. It must not put version 1 back.
///
/// The order is forced with Redis itself: a BLPOP parks the API's shared connection, so the
/// refresh's write waits in line behind it (visible as that client's query buffer in CLIENT
/// LIST) while the test, on its own connection, plays the writer; a push releases it.
#[actix_web::test]
async fn a_refresh_racing_a_write_never_puts_back_the_older_version() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let item = api.create("raced", json!({ "v": 1 })).await;
    let id = id_of(&item);
    let key = env.keys().item(&id);
    let gate = format!("{}gate", env.prefix);

    let mut parked = api.state.cache.connection();
    let name = format!("parked-{}", Uuid::new_v4().simple());
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut parked)
        .await
        .unwrap();
    let blpop = {
        let (mut conn, gate) = (parked.clone(), gate.clone());
        actix_web::rt::spawn(async move {
            redis::cmd("BLPOP")
                .arg(&gate)
                .arg(0)
                .query_async::<Option<(String, String)>>(&mut conn)
                .await
        })
    };
    let refresh = actix_web::rt::spawn(api.send(admin(
        TestRequest::post().uri(&format!("/items/{id}/refresh")),
    )));
    // The refresh has read version 1 and its write waits behind the BLPOP.
    let mut admin = env.cache.connection();
    eventually(
        Duration::from_secs(10),
        "the refresh's write to queue up",
        || {
            let (mut admin, name) = (admin.clone(), name.clone());
            async move {
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut admin)
                    .await
                    .ok()?;
                clients
                    .lines()
                    .find(|l| l.contains(&format!("name={name} ")))
                    .filter(|l| l.contains("cmd=blpop") && !l.contains(" qbuf=0 "))
                    .map(|_| ())
            }
        },
    )
    .await;
    // The writer: version 2 committed and cached, on connections of its own.
    let newer = stalewatch_core::db::items::update(
        &env.pool,
        id,
        stalewatch_core::db::items::ItemChanges {
            value: Some(json!({ "v": 2 })),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(newer.version, 2);
    env.cache
        .set(&key, &newer.to_cache_bytes(), Duration::from_secs(600))
        .await
        .unwrap();
    redis::cmd("LPUSH")
        .arg(&gate)
        .arg("go")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    blpop.await.unwrap().unwrap();
    let reply = refresh.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        cached_version(&env, &key).await,
        Some(2),
        "the newer copy stays"
    );
}

// ---- the admin token ----------------------------------------------------------------------

/// Every mutating route (the refreshes) answers 401 in the error format without the token or
/// with a wrong one, and runs with it; read routes and the demo's items CRUD stay open.
#[actix_web::test]
async fn mutating_routes_need_the_admin_token() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(no_grace(&env)).await;
    let (id, _key, incident) = confirmed_incident(&env, &api).await;
    let routes = [
        format!("/items/{id}/refresh"),
        format!("/items/debug/refresh/{id}"),
        format!("/inconsistencies/{incident}/refresh"),
    ];
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let short = format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let basic = format!("Basic {ADMIN_TOKEN}");
    for uri in &routes {
        for (what, authorization) in [
            ("no Authorization", None),
            ("a wrong token", Some(wrong.as_str())),
            ("a prefix of the token", Some(short.as_str())),
            ("the token under another scheme", Some(basic.as_str())),
            ("an empty bearer", Some("Bearer ")),
        ] {
            let mut req = TestRequest::post().uri(uri);
            if let Some(value) = authorization {
                req = req.insert_header((header::AUTHORIZATION, value));
            }
            let what = format!("POST {uri} with {what}");
            let reply = api.send(req).await;
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{what}");
            let body = reply.expect(StatusCode::UNAUTHORIZED, &what);
            assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
            assert!(
                !body.to_string().contains(ADMIN_TOKEN),
                "{what}: the token is not echoed: {body}"
            );
        }
        // A bad id is not even looked at before the token.
        let bad_id = uri.replace(&id.to_string(), "not-a-uuid");
        let bad_id = bad_id.replace(&format!("/{incident}/"), "/abc/");
        expect_error(
            &api,
            &format!("POST {bad_id} without a token"),
            TestRequest::post().uri(&bad_id),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .await;
    }
    // Nothing was refreshed: the incident is still open.
    let one = api
        .get(&format!("/inconsistencies/{incident}"))
        .await
        .expect(StatusCode::OK, "GET incident");
    assert_eq!(one["state"], "confirmed", "{one}");

    // With the token (the scheme in any case) each route runs.
    let body = api
        .send(
            TestRequest::post()
                .uri(&routes[2])
                .insert_header((header::AUTHORIZATION, format!("bearer {ADMIN_TOKEN}"))),
        )
        .await
        .expect(StatusCode::OK, "incident refresh with the token");
    assert_eq!(body["state"], "resolved", "{body}");
    for uri in &routes[..2] {
        let body = api.post(uri).await.expect(StatusCode::OK, uri);
        assert_eq!(body["refreshed"], true, "{body}");
    }

    // Read routes and the items CRUD need no token.
    for uri in [
        format!("/items/{id}"),
        "/inconsistencies".to_string(),
        format!("/inconsistencies/{incident}"),
        "/items/inconsistencies/all".to_string(),
        "/items/inconsistencies/active".to_string(),
        "/healthz".to_string(),
    ] {
        api.get(&uri).await.expect(StatusCode::OK, &uri);
    }
    assert_eq!(api.get("/metrics").await.status, StatusCode::OK);
    let created = api.create("open", json!({})).await;
    let item = format!("/items/{}", id_of(&created));
    api.put_json(&item, &json!({ "name": "still open" }))
        .await
        .expect(StatusCode::OK, "PUT without a token");
    api.delete(&item)
        .await
        .expect(StatusCode::OK, "DELETE without a token");
}

/// Under `READ_ACCESS=token` the incident reads, `/stats` and rebuild progress answer 401
/// without the token and run with it; probes, scrapes, the document and the demo's items
/// stay open. Without it (the default) the same reads need nothing.
#[actix_web::test]
async fn read_routes_need_the_token_only_under_read_access_token() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(Config {
        read_access: ReadAccess::Token,
        ..no_grace(&env)
    })
    .await;
    let (id, _key, incident) = confirmed_incident(&env, &api).await;
    let reads = [
        "/inconsistencies".to_string(),
        format!("/inconsistencies/{incident}"),
        "/items/inconsistencies/all".to_string(),
        "/items/inconsistencies/active".to_string(),
        "/stats".to_string(),
        "/entities/item/rebuild".to_string(),
    ];
    for uri in &reads {
        let body = api.get(uri).await.expect(
            StatusCode::UNAUTHORIZED,
            &format!("GET {uri} without a token"),
        );
        assert_eq!(body["error"]["code"], "unauthorized", "GET {uri}: {body}");
        let wrong = TestRequest::get()
            .uri(uri)
            .insert_header((header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}x")));
        api.send(wrong).await.expect(
            StatusCode::UNAUTHORIZED,
            &format!("GET {uri} with a wrong token"),
        );
        api.send(admin(TestRequest::get().uri(uri)))
            .await
            .expect(StatusCode::OK, &format!("GET {uri} with the token"));
    }
    for uri in [
        "/healthz".to_string(),
        "/readyz".to_string(),
        "/openapi.json".to_string(),
        format!("/items/{id}"),
    ] {
        let reply = api.get(&uri).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {uri} stays open");
    }
    let metrics = api.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK, "GET /metrics stays open");

    // The default: the same reads are open.
    let open = Api::start(no_grace(&env)).await;
    for uri in &reads {
        open.get(uri)
            .await
            .expect(StatusCode::OK, &format!("GET {uri} under READ_ACCESS=open"));
    }
}

/// A refresh of an incident that does not exist answers 404 in the error format.
#[actix_web::test]
async fn refreshing_an_unknown_incident_is_a_404() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(env.config()).await;
    let body = api
        .post("/inconsistencies/999999/refresh")
        .await
        .expect(StatusCode::NOT_FOUND, "refresh of incident 999999");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

/// `READ_ACCESS=token` with `ADMIN_TOKEN=disabled` would protect nothing: refused at start.
#[test]
fn read_access_token_needs_a_real_token() {
    let config = Config {
        read_access: ReadAccess::Token,
        admin_token: AdminToken::Disabled,
        ..Config::default()
    };
    let err = config.require_admin_token().unwrap_err();
    assert_eq!(err.var, "READ_ACCESS", "{err}");
}

/// A mutating route refuses a body that is not declared JSON, token or not: a cross-site
/// `text/plain` form post never reaches it, even with `ADMIN_TOKEN=disabled`.
#[actix_web::test]
async fn a_refresh_refuses_a_non_json_body_and_disabled_leaves_it_open() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(Config {
        admin_token: AdminToken::Disabled,
        ..env.config()
    })
    .await;
    let item = api.create("demo", json!({ "n": 1 })).await;
    let uri = format!("/items/{}/refresh", id_of(&item));
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        for req in [
            TestRequest::post().uri(&uri),
            admin(TestRequest::post().uri(&uri)),
        ] {
            expect_error(
                &api,
                &format!("POST {uri} as {content_type}"),
                req.insert_header((header::CONTENT_TYPE, content_type))
                    .set_payload("refresh=1"),
                StatusCode::BAD_REQUEST,
                "bad_request",
            )
            .await;
        }
    }
    // Disabled: no token needed; a JSON content type is fine.
    let body = api
        .send(TestRequest::post().uri(&uri))
        .await
        .expect(StatusCode::OK, "refresh, token disabled");
    assert_eq!(body["refreshed"], true);
    let body = api
        .send(
            TestRequest::post()
                .uri(&uri)
                .insert_header(header::ContentType::json())
                .set_payload("{}"),
        )
        .await
        .expect(StatusCode::OK, "refresh with a JSON body");
    assert_eq!(body["refreshed"], true);
}

/// Without ADMIN_TOKEN (neither a token nor `disabled`) the API does not start.
#[actix_web::test]
async fn the_api_does_not_start_without_an_admin_token() {
    let env = TestEnv::new().await.unwrap();
    let err = AppState::connect(Config {
        admin_token: AdminToken::Unset,
        ..env.config()
    })
    .await
    .err()
    .expect("started without ADMIN_TOKEN");
    let message = format!("{err:#}");
    assert!(
        message.contains("ADMIN_TOKEN") && message.contains("disabled"),
        "{message}"
    );
}
